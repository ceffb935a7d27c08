"""`rlr-dist bench pipeline`: the Ray pipeline against the single-process loop doing identical work.

Both run the same config, seeds and chunking (``rlr_dist.train.step.iteration_work``), so they sample the
same trajectories, see the same rewards and take the same optimiser steps; the report checks that by
comparing the per-iteration reward means. Two layouts are measured, each against its own reference:

* **serial** — 1 sampler, 1 reward actor, 1 learner: the same compute as the single-process loop on one
  thread. The difference is the pipeline's overhead: actor calls, object transfers, DeepSpeed's engine,
  the all-gather, the verified weight sync and Ray Train's reporting.
* **parallel** — the config's own pool sizes (e.g. 2 samplers, 2 learners), against the single-process
  loop given as many threads as the pool has CPUs.

Throughput is measured in steady state: trajectories over the wall time between the end of iteration
``warmup`` and the end of the last one (MLflow metric timestamps for the pipeline, a clock for the loop);
start-up (Ray, actors, DeepSpeed) is reported apart. Evaluation and intermediate checkpoints are off.
"""
from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from rlr_dist.train.config import TrainConfig, load_config

PHASES = ("time/sample", "time/score", "time/learn", "time/sync", "time/wait_samples", "time/iteration")


def _configure(config: str, overrides: list[str], iterations: int, out_dir: str, layout: str) -> TrainConfig:
    extra = [f"--train.iterations={iterations}", "--train.eval_every=0", "--checkpoint.every=0", "--export=null",
             f"--output_dir={out_dir}", "--tracking.experiment=bench-pipeline"]
    if layout == "serial":
        extra += [f"--cluster.{r}.count=1" for r in ("samplers", "rewards", "learners")]
    return load_config(config, list(overrides) + extra)


def _pool_cpus(cfg: TrainConfig) -> int:
    c = cfg.cluster
    return max(1, round(sum(r.count * r.num_cpus for r in (c.samplers, c.rewards, c.learners))))


def run_local(cfg: TrainConfig, threads: int, warmup: int) -> dict:
    from rlr_dist.train.local import train_local

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    ends: list[float] = []
    t0 = time.perf_counter()
    try:
        _, hist = train_local(cfg, on_iteration=lambda i, s: ends.append(time.perf_counter()))
    finally:
        torch.set_num_threads(old)
    steady = hist[warmup:]
    n = sum(h["samples"] for h in steady)
    return {"traj_per_s": n / (ends[-1] - ends[warmup - 1] if warmup else ends[-1] - t0),
            "wall": time.perf_counter() - t0, "startup": 0.0,
            "phases": {k: statistics.median(h[k] for h in steady) for k in PHASES if k in steady[0]},
            "rewards": [h["reward/mean"] for h in hist]}


def run_ray(cfg: TrainConfig, warmup: int) -> dict:
    from mlflow.tracking import MlflowClient

    from rlr_dist.pipeline.run import train

    t0, t_epoch = time.perf_counter(), time.time()
    out = train(cfg)
    wall = time.perf_counter() - t0
    client = MlflowClient(out["tracking_uri"])

    def history(key: str) -> list:
        return sorted(client.get_metric_history(out["run_id"], key), key=lambda m: m.step)

    it = history("time/iteration")
    rewards = [m.value for m in history("reward/mean")]
    ends = [m.timestamp / 1000 for m in it]
    per_it = cfg.train.batch_size
    steps = len(ends) - warmup
    rate = per_it * steps / (ends[-1] - ends[warmup - 1]) if warmup else per_it * len(ends) / wall
    startup = ends[0] - it[0].value - t_epoch  # Ray, actors, Ray Train workers, DeepSpeed, first weight sync
    phases = {}
    for k in PHASES:
        h = history(k)[warmup:]
        if h:
            phases[k] = statistics.median(m.value for m in h)
    return {"traj_per_s": rate, "wall": wall, "startup": startup, "phases": phases, "rewards": rewards}


def main(config: str = "jobs/configs/digits.yaml", overrides: list[str] | None = None, iterations: int = 8,
         warmup: int = 2, layouts: tuple[str, ...] = ("serial", "parallel"), out: str | None = None) -> str:
    import ray

    overrides = list(overrides or [])
    if not 1 <= warmup < iterations:
        raise ValueError(f"--warmup must be in [1, iterations), got {warmup} with {iterations} iterations")
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlr-bench-") as tmp:
        for layout in layouts:
            cfg = _configure(config, overrides, iterations, str(Path(tmp) / layout), layout)
            threads = _pool_cpus(cfg) if layout == "parallel" else 1
            print(f"[bench pipeline] {layout}: single-process loop ({threads} thread(s)) ...", flush=True)
            local = run_local(cfg, threads, warmup)
            print(f"[bench pipeline] {layout}: Ray pipeline ({cfg.cluster.samplers.count} samplers, "
                  f"{cfg.cluster.rewards.count} reward, {cfg.cluster.learners.count} learners) ...", flush=True)
            dist = run_ray(cfg, warmup)
            ray.shutdown()
            same = max(abs(a - b) for a, b in zip(local["rewards"], dist["rewards"]))
            rows.append((layout, cfg, threads, local, dist, same))
    text = report(rows, config, overrides, iterations, warmup)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text


def report(rows, config, overrides, iterations, warmup) -> str:
    cfg0 = rows[0][1]
    lines = [
        "# Pipeline overhead: Ray pipeline vs single-process loop", "",
        f"`rlr-dist bench pipeline --config {config}"
        + "".join(f" {o}" for o in overrides) + f" --iterations {iterations} --warmup {warmup}` — {date.today()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}.", "",
        f"Work per iteration: {cfg0.train.batch_size} trajectories × {cfg0.model.num_inference_steps} steps of "
        f"`{cfg0.model.path}` ({cfg0.model.finetune}), estimator `{cfg0.estimator}`, regulariser "
        f"`{cfg0.regulariser}`. Steady state = iterations {warmup + 1}–{iterations}; evaluation and intermediate "
        "checkpoints off. Same seeds and chunking on both sides: |Δ reward mean| is the largest difference of "
        "the per-iteration reward means (identical work ⇒ float noise).", "",
        "| layout | pool | loop threads | loop traj/s | pipeline traj/s | overhead | start-up s | |Δ reward mean| |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layout, cfg, threads, local, dist, same in rows:
        c = cfg.cluster
        over = local["traj_per_s"] / dist["traj_per_s"] - 1
        lines.append(f"| {layout} | {c.samplers.count}S/{c.rewards.count}R/{c.learners.count}L | {threads} | "
                     f"{local['traj_per_s']:.2f} | {dist['traj_per_s']:.2f} | {over:+.1%} | {dist['startup']:.1f} | "
                     f"{same:.1e} |")
    lines += ["", "Overhead = loop throughput / pipeline throughput − 1 (negative: the pipeline is faster).", "",
              "Per-phase medians (seconds per iteration; pipeline: sampler/reward busy time per actor, learner "
              "wall time; `wait_samples` is the learner waiting for its chunks, `sync` the verified weight push):", "",
              "| layout | side | " + " | ".join(k.split("/")[1] for k in PHASES) + " |",
              "|---|---|" + "---|" * len(PHASES)]
    for layout, _, _, local, dist, _ in rows:
        for side, r in (("loop", local), ("pipeline", dist)):
            cells = [f"{r['phases'][k]:.3f}" if k in r["phases"] else "–" for k in PHASES]
            lines.append(f"| {layout} | {side} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
