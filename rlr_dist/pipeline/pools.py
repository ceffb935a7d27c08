"""A learner's handle on the actor pools: push weights to the samplers, send them work, collect scored chunks.

Every learner has one. Work goes sampler -> reward actor as an object ref (the chunk never passes through
a learner until the learner fetches its own share); only small summaries are fetched by every learner.
An actor that dies is restarted by Ray (``cluster.*.max_restarts``); wherever its death is seen — at the
weight sync, at sampling or at scoring — the call is re-run (the sync re-pushes the weights; a chunk is
redone with the same work and seed, so no sample is counted twice or lost) within the roles' restart
budget, a line says so, and the learners carry on: an actor's death never restarts them. Restarts are
counted from each actor's *incarnation* (an id it draws when it starts), so a restart between two calls,
which no call sees fail, is counted too.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from rlr_dist.train import step
from rlr_dist.train.config import TrainConfig


class WeightSyncError(RuntimeError):
    """A sampler's weights differ from the learner's after a sync."""


@dataclass
class Pending:
    """This learner's chunks of one iteration in flight: refs of the chunks, of their scores and of their summaries."""

    iteration: int
    jobs: dict = field(default_factory=dict)  # chunk index -> (work, version, chunk, scores and summary refs)


class ActorPools:
    def __init__(self, cfg: TrainConfig, samplers: list, rewards: list, need_grad: bool, rank: int = 0,
                 world: int = 1, store=None):
        self.cfg, self.samplers, self.rewards, self.need_grad = cfg, samplers, rewards, need_grad
        self.store = store
        self.rank, self.world = rank, world
        self.version = 0
        self.state_ref = None
        self.retries = 0                     # calls re-run because an actor died under them
        self.restarts = 0                    # actor processes seen to have restarted (incarnation changed)
        self.incarnations: dict[str, str] = {}

    @property
    def chunks(self) -> int:
        """Sampler calls per iteration (as :func:`rlr_dist.train.local.chunks_per_iteration`)."""
        return max(len(self.samplers), self.world)

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
        # every sampler loads at once (a serial push was the first bottleneck at 32 samplers: docs/results/scale.md)
        calls = [s.set_weights.remote(self.state_ref, version) for s in self.samplers]
        results = [self._sync_one(i, version, call) for i, call in enumerate(calls)]
        for i, (got_hash, got_probe, incarnation) in enumerate(results):
            self.note({f"sampler/{i}": incarnation})
            if got_hash != want_hash:
                raise WeightSyncError(f"sampler {i}: weights v{version} hash {got_hash[:12]} != learner's "
                                      f"{want_hash[:12]}")
            if probe is not None and not torch.allclose(got_probe, probe, rtol=1e-4, atol=1e-5):
                err = float((got_probe - probe).abs().max())
                raise WeightSyncError(f"sampler {i}: probe prediction differs from the learner's by {err:.3g} "
                                      f"at v{version}")
        return time.perf_counter() - t0

    def _sync_one(self, i: int, version: int, call=None):
        """Sampler ``i``'s answer to the push (``call``, already in flight), pushing again if it died."""
        import ray

        budget = max(self.cfg.cluster.samplers.max_restarts, 1)
        for attempt in range(budget + 1):
            try:
                if call is None:
                    call = self.samplers[i].set_weights.remote(self.state_ref, version)
                return ray.get(call)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                if attempt == budget:
                    raise
                self.retries += 1
                print(f"[learner] sampler {i} died at the weight sync of v{version} ({type(e).__name__}); "
                      f"pushing the weights again once it is back ({attempt + 1}/{budget})", flush=True)
                _wait_alive(self.samplers[i])
                call = None

    def note(self, actors: dict[str, str], retries: int = 0) -> tuple[int, int]:
        """Record the incarnations actors reported (a changed one is a restart: counted, and said) and calls
        re-run; the totals of the run so far (kept by the weight store, so they outlive a learner restart)."""
        import ray

        if self.store is not None:
            new, self.restarts, total_retries = ray.get(self.store.note.remote(actors, retries))
        else:
            new = [n for n, inc in actors.items() if self.incarnations.get(n, inc) != inc]
            self.incarnations.update(actors)
            self.restarts += len(new)
            total_retries = retries
        for name in new:
            node = actors[name].partition("@")[2][:8] or "?"
            print(f"[learner] {name.replace('/', ' ')} restarted (a new process, on node {node}); the run goes on",
                  flush=True)
        return self.restarts, total_retries

    # ------------------------------------------------------------------ sampling and scoring
    def submit(self, works: Sequence[step.Work], version: int) -> Pending:
        """Send this learner's share of ``works`` (chunks rank, rank + world, ...) to the pools."""
        p = Pending(works[0].iteration if works else -1)
        for j in range(self.rank, len(works), self.world):
            self._submit_one(p, j, works[j], version)
        return p

    def _submit_one(self, p: Pending, j: int, work: step.Work, version: int) -> None:
        sampler = self.samplers[j % len(self.samplers)]
        reward = self.rewards[j % len(self.rewards)]
        chunk, sampled = sampler.sample.options(num_returns=2).remote(work, version)
        scores, s = reward.score_and_summarise.options(num_returns=2).remote(sampled, self.need_grad)
        p.jobs[j] = (work, version, chunk, scores, s)

    def collect(self, p: Pending) -> tuple[list, list[dict]]:
        """This learner's scored chunks and their summaries."""
        import ray

        tries = max(self.cfg.cluster.samplers.max_restarts, self.cfg.cluster.rewards.max_restarts, 1)
        chunks, summaries = [], []
        for j in sorted(p.jobs):
            for attempt in range(tries + 1):
                work, version, chunk, scores, s = p.jobs[j]
                try:
                    summary = ray.get(s)
                    chunks.append(step.apply_scores(ray.get(chunk), ray.get(scores)))
                    summaries.append(summary)
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError,
                        ray.exceptions.ActorUnavailableError, ray.exceptions.ObjectLostError) as e:
                    if attempt == tries or not _retryable(e):
                        raise
                    self.retries += 1
                    time.sleep(1.0)
                    print(f"[learner {self.rank}] chunk {j} of iteration {p.iteration} failed ({type(e).__name__}); "
                          f"redoing it with the same work once its actors are back ({attempt + 1}/{tries})", flush=True)
                    _wait_alive(self.samplers[j % len(self.samplers)])  # restarted: it pulls weights itself
                    if self.rewards:
                        _wait_alive(self.rewards[j % len(self.rewards)], "__ray_ready__")
                    self._submit_one(p, j, work, version)
        return chunks, summaries

    # ------------------------------------------------------------------ evaluation (rank 0)
    def evaluate(self, iteration: int, out_dir: Path) -> tuple[dict, Path]:
        """Training and evaluation reward on fresh samples from the fixed evaluation seeds
        (:func:`rlr_dist.train.step.eval_parts`, one part per sampler), and a sample grid."""
        import ray

        from rlr_dist.pipeline.pictures import save_samples

        prompts = self.cfg.data.eval_prompts or self.cfg.data.load_prompts()
        parts = step.eval_parts(prompts, self.cfg.train.eval_samples, len(self.samplers))
        x0 = torch.cat(ray.get([self.samplers[i].draw.remote(p, seed) for i, (p, seed) in enumerate(parts)]))
        order = [q for p, _ in parts for q in p]
        metrics = ray.get(self.rewards[0].evaluate.remote(x0, order))
        images = ray.get(self.rewards[0].images.remote(x0[:64]))
        return metrics, save_samples(images, out_dir / "samples" / f"iter_{iteration:05d}")


def _retryable(e: Exception) -> bool:
    import ray

    # ObjectLostError: the node that held a chunk (or the sampler's output a reward call read) is gone
    lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.ObjectLostError)
    if isinstance(e, ray.exceptions.RayTaskError):  # the reward call failed because its sampler input did
        return "StaleWeights" in str(e) or isinstance(e.cause, lost)
    return True


def _wait_alive(actor, method: str = "get_version", timeout: float = 180.0):
    """Block until ``actor`` answers ``method`` again (after a restart)."""
    import ray

    t0 = time.time()
    while True:
        try:
            return ray.get(getattr(actor, method).remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            if time.time() - t0 > timeout:
                raise
            time.sleep(0.5)
