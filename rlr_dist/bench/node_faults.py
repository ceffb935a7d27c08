"""Node loss on a multi-node Ray cluster (:class:`rlr_dist.pipeline.local_cluster.LocalCluster`): a whole
node — raylet, object store, every process on it — killed at an exact point of a run, and the run's record
checked after.

The point is set with ``RLR_DIST_CRASH=node@ROLE:INDEX:ITERATION:PHASE`` (:func:`rlr_dist.pipeline.workers.
maybe_crash`): the actor that reaches it writes its node's id to a marker and waits; :class:`NodeKiller` (a
thread beside the driver) kills that node; the spare nodes take the lost work, and after the run a fresh node
of the lost type is added, as the autoscaler would (Ray starts nodes from the main thread only).
The runs are deterministic, so a run that lost a node must log exactly the undisturbed run's numbers.

Used by ``tests/test_multinode.py`` and ``rlr-dist bench faults --nodes`` (the node-loss table of
docs/results/faults.md).
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Callable

from rlr_dist.bench import faults as F
from rlr_dist.config import build
from rlr_dist.pipeline.local_cluster import LocalCluster
from rlr_dist.train.config import TrainConfig

# The roles placed by resources the node types of cluster/aws.yaml advertise: samplers and the reward model
# on A10G nodes (one per node), learners on A100 nodes; every run keeps one spare node of each type.
ROLE_RESOURCES = {"samplers": {"accelerator_type:A10G": 1}, "rewards": {"accelerator_type:A10G": 1},
                  "learners": {"accelerator_type:A100": 1}}
NODES = {"gpu-a10g-spot": 4, "gpu-a100-spot": 2}
CASES = [  # (name, injection, iteration the loss lands in)
    ("sampler node lost while sampling", "node@sampler:0:3:sample", 3),
    ("reward node lost while scoring", "node@reward:0:3:score", 3),
    ("learner node lost after the iteration-4 checkpoint", "node@learner:0:4:step", 4),
]


def place(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its roles asking for the node types' resources (as a cloud config would)."""
    from rlr_dist.config import to_dict

    d = to_dict(cfg)
    for role, res in ROLE_RESOURCES.items():
        d["cluster"][role]["resources"] = dict(res)
    return build(TrainConfig, d)


class NodeKiller:
    """Watches ``folder`` for ``*.node`` markers and kills each named node once; on leaving, adds a replacement
    node of each lost type. ``events``: the nodes killed, with the wall time of each kill."""

    def __init__(self, cluster: LocalCluster, folder: Path):
        self.cluster, self.folder = cluster, folder
        self.events: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="node-killer", daemon=True)

    def __enter__(self) -> "NodeKiller":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        for e in self.events:
            self.cluster.add(e["type"])

    def _watch(self) -> None:
        done: set[str] = set()
        while not self._stop.is_set():
            for marker in sorted(self.folder.glob("*.node")):
                if marker.name in done:
                    continue
                done.add(marker.name)
                node = marker.read_text().strip()
                t = time.time()
                kind = self.cluster.kill(node)
                print(f"[node-faults] killed node {node[:8]} ({kind}) at {marker.stem}", flush=True)
                self.events.append({"at": marker.stem, "node": node, "type": kind, "killed_at": t})
            self._stop.wait(0.2)


def nodes_of(out_dir: str | Path) -> dict:
    """The run's ``placement.json``."""
    return json.loads((Path(out_dir) / "placement.json").read_text())


def run_case(cluster: LocalCluster, cfg: TrainConfig, spec: str, root: Path) -> tuple[dict | None, float, str, list]:
    """One run of ``cfg`` with the node loss ``spec`` injected; (result, seconds, error, kill events)."""
    with F.crashes(spec, root / "markers"), NodeKiller(cluster, root / "markers") as killer:
        out, s, err = F.run(cfg)
    return out, s, err, killer.events


def recovery(out: dict, killed_at: float) -> float | None:
    """Seconds the loss cost: from the kill to the next iteration logged, less a typical (median) iteration."""
    import statistics

    from mlflow.tracking import MlflowClient

    client = MlflowClient(out["tracking_uri"])
    after = sorted(m.timestamp / 1000 for m in client.get_metric_history(out["run_id"], "reward/mean")
                   if m.timestamp / 1000 > killed_at)
    its = [m.value for m in client.get_metric_history(out["run_id"], "time/iteration")]
    return round(after[0] - killed_at - statistics.median(its), 1) if after and its else None


def record(name: str, spec: str, crashed_at: int, cluster: LocalCluster, out, seconds, err, events,
           reference, ref_seconds) -> dict:
    row = F.record(name, spec, out, seconds, err, reference, None, crashed_at)
    row["recovery_s"] = recovery(out, events[0]["killed_at"]) if out is not None and events else None
    row["killed"] = ", ".join(f"{e['node'][:8]} ({e['type']})" for e in events) or "none"
    if out is not None and "@" in spec:
        place_doc = nodes_of(out["output_dir"])
        killed = {e["node"] for e in events}
        role = spec.split("@")[1].split(":")[0]
        if role == "learner":
            starts = place_doc["learners"]
            row["moved_to"] = ", ".join(n[:8] for n in starts[-1]["nodes"]) if starts else "?"
            row["moved"] = len(starts) > 1 and not set(starts[-1]["nodes"]) & killed
        else:
            mine = [a["node"] for a in place_doc["actors"] if a["actor"] == f"{role}/0"]
            row["moved_to"] = mine[-1][:8] if mine else "?"
            row["moved"] = len(mine) > 1 and mine[0] in killed and mine[-1] not in killed
    return row


def main(base: TrainConfig, launcher: str, root: Path, progress: Callable[[str], None] = print) -> list[dict]:
    """The reference run and every node-loss case on one LocalCluster; rows for the faults table."""
    import ray

    cfg = place(base)
    rows = []
    with LocalCluster(launcher, NODES) as cluster:
        ray.init(address=cluster.address)
        ref, ref_s, err = F.run(F.with_overrides(cfg, [f"--output_dir={root / 'reference'}"]))
        if ref is None:
            raise RuntimeError(f"the undisturbed multi-node reference run failed: {err}")
        rows.append(record("none (multi-node reference)", "-", 0, cluster, ref, ref_s, err, [], None, None))
        progress(f"  multi-node reference: {ref_s:.0f} s")
        for name, spec, at in CASES:
            tag = spec.replace(":", "_").replace("@", "_")
            out, s, err, events = run_case(cluster, F.with_overrides(cfg, [f"--output_dir={root / tag}"]), spec,
                                           root / tag)
            rows.append(record(name, spec, at, cluster, out, s, err, events, ref, ref_s))
            progress(f"  {name}: {'finished' if out else 'FAILED: ' + err} in {s:.0f} s")
    return rows


def section(rows: list[dict], launcher: str, config: str, seconds: float) -> str:
    """The node-loss section of docs/results/faults.md."""
    lines = ["## Node loss on a multi-node cluster", "",
             f"`rlr-dist bench faults --nodes` ({time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} min): {config} made "
             "small as above, on a local multi-node Ray cluster (`rlr_dist/pipeline/local_cluster.py`): a CPU-0 head "
             "plus "
             f"{', '.join(f'{n}x `{t}`' for t, n in NODES.items())} of {launcher}, each node its own raylet and object "
             "store (300 MB). Roles placed by resources: " + ", ".join(f"{r} `{res}`" for r, res in ROLE_RESOURCES.items()) +
             ". The whole node (raylet, object store, every process on it) is SIGKILLed at the point named, without "
             "telling the GCS; the runs are deterministic, so a run that lost a node must log the undisturbed run's "
             "numbers. *Recovery s*: from the kill to the next iteration logged, less the run's median iteration. "
             "*Came back on*: the node the lost role runs on afterwards (from the run's `placement.json`).", "",
             "| fault | injected | node killed | finished | s | recovery s | actor restarts | calls re-run | "
             "learner restarts | iterations redone | came back on | duplicate MLflow points | reward/mean = reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = r.get("same_as_reference")
        lines.append(f"| {r['fault']} | `{r['injected']}` | {r['killed']} | "
                     f"{'yes' if r['finished'] else 'NO: ' + r['error']} | {r['seconds']} | "
                     f"{r['recovery_s'] if r.get('recovery_s') is not None else '-'} | {r.get('restarts_actors', '-')} | "
                     f"{r.get('calls_rerun', '-')} | {r.get('learner_restarts', '-')} | {r.get('redone', '-')} | "
                     f"{r.get('moved_to', '-') if r['injected'] != '-' else '-'} | {r.get('duplicates', '-')} | "
                     f"{'-' if same is None else ('yes' if same else 'no')} |")
    return "\n".join(lines) + "\n\n"


def write(rows: list[dict], launcher: str, config: str, seconds: float, out: str | Path) -> str:
    """Put the node-loss section into ``out`` (replacing an older one; the other sections are kept)."""
    text = section(rows, launcher, config, seconds)
    path = Path(out)
    old = path.read_text() if path.is_file() else "# Faults and bad inputs\n\n"
    path.write_text(_replace(old, text))
    return text


def _replace(old: str, text: str) -> str:
    """``old`` with its node-loss section replaced by ``text`` (new: placed before "## Bad inputs")."""
    parts = [(h, b) for h, b in F.sections(old) if not h.startswith("## Node loss")]
    out, placed = [], False
    for h, b in parts:
        if h == "## Bad inputs" and not placed:
            out.append(text)
            placed = True
        out.append((h + "\n" if h else "") + b)
    return "".join(out) + ("" if placed else text)
