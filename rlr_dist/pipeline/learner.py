"""The Ray learner: a Ray Train worker running :func:`learner_loop` with a DeepSpeed engine (``engine.py``).

Each learner drives its own share of every iteration with a :class:`rlr_dist.train.learner.Learner` — the
same iteration skeleton the single-process loop runs. The work (plans included) is a deterministic function
of ``(seed, iteration)`` and of state every learner holds identically, so learner r sends chunks r, r+L, ...
to the sampler actors (:class:`~rlr_dist.pipeline.pools.ActorPools`), has the reward actors score them
(object refs passed actor to actor) and fetches only those chunks. No tensor goes through the driver or
another learner; only the small per-chunk summaries and the per-term loss / gradient-norm numbers are
all-gathered. Rank 0 also pushes weights to the samplers, evaluates, logs and writes pictures. One iteration:

    sync weights (version-stamped, verified) -> sample -> score -> learn (DeepSpeed, all ranks) -> log -> checkpoint

With ``train.overlap`` the samples of iteration i+1 are drawn while the learners step on i, from the
weights before that step (one step stale; the likelihood-ratio terms are then evaluated at θ_{i+1} on
samples of θ_i, a bias of order lr, not corrected — see docs/pipeline.md).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from rlr_dist.config import build
from rlr_dist.train.config import TrainConfig


def learner_loop(config: dict) -> None:
    """Ray Train worker function: a DeepSpeed learner driving its share of every iteration."""
    import ray.train
    import torch.distributed as dist

    from rlr_dist.models import load_model
    from rlr_dist.pipeline import engine as ds
    from rlr_dist.pipeline.pools import ActorPools
    from rlr_dist.pipeline.tracking import Tracker
    from rlr_dist.pipeline.workers import _device, _threads, maybe_crash, node_id, probe_output
    from rlr_dist.train import step
    from rlr_dist.train.learner import Learner

    _threads()
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per report otherwise
    try:  # Train V2 logs every report (all metrics) under a logger named by its file path
        from ray.train.v2._internal.execution import context as _train_ctx

        logging.getLogger(_train_ctx.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    cfg = build(TrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out_dir = Path(config["output_dir"])
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model, _device(cfg.cluster.learners.num_gpus))
    engine = ds.make_engine(cfg, model)
    core = Learner(cfg, model.schedule())
    start, elapsed_before, restored = 0, 0.0, "-"
    os.environ.update(config.get("env", {}))  # fault injection for tests / bench faults (RLR_DIST_CRASH)
    stored = ds.stored_checkpoints(config["checkpoints"])
    if stored:
        state, restored = ds.restore(engine, stored, cfg.checkpoint.on_corrupt == "fallback",
                                     say=print if rank == 0 else (lambda msg: None))
        start, elapsed_before = state["iteration"], state.get("elapsed", 0.0)
        core.load_state_dict(state["learner"] if "learner" in state else  # a checkpoint of rlr-dist <= 0.1
                             {"advantages": state["advantages"], "estimator": {"step_norm": state.get("step_norm", {})}})
        if rank == 0:
            print(f"[learner] resumed from the checkpoint of iteration {start}", flush=True)
    T = cfg.train.iterations
    pools = ActorPools(cfg, config["samplers"], config["rewards"], core.need_grad, rank, world, config.get("store"))
    tracker = Tracker(config["tracking_uri"], config["run_id"], once=True) if rank == 0 else None
    probe_prompt = core.prompts[0]

    def push_weights(version: int) -> float:
        """Rank 0 syncs the samplers to ``version``; every rank waits for it (barrier)."""
        with ds.gathered(engine, model):
            st = model.trained_state() if rank == 0 else None
        seconds = 0.0
        if rank == 0:
            probe = probe_output(model, probe_prompt) if engine.zero_optimization_stage() < 3 else None
            seconds = pools.sync(st, version, probe, ds.state_hash(st))
        pools.version = version
        if world > 1:
            dist.barrier()
        return seconds

    def gather(obj) -> list:
        if world == 1:
            return [obj]
        parts = [None] * world
        dist.all_gather_object(parts, obj)
        return parts

    nodes = gather(node_id())
    learner_starts = _count_start(out_dir, config.get("attempt", ""), start, restored, nodes) if rank == 0 else 1
    sync_s = push_weights(start)
    if rank == 0 and start == 0 and cfg.train.eval_every:  # the baseline every later number is compared with
        ev, grid = pools.evaluate(0, out_dir)
        tracker.metrics(ev, 0)
        tracker.artifact(grid, "samples")
        print("[before training] " + ", ".join(f"{k} {v:.3f}" for k, v in ev.items()), flush=True)
    pending = pools.submit(core.works(start, pools.chunks), start) if start < T else None
    t_loop = time.perf_counter()
    for it in range(start, T):
        t_it = time.perf_counter()
        mine, summaries = pools.collect(pending)
        if cfg.train.overlap and it + 1 < T:
            pending = pools.submit(core.works(it + 1, pools.chunks), it)  # drawn with the weights before this step
        t_wait = time.perf_counter() - t_it
        every = [s for part in gather(summaries) for s in part]
        t_learn = time.perf_counter()
        # engine.step between the phases of an estimator that steps several times per iteration (rlr_release)
        terms = core.learn(model, mine, every, backward=engine.backward, optimizer_step=engine.step)
        summed: dict[str, float] = {}
        for part in gather(terms):
            for k, v in part.items():
                summed[k] = summed.get(k, 0.0) + v
        gnorm = step.grad_norm(model.trainable_parameters()) if engine.zero_optimization_stage() == 0 else None
        engine.step()
        gnorm = engine.get_global_grad_norm() if gnorm is None else gnorm  # ZeRO: DeepSpeed's (pre-clip) norm
        learn_s = time.perf_counter() - t_learn
        metrics = core.finish(it, every, summed, gnorm, gather(core.estimator.take_records()))
        retries = sum(gather(pools.retries))
        pools.retries = 0
        if rank == 0:
            seen = {k: v for sm in every for k, v in sm.get("actors", {}).items()}
            restarts, retries_total = pools.note(seen, retries)
        sync_s = push_weights(it + 1)
        if not cfg.train.overlap and it + 1 < T:
            pending = pools.submit(core.works(it + 1, pools.chunks), it + 1)
        if rank == 0:
            metrics.update({"time/wait_samples": t_wait, "time/sync": sync_s, "time/learn": learn_s,
                            "time/iteration": time.perf_counter() - t_it,
                            "samples_per_s": metrics["samples"] / (time.perf_counter() - t_it),
                            "weights_version": it + 1, "restarts/actors": restarts,
                            "restarts/calls_rerun": retries_total, "restarts/learners": learner_starts - 1})
            for phase, n in (("sample", len(pools.samplers)), ("score", len(pools.rewards))):  # busy s per actor
                metrics[f"time/{phase}"] = sum(s["stats"].get(f"time/{phase}", 0.0) for s in every) / n
            if cfg.train.eval_every and ((it + 1) % cfg.train.eval_every == 0 or it + 1 == T):
                ev, grid = pools.evaluate(it + 1, out_dir)
                metrics.update(ev)
                tracker.artifact(grid, "samples")
            tracker.metrics(metrics, it + 1)
            _progress(it + 1, start, T, metrics, time.perf_counter() - t_loop)
        _checkpoint(cfg, engine, it, T, rank, core, elapsed_before + time.perf_counter() - t_loop, metrics)
        maybe_crash("learner", rank, it + 1, "step")  # fault injection: a learner lost after iteration it + 1

    if cfg.export and start < T:
        with ds.gathered(engine, model):
            if rank == 0:
                model.export(cfg.export)
                print(f"[learner] exported the fine-tuned model to {cfg.export}", flush=True)


STARTS_FILE = "learner_starts.log"


def _count_start(out_dir: Path, attempt: str, start: int, restored: str, nodes: list[str]) -> int:
    """Record that the learner group (re)started for the driver's ``attempt`` (one ``rlr-dist train`` call)
    at iteration ``start`` from checkpoint ``restored`` (``-``: none), with the node of every rank — the run's
    lineage; returns how many times it has started in this attempt (1: never restarted)."""
    path = out_dir / STARTS_FILE
    with path.open("a") as f:
        f.write(f"{attempt} {start} {restored} {time.strftime('%Y-%m-%dT%H:%M:%S')} {','.join(nodes) or '-'}\n")
    n = sum(1 for line in path.read_text().splitlines() if line.split(" ", 1)[0] == attempt)
    if n > 1:
        print(f"[learner] the learner group restarted ({n - 1} time(s) in this run); continuing at iteration {start}",
              flush=True)
    return n


def _checkpoint(cfg, engine, it, T, rank, core, elapsed, metrics) -> None:
    import ray.train

    from rlr_dist.pipeline import engine as ds

    every = cfg.checkpoint.every
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if not (it + 1 == T or (every and (it + 1) % every == 0)):
        ray.train.report(clean)
        return
    with tempfile.TemporaryDirectory() as d:
        state = {"iteration": it + 1, "elapsed": elapsed, "learner": core.state_dict(), "seed": cfg.train.seed}
        ds.save(engine, Path(d), state, rank)
        ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(d))


def _progress(done: int, start: int, total: int, m: dict, elapsed: float) -> None:
    rate = (done - start) / max(elapsed, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    extra = "".join(f" | {k} {m[k]:.3f}" for k in ("kl/sampled", "eval/heldout") if k in m)
    print(f"[iter {done}/{total}] reward {m['reward/mean']:.3f} ± {m['reward/std']:.3f}{extra} "
          f"| {m['time/iteration']:.2f} s/it, ETA {eta:.0f} s", flush=True)
