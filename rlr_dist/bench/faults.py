"""`rlr-dist bench faults`: faults injected into a real local Ray pipeline and bad inputs given to the CLI —
what happened, whether the run finished with its record intact, and how long recovery took.

Faults (each one run of the same small config, compared with an undisturbed reference run):

* an actor process killed (``os._exit``, as a lost node would): a sampler at the weight sync, a sampler while
  sampling, the reward actor while scoring — ``RLR_DIST_CRASH`` (``rlr_dist.pipeline.workers.maybe_crash``);
* a learner killed after a checkpoint: Ray Train restarts the worker group from it;
* the latest checkpoint damaged (a shard truncated), or its manifest deleted, then ``--resume``;
* the driver interrupted (SIGINT to ``rlr-dist train``), then ``--resume``.

For each: finished or not, extra wall seconds against the reference (time to recover), iterations redone
(learner restarts, from the run's ``learner_starts.log`` lineage), duplicated MLflow points (target 0), and
whether the per-iteration ``reward/mean`` series equals the undisturbed run's (the runs are deterministic).
Bad inputs: exit code, the one line printed, seconds, and whether Ray was started (it must not be).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from rlr_dist.config import apply_overrides, build, to_dict
from rlr_dist.train.config import TrainConfig, load_config

SMALL = ["--train.iterations=6", "--train.samples_per_prompt=8", "--model.num_inference_steps=6",
         "--train.eval_every=0", "--checkpoint.every=2", "--checkpoint.keep=3", "--export=null",
         "--cluster.samplers.count=2", "--cluster.rewards.count=1", "--cluster.learners.count=1"]
SERIES = ("reward/mean", "loss/total", "kl/sampled")


# ------------------------------------------------------------------------------------------- records
def history(out: dict) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a finished run: ``key -> [(step, value), ...]`` in logging order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(out["tracking_uri"])
    keys = client.get_run(out["run_id"]).data.metrics
    return {k: [(m.step, m.value) for m in sorted(client.get_metric_history(out["run_id"], k),
                                                  key=lambda m: (m.step, m.timestamp))] for k in keys}


def duplicates(hist: dict[str, list[tuple[int, float]]]) -> int:
    """Points logged twice for the same (metric, step)."""
    return sum(len(pts) - len({s for s, _ in pts}) for pts in hist.values())


def lineage(output_dir: str | Path) -> list[tuple[str, int, str]]:
    """``(attempt, start iteration, checkpoint restored)`` of every learner-group start of the run."""
    path = Path(output_dir) / "learner_starts.log"
    rows = [line.split() for line in path.read_text().splitlines()] if path.is_file() else []
    return [(r[0], int(r[1]), r[2]) for r in rows]


def same_series(a: dict, b: dict, rel: float = 1e-4) -> bool:
    import math

    for key in SERIES:
        if key not in a or key not in b:
            continue
        x, y = dict(a[key]), dict(b[key])
        if x.keys() != y.keys() or any(not math.isclose(x[s], y[s], rel_tol=rel, abs_tol=1e-7) for s in x):
            return False
    return True


# ------------------------------------------------------------------------------------------ running
@contextlib.contextmanager
def crashes(spec: str, folder: Path):
    """Inject ``spec`` (``role:index:iteration:phase[,...]``) for the runs inside the block."""
    folder.mkdir(parents=True, exist_ok=True)
    old = {k: os.environ.get(k) for k in ("RLR_DIST_CRASH", "RLR_DIST_CRASH_DIR")}
    os.environ.update({"RLR_DIST_CRASH": spec, "RLR_DIST_CRASH_DIR": str(folder)})
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def run(cfg: TrainConfig, resume: bool = False) -> tuple[dict | None, float, str]:
    """One ``train`` call: ``(its result or None, seconds, error text or "")``."""
    from rlr_dist.pipeline.run import train

    t0 = time.perf_counter()
    try:
        out = train(cfg, resume=resume)
        return out, time.perf_counter() - t0, ""
    except Exception as e:  # noqa: BLE001 - a fault that was not survived is a result
        return None, time.perf_counter() - t0, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def record(name: str, injected: str, out: dict | None, seconds: float, error: str, reference: dict | None,
           ref_seconds: float | None, crashed_at: int | None = None) -> dict:
    row = {"fault": name, "injected": injected, "finished": out is not None, "seconds": round(seconds, 1),
           "recovery_s": None if ref_seconds is None or out is None else round(seconds - ref_seconds, 1),
           "error": error}
    if out is not None:
        hist = history(out)
        m = out["metrics"]
        starts = [s for a, s, _ in lineage(out["output_dir"])]
        row.update(duplicates=duplicates(hist), restarts_actors=int(m.get("restarts/actors", 0)),
                   calls_rerun=int(m.get("restarts/calls_rerun", 0)), learner_restarts=int(m.get("restarts/learners", 0)),
                   redone=(crashed_at - starts[-1]) if crashed_at is not None and len(starts) > 1 else 0,
                   restored=lineage(out["output_dir"])[-1][2] if lineage(out["output_dir"]) else "-",
                   same_as_reference=None if reference is None else same_series(hist, history(reference)))
    return row


def damage_latest(out: dict, how: str) -> str:
    """Damage the run's latest checkpoint: ``truncate`` its largest file, or ``manifest`` (delete it)."""
    ckpt = Path(out["checkpoint"])
    if how == "manifest":
        (ckpt / "manifest.json").unlink()
        return f"{ckpt.name}/manifest.json deleted"
    files = [p for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json"]
    big = max(files, key=lambda p: p.stat().st_size)
    data = big.read_bytes()
    big.write_bytes(data[: len(data) // 2])
    return f"{big.relative_to(ckpt.parent)} truncated to half"


def with_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    return build(TrainConfig, apply_overrides(to_dict(cfg), overrides))


def actor_faults(base: TrainConfig, root: Path, progress: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """The reference run and the actor / learner / checkpoint faults on ``base``; returns rows and the
    reference result."""
    rows = []
    ref, ref_s, err = run(with_overrides(base, [f"--output_dir={root / 'reference'}"]))
    if ref is None:
        raise RuntimeError(f"the undisturbed reference run failed: {err}")
    rows.append(record("none (reference)", "-", ref, ref_s, err, None, None))
    progress(f"  reference: {ref_s:.0f} s")
    cases = [("sampler killed at the weight sync", "sampler:1:2:sync", None),
             ("sampler killed while sampling", "sampler:0:3:sample", None),
             ("reward actor killed while scoring", "reward:0:2:score", None),
             ("learner killed after the iteration-4 checkpoint", "learner:0:4:step", 4),
             ("learner killed between checkpoints (iteration 3)", "learner:0:3:step", 3)]
    for name, spec, crashed_at in cases:
        tag = spec.replace(":", "_")
        with crashes(spec, root / "markers" / tag):
            out, s, err = run(with_overrides(base, [f"--output_dir={root / tag}"]))
        rows.append(record(name, spec, out, s, err, ref, ref_s, crashed_at))
        progress(f"  {name}: {'finished' if out else 'FAILED'} in {s:.0f} s")
    for how, label in (("truncate", "latest checkpoint damaged, then --resume"),
                       ("manifest", "latest checkpoint's manifest deleted, then --resume")):
        folder = root / f"corrupt-{how}"
        first, _, err = run(with_overrides(base, [f"--output_dir={folder}"]))
        if first is None:
            rows.append(record(label, how, None, 0, err, ref, ref_s))
            continue
        injected = damage_latest(first, how)
        longer = with_overrides(base, [f"--output_dir={folder}", f"--train.iterations={base.train.iterations + 2}"])
        out, s, err = run(longer, resume=True)
        row = record(label, injected, out, s, err, None, None)
        row["redone"] = base.train.iterations - lineage(folder)[-1][1] if out else None
        rows.append(row)
        progress(f"  {label}: {'finished' if out else 'FAILED'} in {s:.0f} s, restored {row.get('restored')}")
    return rows, ref


def _verified_iteration(root: Path, verified: dict[Path, int]) -> int:
    """The newest iteration among the checkpoint folders under ``root`` whose manifest verifies (0: none);
    ``verified`` remembers the folders already checked, so each is hashed until it verifies, not on every poll."""
    from rlr_dist import storage

    for folder in root.glob("*/checkpoint_*"):
        if folder in verified:
            continue
        try:
            verified[folder] = int(storage.verify_manifest(folder).get("iteration", 0))
        except (storage.StorageError, OSError, ValueError):
            continue  # still being written
    return max(verified.values(), default=0)


def interrupt_then_resume(config: str, overrides: list[str], root: Path, after_iteration: int = 2) -> dict:
    """SIGINT to an ``rlr-dist train`` process once its checkpoint of ``after_iteration`` verifies, then ``--resume``."""
    out_dir = root / "interrupted"
    argv = [sys.executable, "-m", "rlr_dist.cli", "train", config, *overrides, f"--output_dir={out_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    # SIGINT back to its default in the child, as for a command typed in a terminal: a process started in the
    # background by a non-interactive shell (`cmd &`, as a CI runner may start the suite) ignores SIGINT, its
    # children inherit that, and Python then installs no Ctrl-C handler (a clean-clone run went through all 12
    # iterations, the signal ignored)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Signal once a checkpoint of iteration >= after_iteration verifies on disk (written on this machine as the
    # iterations end). Not on the "[iter N/" line: it is printed before that iteration's checkpoint is written
    # (a Ctrl-C right after it resumes one iteration earlier), and it comes through Ray's log forwarding, which on
    # a loaded machine lagged a whole run (a CI run printed all 12 lines after the last iteration).
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    verified: dict[Path, int] = {}
    while proc.poll() is None:
        if _verified_iteration(out_dir / "checkpoints", verified) >= after_iteration:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    proc.wait(timeout=300)
    reader.join(timeout=30)
    stopped = time.perf_counter()
    from mlflow.tracking import MlflowClient

    run_file = json.loads((out_dir / "run.json").read_text())
    client = MlflowClient(run_file["tracking_uri"])
    interrupted_status = client.get_run(run_file["run_id"]).info.status
    t1 = time.perf_counter()
    resumed = subprocess.run(argv + ["--resume"], capture_output=True, text=True, env=env, timeout=900)
    status = client.get_run(run_file["run_id"]).info.status
    hist = history({"tracking_uri": run_file["tracking_uri"], "run_id": run_file["run_id"]})
    return {"exit_code": proc.returncode, "printed": "".join(lines), "stop_s": round(stopped - t0, 1),
            "status_after_interrupt": interrupted_status,
            "resume_exit_code": resumed.returncode, "resume_s": round(time.perf_counter() - t1, 1),
            "status_after_resume": status, "duplicates": duplicates(hist),
            "steps": sorted({s for s, _ in hist.get("reward/mean", [])}), "lineage": lineage(out_dir),
            "resume_output": resumed.stdout + resumed.stderr}


BAD_INPUTS = [  # (what, argv after `rlr-dist`, the field or file the error must name)
    ("reward parameter out of range", ["train", "{config}", "--reward.target=11"], "reward.target"),
    ("override of the wrong type (int)", ["train", "{config}", "--estimator.h=two"], "estimator.h"),
    ("override of the wrong type (number)", ["train", "{config}", "--regulariser.beta=abc"], "regulariser.beta"),
    ("unknown estimator parameter", ["train", "{config}", "--estimator.hh=2"], "estimator.hh"),
    ("a reward file that does not exist", ["train", "{config}", "--reward.path=/no/such/classifier"], "reward.path"),
    ("checkpoint bucket with no S3 server", ["train", "{config}", "--checkpoint.dir=s3://no-such-bucket/ckpt"],
     "checkpoint.dir"),
    ("output_dir that cannot be written", ["train", "{config}", "--output_dir=/proc/rlr-dist-x"], "output_dir"),
    ("a directory given as the config", ["train", "{dir}"], "is a directory"),
    ("an empty config file", ["train", "{empty}"], "is empty"),
    ("sample from a folder that is not a model", ["sample", "{dir}", "--n", "2"], "not a diffusers model folder"),
    ("eval with --params that is not YAML", ["eval", "toy:digits", "--params", "{target: 3"], "--params"),
]


def bad_inputs(config: str, root: Path) -> list[dict]:
    """Each bad input through the CLI in this process, with Ray's start patched to fail loudly."""
    import ray

    from rlr_dist import cli

    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.yaml").write_text("# nothing set\n")
    (root / "not-a-model").mkdir(exist_ok=True)
    subs = {"{config}": config, "{dir}": str(root / "not-a-model"), "{empty}": str(root / "empty.yaml")}
    rows = []
    real_init = ray.init
    started = []

    def no_ray(*a, **k):
        started.append(True)
        raise RuntimeError("Ray was started")

    ray.init = no_ray
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for what, argv, field in BAD_INPUTS:
            argv = [subs.get(a, a) for a in argv]
            if argv[0] == "train" and not any(a.startswith("--output_dir") for a in argv):
                argv.append(f"--output_dir={root / 'out'}")
            err = io.StringIO()
            started.clear()
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = cli.main(argv)
                except SystemExit as e:
                    code = e.code
                except Exception as e:  # noqa: BLE001 - a traceback is a defect: recorded as such
                    code, err = "traceback", io.StringIO(f"{type(e).__name__}: {e}")
            text = err.getvalue().strip()
            rows.append({"input": what, "exit_code": code, "seconds": round(time.perf_counter() - t0, 2),
                         "lines": len(text.splitlines()), "message": text.splitlines()[-1] if text else "",
                         "names_field": field in text, "ray_started": bool(started),
                         "wrote": sorted(p.name for p in (root / "out").iterdir()) if (root / "out").is_dir() else []})
            shutil.rmtree(root / "out", ignore_errors=True)
    finally:
        ray.init = real_init
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return rows


# ------------------------------------------------------------------------------------------- report
def main(config: str = "jobs/configs/digits.yaml", out: str | None = "docs/results/faults.md",
         workdir: str | None = None, progress: Callable[[str], None] = print) -> str:
    import tempfile

    import ray
    import torch

    root = Path(workdir or tempfile.mkdtemp(prefix="rlr-faults-"))
    t0 = time.perf_counter()
    progress(f"[faults] bad inputs ({len(BAD_INPUTS)}) ...")
    bad = bad_inputs(config, root / "bad")
    base = load_config(config, SMALL)
    progress("[faults] actor, learner and checkpoint faults on a local Ray cluster ...")
    if not ray.is_initialized():
        from rlr_dist.pipeline.run import start_or_join

        start_or_join(max(4, os.cpu_count() or 1))
    try:
        rows, _ = actor_faults(base, root / "runs", progress)
    finally:
        ray.shutdown()
    progress("[faults] SIGINT to rlr-dist train, then --resume ...")
    sig = interrupt_then_resume(config, SMALL, root / "sigint")
    lines = ["# Faults and bad inputs", "",
             f"`rlr-dist bench faults` ({config} with `{' '.join(SMALL)}`), {time.strftime('%Y-%m-%d')}, "
             f"{os.cpu_count()} CPUs, torch {torch.__version__}; {(time.perf_counter() - t0) / 60:.1f} min in all. "
             "Every fault run is compared with an undisturbed run of the same config (deterministic seeds).", "",
             "## Faults", "",
             "| fault | injected | finished | s | recovery s | actor restarts | calls re-run | learner restarts | "
             "iterations redone | restored from | duplicate MLflow points | reward/mean = reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fault']} | `{r['injected']}` | {'yes' if r['finished'] else 'NO: ' + r['error']} | "
                     f"{r['seconds']} | {r.get('recovery_s') if r.get('recovery_s') is not None else '-'} | "
                     f"{r.get('restarts_actors', '-')} | {r.get('calls_rerun', '-')} | {r.get('learner_restarts', '-')} | "
                     f"{r.get('redone', '-')} | {r.get('restored', '-')} | {r.get('duplicates', '-')} | "
                     f"{'-' if r.get('same_as_reference') is None else ('yes' if r['same_as_reference'] else 'no')} |")
    lines += ["", f"Driver SIGINT after iteration 2: exit code {sig['exit_code']} after {sig['stop_s']} s, run status "
              f"{sig['status_after_interrupt']}, "
              f"printed the resume command: {'yes' if '--resume' in sig['printed'] else 'no'}; `--resume` exit code "
              f"{sig['resume_exit_code']} in {sig['resume_s']} s, run status {sig['status_after_resume']}, logged steps "
              f"{sig['steps']}, duplicate points {sig['duplicates']}, lineage (attempt, start, restored) "
              f"{[(s, r) for _, s, r in sig['lineage']]}.", "",
              "## Bad inputs", "", "| input | exit code | s | lines printed | names the field | Ray started | files written | message |",
              "|---|---|---|---|---|---|---|---|"]
    for r in bad:
        msg = r["message"].replace("|", "\\|")[:160]
        lines.append(f"| {r['input']} | {r['exit_code']} | {r['seconds']} | {r['lines']} | "
                     f"{'yes' if r['names_field'] else 'NO'} | {'YES' if r['ray_started'] else 'no'} | "
                     f"{', '.join(r['wrote']) or 'none'} | {msg} |")
    text = "\n".join(lines) + "\n"
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        old = Path(out).read_text() if Path(out).is_file() else ""
        Path(out).write_text(merge_sections(old, text))
    return text


def sections(text: str) -> list[tuple[str, str]]:
    """``(heading, body)`` of each ``## `` section of a markdown text (the part before the first: heading "")."""
    out, head, body = [], "", []
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            out.append((head, "".join(body)))
            head, body = line.strip(), []
        else:
            body.append(line)
    out.append((head, "".join(body)))
    return out


def merge_sections(old: str, new: str, before: str = "## Bad inputs") -> str:
    """``new`` with the sections of ``old`` it does not write kept: sections ``new`` also has are replaced; the
    node-loss section (written by ``--nodes``) goes before ``before``, others (the hand-written reading) last."""
    fresh = sections(new)
    names = {h for h, _ in fresh}
    kept = [(h, b) for h, b in sections(old) if h and h not in names]
    nodes = [(h, b) for h, b in kept if h.startswith("## Node loss")]
    rest = [(h, b) for h, b in kept if not h.startswith("## Node loss")]
    merged = []
    for h, b in fresh:
        if h == before:
            merged += nodes
            nodes = []
        merged.append((h, b))
    merged += nodes + rest
    return "".join((h + "\n" if h else "") + b for h, b in merged)
