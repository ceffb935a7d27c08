"""The three pieces of one iteration, as plain functions: sample, score, learn.

Ray actors (samplers, reward models, learners) and the single-process loop call exactly these, so the
distributed pipeline and the reference loop do identical work. No Ray import here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from rlr_dist.chain.trajectory import Trajectory, sample
from rlr_dist.estimators import Advantages, Batch, Estimator, backward_terms
from rlr_dist.models.base import DiffusionModel
from rlr_dist.regularisers import Regulariser
from rlr_dist.rewards.base import RewardScorer


@dataclass
class Chunk:
    """A sampler's share of an iteration: ``len(prompts)`` trajectories with their prompts, the weight
    version that produced them, and (after scoring) the rewards."""

    traj: Trajectory
    prompts: list[str]
    version: int
    reward: Tensor | None = None
    reward_grad: Tensor | None = None
    stats: dict = field(default_factory=dict)


def rollout(model: DiffusionModel, estimator: Estimator, prompts: Sequence[str], prompt_ids: Sequence[int],
            seed: int, version: int, with_reference: bool) -> Chunk:
    """Sample one trajectory per prompt (noise and plan from ``seed``), recording what the plan needs."""
    t0 = time.perf_counter()
    chain = model.chain()
    plan = estimator.plan(chain.schedule, torch.Generator().manual_seed(seed))
    gen = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        cond = model.encode_prompts(list(prompts))
    x_T = model.initial_noise(len(prompts), gen)
    ids = torch.tensor(list(prompt_ids), dtype=torch.long)
    traj = sample(chain, x_T, plan, cond, gen, with_reference=with_reference, prompt_ids=ids, seed=seed)
    return Chunk(traj=traj.to("cpu"), prompts=list(prompts), version=version,
                 stats={"time/sample": time.perf_counter() - t0})


def score(scorer: RewardScorer, chunk: Chunk, need_grad: bool, device: str | torch.device = "cpu") -> Chunk:
    """Fill ``chunk.reward`` (and ``∂R/∂x_0`` when ``need_grad``)."""
    t0 = time.perf_counter()
    R, dR = scorer.score(chunk.traj.x0.to(device), chunk.prompts, need_grad=need_grad)
    chunk.reward, chunk.reward_grad = R.cpu(), None if dR is None else dR.cpu()
    chunk.stats["time/score"] = time.perf_counter() - t0
    return chunk


def learn(model: DiffusionModel, estimator: Estimator, regulariser: Regulariser, advantages: Advantages,
          chunks: Sequence[Chunk], backward: Callable[[Tensor], None] | None = None,
          all_rewards: Tensor | None = None) -> dict[str, float]:
    """Back-propagate the estimator's surrogate loss over ``chunks`` (gradients accumulate in ``.grad``;
    the caller steps the optimiser). Each chunk is one :class:`Batch`, weighted by its share of samples.
    ``all_rewards``: the whole iteration's rewards (all learners), for a batch-wide reward scale."""
    t0 = time.perf_counter()
    chain = model.chain()
    total = sum(c.traj.batch_size for c in chunks)
    out: dict[str, float] = {}
    for c in chunks:
        w = c.traj.batch_size / total
        b = Batch(traj=c.traj.to(model.device), chain=chain, reward=c.reward.to(model.device),
                  reward_grad=None if c.reward_grad is None else c.reward_grad.to(model.device),
                  regulariser=regulariser, advantages=advantages)
        if all_rewards is not None:
            b.scale = advantages.scale_factor(all_rewards)
        terms = ((name, w * loss) for name, loss in estimator.terms(b))
        for key, v in backward_terms(terms, backward=backward).items():
            out[key] = out.get(key, 0.0) + v
    out["time/learn"] = time.perf_counter() - t0
    return out


def batch_stats(chunks: Sequence[Chunk]) -> dict[str, float]:
    """Reward mean/std and the sampled KL to the reference (Σ_k δ_k / 2, mean over samples)."""
    R = torch.cat([c.reward for c in chunks]).double()
    out = {"reward/mean": float(R.mean()), "reward/std": float(R.std()) if R.numel() > 1 else 0.0,
           "samples": float(R.numel())}
    deltas = [c.traj.delta for c in chunks if c.traj.delta is not None]
    if deltas:
        out["kl/sampled"] = float(torch.cat(deltas).double().sum(1).mean() / 2)
    return out


def grad_norm(params: Sequence[Tensor]) -> float:
    sq = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)
    return sq**0.5


@dataclass
class Work:
    """What one sampler call produces: these prompts (with dataset ids), from this seed."""

    prompts: list[str]
    prompt_ids: list[int]
    seed: int
    iteration: int = 0


def iteration_work(prompts: Sequence[str], iteration: int, seed: int, prompts_per_iteration: int,
                   samples_per_prompt: int, chunks: int) -> list[Work]:
    """The iteration's samples split into ``chunks`` (one per sampler call). Deterministic in
    ``(seed, iteration)``, so the distributed pipeline and the single-process loop do the same work."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    n = len(prompts)
    if prompts_per_iteration <= n:
        ids = torch.randperm(n, generator=g)[:prompts_per_iteration].tolist()
    else:
        ids = torch.randint(0, n, (prompts_per_iteration,), generator=g).tolist()
    flat = [i for i in ids for _ in range(samples_per_prompt)]
    chunks = max(1, min(chunks, len(flat)))
    bounds = [round(j * len(flat) / chunks) for j in range(chunks + 1)]
    out = []
    for j in range(chunks):
        part = flat[bounds[j]:bounds[j + 1]]
        out.append(Work([prompts[i] for i in part], part, seed=(seed * 7919 + iteration) * 1009 + j,
                        iteration=iteration))
    return out
