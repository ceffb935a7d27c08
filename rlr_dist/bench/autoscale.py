"""`rlr-dist bench autoscale`: a training job submitted with ``ray job submit`` to an autoscaling Ray cluster on
this machine, whose autoscaler starts the node types the job's roles ask for and removes them once idle.

The cluster is Ray's fake multi-node provider (each "instance" a raylet on this machine) with the node types,
``min_workers`` / ``max_workers`` and spot-over-on-demand ``priority`` of a cluster-launcher YAML
(``cluster/aws.yaml``), autoscaler v2 as ``ray up`` runs it, and a short idle timeout. The head takes no tasks.
A thread records the live nodes per type every second; the report is a plot of nodes over time and a table
of the events (submitted, first node up, run finished, last node gone).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlr_dist.pipeline.local_cluster import node_types
from rlr_dist.ports import free_port

FAKE_HEAD_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the provider's fixed id for the head
PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"



def launcher_config(launcher: str | Path, gcs_port: int, idle_timeout_minutes: float, cpus: float = 1) -> dict:
    """An autoscaler config for the fake multi-node provider with ``launcher``'s worker node types (CPU scaled
    to ``cpus``; min/max workers and priority kept) and a CPU-0 head."""
    types, _ = node_types(launcher, cpus)
    doc = yaml.safe_load(Path(launcher).read_text())
    workers = {t.name: {"resources": t.resources, "node_config": {}, "min_workers": t.min_workers,
                        "max_workers": t.max_workers, "priority": t.priority} for t in types.values()}
    return {"cluster_name": "rlr-dist-local", "max_workers": int(doc.get("max_workers", 20)),
            "upscaling_speed": float(doc.get("upscaling_speed", 1.0)), "idle_timeout_minutes": idle_timeout_minutes,
            # "external": the provider class by module path (the packaged fake_multinode defaults file is absent)
            "provider": {"type": "external", "module": PROVIDER, "gcs_address": f"127.0.0.1:{gcs_port}",
                         "launch_multiple": True, "head_node_id": FAKE_HEAD_ID},
            "head_node_type": "ray.head.default",
            "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                                     **workers},
            "auth": {"ssh_user": "ubuntu"}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": []}


@dataclass
class AutoscalingCluster:
    """``with AutoscalingCluster("cluster/aws.yaml", idle_timeout_minutes=0.25) as c:`` — the head is up;
    ``c.dashboard`` for ``ray job submit``, ``c.address`` for ``ray.init``. Worker nodes come and go with the
    autoscaler. Everything started is stopped on exit (the head's processes and every node it launched),
    and nothing else: other Ray clusters on the machine are left alone."""

    launcher: str | Path
    idle_timeout_minutes: float = 0.25
    cpus: float = 1
    temp_dir: str = field(init=False)

    def __enter__(self) -> "AutoscalingCluster":
        self.temp_dir = tempfile.mkdtemp(prefix="ray-as-", dir="/tmp")  # short: unix socket paths <= 107 bytes
        port, dash = free_port(), free_port()
        cfg_file = Path(self.temp_dir) / "autoscaler.yaml"
        cfg_file.write_text(yaml.safe_dump(launcher_config(self.launcher, port, self.idle_timeout_minutes, self.cpus)))
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_ID,
               "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_ID}
        ray_bin = str(Path(sys.executable).parent / "ray")
        self.log = open(Path(self.temp_dir) / "head.log", "w")
        self.proc = subprocess.Popen(
            [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=0", f"--autoscaling-config={cfg_file}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={self.temp_dir}", "--block",
             "--disable-usage-stats",
             # free ports, not Ray's fixed defaults: another Ray on this machine may hold those (the job agent's
             # 52365 taken means "No available agent to submit job")
             *(f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "ray-client-server-port",
                                                       "metrics-export-port"))], env=env, start_new_session=True, stdout=self.log, stderr=subprocess.STDOUT)
        self.address, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(self.dashboard + "/api/version", timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() - t0 > 180:
                    self.__exit__()
                    raise RuntimeError(f"the autoscaling head did not come up (see {self.log.name})") from None
                time.sleep(1)
        print(f"[autoscale] head up in {time.time() - t0:.0f} s (dashboard {self.dashboard})", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        # nodes the autoscaler launched run outside the head's process group: every process of this session
        for pid in _pids_with(self.temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


def _pids_with(text: str) -> list[int]:
    """Processes whose command line mentions ``text`` (this cluster's temp dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


class NodeTimeline:
    """Every ``period`` seconds, from the autoscaler's own status: the live worker nodes per node type and how
    many of them are idle. ``points``: ``(seconds since start, {type: live}, {type: idle})``."""

    def __init__(self, gcs_address: str, period: float = 1.0):
        self.address, self.period, self.points, self.t0 = gcs_address, period, [], time.time()
        self.types: dict[str, str] = {}            # node id -> type, every node ever seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="node-timeline", daemon=True)

    def __enter__(self) -> "NodeTimeline":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def now(self) -> float:
        return time.time() - self.t0

    def live(self) -> tuple[dict[str, int], dict[str, int]]:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(self.address)
        live: dict[str, int] = {}
        idle: dict[str, int] = {}
        for group, nodes in ((None, status.active_nodes), (idle, status.idle_nodes)):
            for n in nodes:
                kind = "head" if n.node_id == FAKE_HEAD_ID else n.ray_node_type_name
                if n.node_id:
                    self.types.setdefault(n.node_id, kind)
                if kind == "head":
                    continue
                live[kind] = live.get(kind, 0) + 1
                if group is not None:
                    group[kind] = group.get(kind, 0) + 1
        return live, idle

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.points.append((round(self.now(), 1), *self.live()))
            except Exception as e:  # noqa: BLE001 - one missed sample is not worth stopping the record
                print(f"[autoscale] status not read ({type(e).__name__})", flush=True)
            self._stop.wait(self.period)


def submit_and_watch(cluster: AutoscalingCluster, config: Path, out_dir: Path, timeout: float = 900,
                     after_s: float | None = None) -> dict:
    """Submit ``rlr-dist train config`` with the Job Submission API, record nodes until the job ends and then
    until every worker node is gone (at most ``after_s``, default idle timeout + 90 s)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    entry = f"{sys.executable} -m rlr_dist.cli train {config} --output_dir={out_dir}"
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "RAY_AUTH_MODE") if k in os.environ}
    with NodeTimeline(cluster.address) as tl:
        for attempt in range(60):  # the head's job agent registers a little after the dashboard answers
            try:
                job = client.submit_job(entrypoint=entry, runtime_env={"env_vars": env})
                break
            except RuntimeError as e:
                if "No available agent" not in str(e) or attempt == 59:
                    raise
                time.sleep(2)
        submitted, done = tl.now(), None
        status, last = client.get_job_status(job), 0.0
        while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and tl.now() < timeout:
            if done is None and "[rlr-dist] done" in client.get_job_logs(job):
                done = tl.now()
            if tl.now() - last > 15:
                print(f"[autoscale] {tl.now():.0f} s: job {status}, nodes {tl.points[-1][1] if tl.points else {}}",
                      flush=True)
                last = tl.now()
            time.sleep(1)
            status = client.get_job_status(job)
        ended = tl.now()
        logs = client.get_job_logs(job)
        limit = ended + (after_s if after_s is not None else cluster.idle_timeout_minutes * 60 + 90)
        while tl.now() < limit and (not tl.points or sum(tl.points[-1][1].values()) > 0):
            time.sleep(1)
        time.sleep(1.5)
    first_up = next((t for t, c, _ in tl.points if sum(c.values()) > 0), None)
    all_idle = next((t for t, c, i in tl.points if done is not None and t > done and c and c == i), None)
    gone = next((t for t, c, _ in tl.points if t > ended and sum(c.values()) == 0), None)
    peak: dict[str, int] = {}
    for _, c, _ in tl.points:
        for k, v in c.items():
            peak[k] = max(peak.get(k, 0), v)
    return {"status": str(status), "logs": logs, "points": tl.points, "submitted": submitted, "first_up": first_up,
            "done": done if done is not None else ended, "all_idle": all_idle, "ended": ended, "gone": gone,
            "peak": peak, "node_types": tl.types}


def plot(result: dict, path: Path, idle_timeout_minutes: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted(result["peak"])
    ts = [p[0] for p in result["points"]]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for k in kinds:
        ax.step(ts, [p[1].get(k, 0) for p in result["points"]], where="post", label=k)
    ax.step(ts, [sum(p[1].values()) for p in result["points"]], where="post", color="k", lw=2, label="all workers")
    ax.step(ts, [sum(p[2].values()) for p in result["points"]], where="post", color="k", ls=":", label="idle workers")
    events = [("submitted", "job submitted"), ("done", "run finished"), ("all_idle", "all nodes idle"),
              ("ended", "job ended"), ("gone", "last node gone")]
    top = ax.get_ylim()[1]
    for i, (key, label) in enumerate(events):  # labels at staggered heights: several events come seconds apart
        if result.get(key) is not None:
            ax.axvline(result[key], ls="--", color="grey")
            ax.text(result[key], top * (0.97 - 0.22 * (i % 3)), " " + label, rotation=90, va="top", fontsize=7)
    ax.set_xlabel("seconds"), ax.set_ylabel("live worker nodes")
    ax.set_title(f"autoscaler: nodes per type (idle timeout {idle_timeout_minutes * 60:.0f} s)")
    ax.legend(fontsize=8, loc="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(result: dict, launcher: str, config: str, idle_timeout_minutes: float, png: str) -> str:
    idle = idle_timeout_minutes * 60
    fmt = (lambda v: "-" if v is None else f"{v:.0f}")
    gone_after = None if result["gone"] is None or result["all_idle"] is None else result["gone"] - result["all_idle"]
    lines = ["# The autoscaler, on this machine", "",
             f"`rlr-dist bench autoscale` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs): Ray's fake multi-node "
             f"provider with the worker node types of `{launcher}` (min/max workers and spot-over-on-demand priority "
             f"kept, CPU scaled to 1 per node, GPUs logical), autoscaler v2, idle timeout {idle:.0f} s (the YAML's "
             "is 10 min), a CPU-0 head and no worker node at the start. The job is `rlr-dist train` of "
             f"`{config}` submitted with the Job Submission API (what `ray job submit` calls), its roles placed by "
             "the node types' resources and `cluster.autoscale_timeout_s` set, so the run asks the autoscaler for "
             "its bundles, waits for them, and withdraws the request when it ends.", "",
             f"![nodes over time]({png})", "",
             "| event | s after start |", "|---|---|",
             f"| job submitted | {fmt(result['submitted'])} |", f"| first worker node up | {fmt(result['first_up'])} |",
             f"| run finished (`[rlr-dist] done`) | {fmt(result['done'])} |",
             f"| every worker node idle | {fmt(result['all_idle'])} |",
             f"| job ended ({result['status']}) | {fmt(result['ended'])} |",
             f"| last worker node gone | {fmt(result['gone'])} ({fmt(gone_after)} s after all were idle; idle timeout "
             f"{idle:.0f} s) |", "",
             "Peak nodes per type: " + ", ".join(f"`{k}` {v}" for k, v in sorted(result["peak"].items())) + ".", ""]
    return "\n".join(lines)


def main(launcher: str = "cluster/aws.yaml", config: str = "jobs/configs/digits.yaml",
         out: str | None = "docs/results/autoscaling.md", idle_timeout_minutes: float = 0.5,
         workdir: str | None = None, overrides: list[str] | None = None) -> dict:
    """Run the job on a fresh autoscaling cluster; write the report (and its plot beside it)."""
    from rlr_dist.bench.faults import SMALL
    from rlr_dist.bench.node_faults import place
    from rlr_dist.train.config import dump, load_config

    root = Path(workdir or tempfile.mkdtemp(prefix="rlr-autoscale-"))
    root.mkdir(parents=True, exist_ok=True)
    cfg = place(load_config(config, list(SMALL if overrides is None else overrides) +
                            ["--cluster.autoscale_timeout_s=600"])).resolved(Path.cwd())
    job_cfg = root / "job.yaml"
    job_cfg.write_text(dump(cfg))
    with AutoscalingCluster(launcher, idle_timeout_minutes) as cluster:
        result = submit_and_watch(cluster, job_cfg, root / "run")
    result["output_dir"] = str(root / "run")
    (root / "timeline.json").write_text(json.dumps({k: v for k, v in result.items() if k != "logs"}, indent=1))
    if out:
        md = Path(out)
        md.parent.mkdir(parents=True, exist_ok=True)
        png = plot(result, md.with_suffix(".png"), idle_timeout_minutes)
        text = report(result, launcher, config, idle_timeout_minutes, png.name)
        old = md.read_text() if md.is_file() else ""
        reading = old[old.find("## Reading"):] if "## Reading" in old else ""
        md.write_text(text + ("\n" + reading if reading else ""))
    return result
