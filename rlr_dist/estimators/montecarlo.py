"""The Monte-Carlo harness of the estimator tests and ``rlr-dist bench estimators`` (spec §11.2–11.4): many
batch-mean gradient estimates through the production sampling and estimator code on a tiny chain
(:mod:`rlr_dist.chain.tiny`), z-scores against an exact or reference gradient, and the variance of one batch."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from rlr_dist.chain.tiny import _GroupedChain


def bonferroni_threshold(n_coords: int, alpha_fw: float = 1e-3) -> float:
    """``Φ⁻¹(1 − α/(2P))``: max-|z| acceptance bound over P coordinates (spec §11.3)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - alpha_fw / (2 * max(n_coords, 1)))


def z_scores(est: Tensor, ref_mean: Tensor, ref_se: Tensor | float = 0.0) -> Tensor:
    """Per-coordinate z of the mean of ``est`` (N, P) against a reference mean with its s.e."""
    n = est.shape[0]
    se = est.std(0) / math.sqrt(n)
    tot = (se**2 + torch.as_tensor(ref_se) ** 2).sqrt()
    ok = tot > 0
    z = torch.zeros_like(se)
    z[ok] = (est.mean(0)[ok] - ref_mean[ok]) / tot[ok]
    return z


# ---------------------------------------------------------------------------------------------------
# the Monte-Carlo harness shared by the tests and `rlr-dist bench estimators`


def estimate(chain: _GroupedChain, estimator, reward, n_calls: int, m: int = 64, regulariser=None,
             advantages=None, seed: int = 0, per_step: bool = False) -> Tensor:
    """Batch-mean gradient estimates (``−∇`` of the surrogate) through the production sampling and
    estimator code: ``n_calls`` optimiser steps, each drawing one plan (j, sampled steps, ...) shared by
    ``G = chain.G`` independent batches of ``m`` trajectories. Shape ``(n_calls, G, P)`` or, with
    ``per_step``, ``(n_calls, G, T+1, P)`` (the part credited to each step's parameter copy).

    Batches of one call share the plan, so only call means are independent: use :func:`call_means`
    for z-tests and :func:`batch_variance` for the variance of one batch with its own plan.
    """
    from rlr_dist.chain.trajectory import sample
    from rlr_dist.estimators import Advantages, Batch
    from rlr_dist.regularisers import REGULARISERS

    reg = regulariser or REGULARISERS.build("none")
    adv = advantages or Advantages("loo")
    estimator.check(chain.schedule)
    G, D = chain.G, chain.D
    if per_step and chain.step_delta is None:
        chain.with_step_copies()
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.arange(G * m) // m
    out = []
    for _ in range(n_calls):
        plan = estimator.plan(chain.schedule, gen)
        x_T = torch.randn(G * m, D, generator=gen, dtype=torch.float64)
        traj = sample(chain, x_T, plan, generator=gen, with_reference=reg.active, prompt_ids=prompt_ids)
        R, dR = reward(traj.x0)
        batch = Batch(traj, chain, R, dR if estimator.needs_reward_grad else None, reg, adv,
                      reward_fn=lambda x, c: reward(x)[0])
        loss = sum(term for _, term in estimator.terms(batch))
        wrt = chain.step_delta if per_step else chain.theta
        (g,) = torch.autograd.grad(loss, wrt, allow_unused=True)
        g = torch.zeros_like(wrt) if g is None else g
        out.append(-G * (g.transpose(0, 1) if per_step else g).detach())
    return torch.stack(out)


def call_means(est: Tensor) -> Tensor:
    """Independent units for z-tests: the mean over the G batches of each call."""
    return est.mean(1)


def batch_variance(est: Tensor) -> float:
    """``tr Cov`` of one batch-mean estimate with its own plan draw, by the law of total variance:
    ``E[Var(g | plan)] + Var(E[g | plan])``, both estimated without bias from ``(calls, G, ...)``."""
    n, G = est.shape[:2]
    flat = est.reshape(n, G, -1)
    within = flat.var(1).mean(0) if G > 1 else torch.zeros(flat.shape[-1], dtype=flat.dtype)
    between = flat.mean(1).var(0) - within / G if n > 1 else torch.zeros_like(within)
    return float((within + between.clamp_min(0)).sum())
