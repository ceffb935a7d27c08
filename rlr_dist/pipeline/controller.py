"""The training loop of the distributed pipeline — where one iteration happens.

Every learner is a Ray Train worker running :func:`learner_loop` with a DeepSpeed engine, and each one
drives its own share of the iteration: the work is a deterministic function of ``(seed, iteration)``, so
learner r sends chunks r, r+L, ... to the sampler actors, has the reward actors score them (object refs
passed actor to actor) and fetches only those chunks. No tensor goes through the driver or another
learner; only the small per-chunk summaries (rewards, prompt ids) are all-gathered for the advantages.
Rank 0 also pushes weights to the samplers, evaluates, logs and writes pictures. One iteration:

    sync weights (version-stamped, verified) -> sample -> score -> learn (DeepSpeed, all ranks) -> log -> checkpoint

With ``train.overlap`` the samples of iteration i+1 are drawn while the learners step on i, from the
weights before that step (one step stale; the likelihood-ratio terms are then evaluated at θ_{i+1} on
samples of θ_i, a bias of order lr, not corrected — see docs/pipeline.md).
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlr_dist.config import build
from rlr_dist.train import step
from rlr_dist.train.config import TrainConfig


class WeightSyncError(RuntimeError):
    """A sampler's weights differ from the learner's after a sync."""


@dataclass
class Pending:
    """This learner's chunks of one iteration in flight: refs of the chunks and of their summaries."""

    iteration: int
    jobs: dict = field(default_factory=dict)  # chunk index -> (work, version, chunk ref, summary ref)


class Controller:
    """A learner's handle on the sampler and reward pools (every rank has one; rank 0 also syncs)."""

    def __init__(self, cfg: TrainConfig, samplers: list, rewards: list, need_grad: bool, rank: int = 0,
                 world: int = 1, store=None):
        self.cfg, self.samplers, self.rewards, self.need_grad = cfg, samplers, rewards, need_grad
        self.store = store
        self.rank, self.world = rank, world
        self.prompts = cfg.data.load_prompts()
        self.version = 0
        self.state_ref = None
        self.restarts = 0

    # ------------------------------------------------------------------ weights (rank 0)
    def sync(self, state: dict, version: int, probe: torch.Tensor | None, want_hash: str) -> float:
        """Push ``state`` to every sampler and check that each loaded it (hash) and predicts like the
        learner (probe). Returns the seconds taken."""
        import ray

        t0 = time.perf_counter()
        self.state_ref = ray.put(state)
        self.version = version
        if self.store is not None:
            ray.get(self.store.put.remote([self.state_ref], version))
        results = ray.get([s.set_weights.remote(self.state_ref, version) for s in self.samplers])
        for i, (got_hash, got_probe) in enumerate(results):
            if got_hash != want_hash:
                raise WeightSyncError(f"sampler {i}: weights v{version} hash {got_hash[:12]} != learner's "
                                      f"{want_hash[:12]}")
            if probe is not None and not torch.allclose(got_probe, probe, rtol=1e-4, atol=1e-5):
                err = float((got_probe - probe).abs().max())
                raise WeightSyncError(f"sampler {i}: probe prediction differs from the learner's by {err:.3g} "
                                      f"at v{version}")
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ sampling and scoring
    def submit(self, iteration: int, version: int) -> Pending:
        t = self.cfg.train
        works = step.iteration_work(self.prompts, iteration, t.seed, t.prompts_per_iteration, t.samples_per_prompt,
                                    max(len(self.samplers), self.world))
        p = Pending(iteration)
        for j in range(self.rank, len(works), self.world):
            self._submit_one(p, j, works[j], version)
        return p

    def _submit_one(self, p: Pending, j: int, work: step.Work, version: int) -> None:
        sampler = self.samplers[j % len(self.samplers)]
        reward = self.rewards[j % len(self.rewards)]
        chunk = sampler.sample.remote(work, version)
        c, s = reward.score_and_summarise.options(num_returns=2).remote(chunk, self.need_grad)
        p.jobs[j] = (work, version, c, s)

    def collect(self, p: Pending) -> tuple[list, list[dict]]:
        """This learner's scored chunks and their summaries. A failed call (an actor died and restarted, or
        lost its weights) is re-run with the same work and seed, so no sample is counted twice."""
        import ray

        tries = max(self.cfg.cluster.samplers.max_restarts, self.cfg.cluster.rewards.max_restarts, 1)
        chunks, summaries = [], []
        for j in sorted(p.jobs):
            for attempt in range(tries + 1):
                work, version, c, s = p.jobs[j]
                try:
                    summaries.append(ray.get(s))
                    chunks.append(ray.get(c))
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError,
                        ray.exceptions.ActorUnavailableError) as e:
                    if attempt == tries or not _retryable(e):
                        raise
                    self.restarts += 1
                    time.sleep(1.0)
                    print(f"[learner {self.rank}] chunk {j} of iteration {p.iteration} failed ({type(e).__name__}); "
                          f"retrying ({attempt + 1}/{tries})", flush=True)
                    _wait_alive(self.samplers[j % len(self.samplers)])  # restarted: it pulls weights itself
                    self._submit_one(p, j, work, version)
        return chunks, summaries

    # ------------------------------------------------------------------ evaluation (rank 0)
    def evaluate(self, iteration: int, out_dir: Path) -> tuple[dict, Path]:
        """Training reward and held-out evaluator on fresh samples from fixed seeds, and a sample grid."""
        import ray

        from rlr_dist.pipeline.pictures import save_samples

        prompts = self.cfg.data.eval_prompts or self.prompts
        per = [prompts[i % len(prompts)] for i in range(self.cfg.train.eval_samples)]
        n = len(self.samplers)
        parts = [(i, per[i::n]) for i in range(n) if per[i::n]]
        x0 = torch.cat(ray.get([self.samplers[i].sample_final.remote(c, 10_000 + i) for i, c in parts]))
        order = [p for _, c in parts for p in c]
        metrics = ray.get(self.rewards[0].evaluate.remote(x0, order))
        images = ray.get(self.rewards[0].images.remote(x0[:32]))
        return metrics, save_samples(images, out_dir / "samples" / f"iter_{iteration:05d}")


def _retryable(e: Exception) -> bool:
    import ray

    lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
    if isinstance(e, ray.exceptions.RayTaskError):  # the reward call failed because its sampler input did
        return "StaleWeights" in str(e) or isinstance(e.cause, lost)
    return True


def _wait_alive(actor, timeout: float = 180.0) -> int:
    """Block until ``actor`` answers again (after a restart); returns its weight version."""
    import ray

    t0 = time.time()
    while True:
        try:
            return ray.get(actor.get_version.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            if time.time() - t0 > timeout:
                raise
            time.sleep(0.5)


# ====================================================================================== the learner loop
def learner_loop(config: dict) -> None:
    """Ray Train worker function: a DeepSpeed learner driving its share of every iteration."""
    import ray.train
    import torch.distributed as dist

    from rlr_dist.estimators import Advantages
    from rlr_dist.models import load_model
    from rlr_dist.pipeline import learner
    from rlr_dist.pipeline.tracking import Tracker
    from rlr_dist.pipeline.workers import _device, _threads, probe_output

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
    engine = learner.make_engine(cfg, model)
    estimator, regulariser = cfg.make_estimator(), cfg.make_regulariser()
    advantages = Advantages(cfg.train.advantage_baseline, cfg.train.advantage_scale)
    start, elapsed_before = 0, 0.0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = learner.load(engine, Path(d))
        start, elapsed_before = state["iteration"], state.get("elapsed", 0.0)
        advantages.load_state_dict(state["advantages"])
        estimator.step_norm = {int(k): v for k, v in state.get("step_norm", {}).items()}
        if rank == 0:
            print(f"[learner] resumed from the checkpoint of iteration {start}", flush=True)
    T = cfg.train.iterations
    ctl = Controller(cfg, config["samplers"], config["rewards"], estimator.needs_reward_grad, rank, world,
                     config.get("store"))
    tracker = Tracker(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    probe_prompt = cfg.data.load_prompts()[0]

    def push_weights(version: int) -> float:
        """Rank 0 syncs the samplers to ``version``; every rank waits for it (barrier)."""
        with learner.gathered(engine, model):
            st = model.trained_state() if rank == 0 else None
        seconds = 0.0
        if rank == 0:
            probe = probe_output(model, probe_prompt) if engine.zero_optimization_stage() < 3 else None
            seconds = ctl.sync(st, version, probe, learner.state_hash(st))
        ctl.version = version
        if world > 1:
            dist.barrier()
        return seconds

    sync_s = push_weights(start)
    if rank == 0 and start == 0 and cfg.train.eval_every:  # the baseline every later number is compared with
        ev, grid = ctl.evaluate(0, out_dir)
        tracker.metrics(ev, 0)
        tracker.artifact(grid, "samples")
        print("[before training] " + ", ".join(f"{k} {v:.3f}" for k, v in ev.items()), flush=True)
    pending = ctl.submit(start, start) if start < T else None
    t_loop = time.perf_counter()
    for it in range(start, T):
        t_it = time.perf_counter()
        mine, summaries = ctl.collect(pending)
        if cfg.train.overlap and it + 1 < T:
            pending = ctl.submit(it + 1, it)  # drawn with the weights before this step
        t_wait = time.perf_counter() - t_it
        parts = [(summaries, ctl.restarts)]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, (summaries, ctl.restarts))
        every = [s for part, _ in parts for s in part]
        restarts = sum(r for _, r in parts)
        all_R = torch.cat([s["reward"] for s in every])
        stats = step.learn(model, estimator, regulariser, advantages, mine, backward=engine.backward,
                           all_rewards=all_R)
        gnorm = step.grad_norm(model.trainable_parameters()) if engine.zero_optimization_stage() == 0 else None
        engine.step()
        advantages.update(all_R, torch.cat([s["prompt_ids"] for s in every]))
        gnorm = engine.get_global_grad_norm() if gnorm is None else gnorm  # ZeRO: DeepSpeed's (pre-clip) norm
        sync_s = push_weights(it + 1)
        if not cfg.train.overlap and it + 1 < T:
            pending = ctl.submit(it + 1, it + 1)
        metrics = {}
        if rank == 0:
            metrics = {**stats, "reward/mean": float(all_R.mean()),
                       "reward/std": float(all_R.std()) if len(all_R) > 1 else 0.0,
                       "grad_norm": float(gnorm) if gnorm is not None else float("nan"),
                       "time/wait_samples": t_wait, "time/sync": sync_s,
                       "time/iteration": time.perf_counter() - t_it,
                       "samples_per_s": len(all_R) / (time.perf_counter() - t_it), "weights_version": it + 1,
                       "actor_restarts": restarts,
                       "reward/dropped": sum(s["stats"].get("reward/dropped", 0.0) for s in every)}
            for phase, n in (("sample", len(ctl.samplers)), ("score", len(ctl.rewards))):  # busy s per actor
                metrics[f"time/{phase}"] = sum(s["stats"].get(f"time/{phase}", 0.0) for s in every) / n
            kl = [s["kl"] for s in every if s["kl"] is not None]
            if kl:
                metrics["kl/sampled"] = float(torch.cat(kl).double().mean())
            if cfg.train.eval_every and ((it + 1) % cfg.train.eval_every == 0 or it + 1 == T):
                ev, grid = ctl.evaluate(it + 1, out_dir)
                metrics.update(ev)
                tracker.artifact(grid, "samples")
            tracker.metrics(metrics, it + 1)
            _progress(it + 1, start, T, metrics, time.perf_counter() - t_loop)
        _checkpoint(cfg, engine, it, T, rank, advantages, estimator, elapsed_before + time.perf_counter() - t_loop,
                    metrics)

    if cfg.export and start < T:
        with learner.gathered(engine, model):
            if rank == 0:
                model.export(cfg.export)
                print(f"[learner] exported the fine-tuned model to {cfg.export}", flush=True)


def _checkpoint(cfg, engine, it, T, rank, advantages, estimator, elapsed, metrics) -> None:
    import ray.train

    from rlr_dist.pipeline import learner

    every = cfg.checkpoint.every
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if not (it + 1 == T or (every and (it + 1) % every == 0)):
        ray.train.report(clean)
        return
    with tempfile.TemporaryDirectory() as d:
        state = {"iteration": it + 1, "elapsed": elapsed, "advantages": advantages.state_dict(),
                 "step_norm": estimator.step_norm, "seed": cfg.train.seed}
        learner.save(engine, Path(d), state, rank)
        ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(d))


def _progress(done: int, start: int, total: int, m: dict, elapsed: float) -> None:
    rate = (done - start) / max(elapsed, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    extra = "".join(f" | {k} {m[k]:.3f}" for k in ("kl/sampled", "eval/heldout") if k in m)
    print(f"[iter {done}/{total}] reward {m['reward/mean']:.3f} ± {m['reward/std']:.3f}{extra} "
          f"| {m['time/iteration']:.2f} s/it, ETA {eta:.0f} s", flush=True)
