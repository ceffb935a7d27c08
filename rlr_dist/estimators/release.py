"""``rlr_release``: the training loop of the authors' released code, as an estimator — **biased by design**.

It is here to reproduce the paper's numbers and to compare that algorithm with ours on the same work, not
to train with: its expected update is *not* ``∇E[R]`` (``tests/test_estimator_release.py`` rejects it against
the exact gradient). What it does, per learner call, as spec §4 reads the release (``rlr_trainer_v_b.py``):

1. **first order**, its own optimiser step: the reward back-propagated through the last denoising step only
   (step 1, from the recorded ``sg(x_1)``), loss scaled by ``fo_scale`` (0.05):
   ``L_FO = −fo_scale · mean_b R(x_0(θ))`` — i.e. one-step truncated backprop (the paper's ablation V1), down-weighted;
2. ``chain_len`` **PPO-clipped ratio updates** ("HO" in the release, though each is a single step), each on one
   step ``k ~ U{1..T}`` drawn independently (with replacement) and each with its own optimiser step:
   ``L_k = −ho_scale · mean_b min(r A, clip(r, 1 ± clip_range) A)`` with
   ``log r = clamp((log p_θ − log p_old)/D, ±max_log_ratio)`` — trl's log-probability **averaged** over the
   ``D`` latent dims, not summed — and ``A = (R − mean)/(std + 1e-8)`` over the **whole batch** (every chunk,
   every learner; no baseline per prompt, no advantage clipping), ``ho_scale`` = the release's
   ``ho_loss_coeff`` (0.001).

Why it is biased (spec §4 "Consequences"): the LR terms cover ``chain_len`` of T steps without the ``T/chain_len``
importance weight, carry ``ho_scale/(fo_scale·D·std_R)`` of the FO weight, and the steps after the first see
the weights already moved (so the ratio is no longer 1 and the 1e-4 clip zeroes much of it); no zeroth-order
part at all. It is FO-dominated, close to ablation V1.

"Its gradient" where one is asked for without an optimiser (the Monte-Carlo harness, gradient draws): the
sum of the per-phase gradients at the same weights (:meth:`terms`), which is also the net parameter change of
one learner call under plain SGD divided by ``−lr``, to first order in ``lr``.

Choices where the release or the spec leaves room (each stated so a reader can change it):

* **optimiser steps**: one per term, as the issue reads the release (``296485c`` back-propagates FO and each
  PPO term separately; its accumulation bookkeeping, 3·chain_len+1 steps against 3 ``accumulate()`` contexts,
  looks like it would raise as read — spec §12 item 6 — and ``aff15b1`` summed everything into one step).
* **sampling**: the release samples with ``eta = sample_eta`` (0.05 in the aesthetic script) and a deterministic
  last step; here the chain is the model's as configured — set ``model.eta`` / ``model.last_step_eta: 0``
  to match it.
* **a drawn step with σ_k = 0** (a deterministic last step): the release's stored log-prob is NaN there and its
  loss is replaced by 0; here the term is a graph-connected zero, so the optimiser still steps (AdamW then
  moves on its moments and weight decay, as an optimiser step with zero gradient does).
* **std**: population std (ddof 0) + 1e-8 (trl's numpy convention); the release does not say which.
* **the draw of k**: one per plan, i.e. per sampler chunk (shared by that chunk's samples; the release, single
  process, draws one per batch).
* **FO reward**: the training reward as configured (``R``, maximised); the release's aesthetic loss ``|r − 10|``
  has the same gradient while ``r < 10``. Neither term uses ``train.advantage_baseline`` / ``advantage_scale``
  (the release normalises only the PPO rewards, by its own batch statistics).
* **regularisers**: the release has none; an active one is refused.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

from rlr_dist.chain.schedule import GaussianSchedule
from rlr_dist.chain.trajectory import Plan, inner, sq_norm
from rlr_dist.estimators.base import ESTIMATORS, Backprop, Batch, Estimator, segment
from rlr_dist.registry import check_param

BIAS = ("biased by design (the authors' released loop, spec §4): one-step FO scaled by fo_scale plus chain_len "
        "PPO-clipped mean-log-prob ratio terms on random steps, batch-normalised rewards, one optimiser step each")


def _finite_positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


@ESTIMATORS.register("rlr_release")
class RLRRelease(Estimator):
    """The authors' released RLR loop (module docstring): biased; for reproduction and comparison only."""

    needs_reward_grad = True
    takes_regulariser = False

    def __init__(self, chain_len: int = 1, fo_scale: float = 0.05, ho_scale: float = 1e-3, clip_range: float = 1e-4,
                 max_log_ratio: float = 20.0) -> None:
        check_param("chain_len", chain_len >= 1, f"must be >= 1 (PPO updates per learner call), got {chain_len}")
        check_param("fo_scale", _finite_positive(fo_scale), f"must be a finite number > 0, got {fo_scale}")
        check_param("ho_scale", _finite_positive(ho_scale), f"must be a finite number > 0, got {ho_scale}")
        check_param("clip_range", _finite_positive(clip_range), f"must be a finite number > 0, got {clip_range}")
        check_param("max_log_ratio", _finite_positive(max_log_ratio), f"must be a finite number > 0, got {max_log_ratio}")
        self.chain_len, self.fo_scale, self.ho_scale = chain_len, fo_scale, ho_scale
        self.clip_range, self.max_log_ratio = clip_range, max_log_ratio
        self.optimizer_steps = 1 + chain_len

    def reward_grad_reason(self) -> str:
        return "its first-order term back-propagates the reward through the last step (as the released code does)"

    def plan(self, schedule: GaussianSchedule, generator: torch.Generator | None = None) -> Plan:
        T = schedule.T
        steps = tuple(int(k) for k in torch.randint(1, T + 1, (self.chain_len,), generator=generator))  # draw order
        states = {1} | set(steps) | {k - 1 for k in steps}
        noises = {k for k in {1, *steps} if schedule.stochastic(k)}
        return Plan(states=frozenset(states - {0}), noises=frozenset(noises), steps=steps)

    # ------------------------------------------------------------------ the terms, one optimiser step each
    def terms(self, b: Batch) -> Iterator[tuple[str, Tensor]]:
        for phase in range(self.optimizer_steps):
            yield from self.phase_terms(b, phase)

    def phase_terms(self, b: Batch, phase: int) -> Iterator[tuple[str, Tensor]]:
        if b.regulariser.active:
            raise ValueError("rlr_release takes no regulariser (the released code has none): use regulariser: none")
        if phase == 0:
            yield "fo", self.fo_term(b)
        else:
            k = b.traj.plan.steps[phase - 1]
            yield f"ppo:{k}", self.ppo_term(b, k)

    def fo_term(self, b: Batch) -> Tensor:
        """``−fo_scale · mean_b ⟨sg(∂R/∂x_0), x_0(θ)⟩`` with ``x_0`` re-run from ``sg(x_1)`` (stored ε_1)."""
        if b.dR is None:
            raise ValueError("rlr_release back-propagates the reward through the last step: pass reward_grad (∂R/∂x_0)")
        _, mu, _ = segment(b, 1, 1)
        x0 = mu + b.sigma(1) * b.traj.noise(1) if b.sigma(1) > 0 else mu
        return -self.fo_scale * inner(x0, b.dR).double().mean()

    def advantage(self, b: Batch) -> Tensor:
        """``(R − mean)/(std + 1e-8)`` over the whole batch (``b.batch_reward``; this batch when it is the whole)."""
        R = b.R.detach().double()
        pool = R if b.batch_reward is None else b.batch_reward.detach().double().to(R.device)
        std = pool.std(unbiased=False) if pool.numel() > 1 else pool.new_zeros(())
        return (R - pool.mean()) / (std + 1e-8)

    def log_ratio(self, b: Batch, k: int, mu: Tensor) -> Tensor:
        """trl's ``log p_θ − log p_old`` of the recorded ``x_{k−1}``, averaged over the latent dims, clamped:
        ``(⟨ε, Δ⟩/σ − ‖Δ‖²/(2σ²))/D`` with ``Δ = μ_θ − μ_old`` and ``μ_old = x_{k−1} − σ ε`` from the record."""
        tr, s = b.traj, b.sigma(k)
        eps = tr.noise(k)
        d = mu - (tr.state(k - 1) - s * eps)
        D = eps[0].numel()
        lr = (inner(d, eps).double() / s - sq_norm(d).double() / (2 * s**2)) / D
        return lr.clamp(-self.max_log_ratio, self.max_log_ratio)

    def ppo_term(self, b: Batch, k: int) -> Tensor:
        """``−ho_scale · mean_b min(r A, clip(r, 1 ± clip_range) A)`` at step k (a graph-connected zero if σ_k = 0)."""
        x = b.traj.state(k).detach()
        mu = b.chain.mean(x, k, b.traj.cond)
        if not b.sigma(k) > 0:  # the release: NaN log-prob at a deterministic step, loss replaced by 0
            return 0.0 * mu.double().sum()
        r = self.log_ratio(b, k, mu).exp()
        A = self.advantage(b)
        c = self.clip_range
        return -self.ho_scale * torch.minimum(r * A, r.clamp(1 - c, 1 + c) * A).mean()

    # ------------------------------------------------------------------ what the planner and the logs read
    def backprop(self, T: int, regulariser) -> Backprop:
        return Backprop(segment=1, steps=1, calls=1 + self.chain_len)

    def describe(self) -> dict:
        return {"name": "rlr_release", "chain_len": self.chain_len, "fo_scale": self.fo_scale,
                "ho_scale": self.ho_scale, "clip_range": self.clip_range, "max_log_ratio": self.max_log_ratio,
                "optimizer_steps": self.optimizer_steps, "bias": BIAS}
