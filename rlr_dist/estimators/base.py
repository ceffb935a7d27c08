"""Estimators as surrogate losses: the autograd gradient of the sum of an estimator's terms is
``−(its estimate of ∇J)`` (spec §3.3).

An estimator (1) draws a :class:`Plan` before sampling — which steps to record and train on — and
(2) turns a recorded :class:`Trajectory` plus the reward ``R`` (and ``∂R/∂x_0`` when it has a pathwise
part) into named loss terms. Terms are yielded one at a time so a learner can back-propagate each
and free its graph (memory of one segment, not of the chain).

The building blocks shared by every estimator live here: reward-to-go advantages, the
likelihood-ratio term of one step, and pathwise re-computation of a segment with stored noises.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rlr_dist.chain.base import Chain
from rlr_dist.chain.schedule import GaussianSchedule
from rlr_dist.chain.trajectory import Plan, Trajectory, inner, sq_norm
from rlr_dist.estimators.advantages import Advantages
from rlr_dist.registry import Registry
from rlr_dist.regularisers import REGULARISERS, Regulariser

ESTIMATORS: Registry[type["Estimator"]] = Registry("estimator", group="rlr_dist.estimators")

RewardFn = Callable[[Tensor, Any], Tensor]


@dataclass
class Batch:
    """Everything an estimator's terms need for one optimiser step (one learner micro-batch).

    reward: ``R`` per sample (B,); reward_grad: ``∂R/∂x_0`` (same shape as ``x_0``) when the reward
    is differentiable — computed wherever the reward model lives and passed in as a tensor.
    reward_fn: a black-box reward ``(x_0, cond) -> R`` for estimators that query it again (SPSA).
    batch_reward: the rewards of the whole optimiser step (every chunk, every learner) when this batch is a part
    of it; ``None``: this batch is the whole step. Read by estimators that normalise over the whole batch.
    """

    traj: Trajectory
    chain: Chain
    reward: Tensor
    reward_grad: Tensor | None = None
    regulariser: Regulariser = field(default_factory=lambda: REGULARISERS.build("none"))
    advantages: Advantages = field(default_factory=Advantages)
    reward_fn: RewardFn | None = None
    batch_reward: Tensor | None = None

    def __post_init__(self) -> None:
        # 1 = exact log-densities; 1/D under a flow schedule's mean_compat reduction (every likelihood-ratio
        # and KL term scaled alike, as Flow-GRPO-style trainers do; docs/flow.md)
        self.logp_scale = float(getattr(self.chain.schedule, "log_prob_scale", 1.0))
        R, dR, self.reward_stats = self.regulariser.transform_reward(self.reward.detach(), self.reward_grad)
        self.R = R.double()
        self.traj.delta = None if self.traj.delta is None else self.traj.delta.to(self.R.device)
        self.dR = None if dR is None else dR.detach()
        self.scale = self.advantages.scale_factor(self.reward)
        reg, tr = self.regulariser, self.traj
        if reg.active and reg.shaping:
            if tr.delta is None:
                raise ValueError("the regulariser needs per-step divergences: sample with with_reference=True")
            c = reg.cost(tr.delta.double()) * self.logp_scale
            c[:, 0] = 0.0
            # cum[:, m] = Σ_{k=1}^{m-1} c_k: the costs paid *after* the action of step m.
            self.cum_cost = torch.cumsum(torch.cat([c.new_zeros(c.shape[0], 1), c[:, :-1]], 1), 1)
        else:
            self.cum_cost = None
        self._adv: dict[int, Tensor] = {}
        self._state_baseline: dict[int, Tensor] = {}

    @property
    def schedule(self) -> GaussianSchedule:
        return self.chain.schedule

    def sigma(self, k: int) -> float:
        return float(self.traj.sigma[k])

    def returns(self, m: int) -> Tensor:
        """``G^(m)``: the (shaped) return the action of step m is credited with."""
        if self.cum_cost is None:
            return self.R
        return self.R - self.regulariser.beta * self.cum_cost[:, m]

    def advantage(self, m: int) -> Tensor:
        """The advantage weighting step m's likelihood ratio (times the log-prob scale, 1 unless mean_compat):
        the group baseline of the return, or of the return minus a per-sample state baseline when one is set."""
        if m not in self._adv:
            G = self.returns(m)
            if m in self._state_baseline:
                G = G - self._state_baseline[m]
            self._adv[m] = self.advantages(G, self.traj.prompt_ids) * self.logp_scale
        return self._adv[m]

    def set_state_baseline(self, m: int, b: Tensor) -> None:
        """A per-sample baseline for step m's likelihood ratio, subtracted before the group baseline; it must
        not depend on the step's own action ε_m (e.g. a function of x_m alone), or the estimate is biased."""
        self._state_baseline[m] = b.detach().to(self.R)
        self._adv.pop(m, None)


@dataclass(frozen=True)
class Backprop:
    """How much of the chain one optimiser step back-propagates through — what the memory planner counts.

    segment: model calls in the longest back-propagated segment (their activations are alive together);
    steps: sampler steps of that segment;
    calls: model calls back-propagated per optimiser step (each a forward and a backward);
    checkpointed: the segment is checkpointed per step (memory: one step's calls plus one input latent per step);
    forward_calls: extra forward-only model calls per step (e.g. SPSA's perturbed passes);
    reference: how many of the segment's calls run the frozen reference model (the exact KL's, differentiated in
      their input only: they hold less than a call of the trained model).
    """

    segment: int
    steps: int
    calls: int
    checkpointed: bool = False
    forward_calls: int = 0
    reference: int = 0


def absorbed_backprop(segments: list[list[tuple[int, int, int]]], regulariser: Regulariser,
                      forward_calls: int = 0) -> Backprop:
    """:class:`Backprop` of plans whose pathwise segments are ``(steps, stochastic steps, top stochastic)``
    triples (one list per possible plan, as ``check`` found them on a chain with deterministic steps:
    'absorb' stretches segments over ODE steps, 'skip' drops those steps): the longest segment and the most
    calls any plan back-propagates. A segment's calls: one per step, plus with an active
    regulariser one reference call per stochastic step below its top (as :func:`segment` differentiates)."""
    def second(seg: tuple[int, int, int]) -> int:
        steps, stoch, top = seg
        return max(0, stoch - top) if regulariser.active else 0

    def calls(seg: tuple[int, int, int]) -> int:
        return seg[0] + second(seg)

    flat = [s for plan in segments for s in plan]
    longest = max(flat, key=calls)
    return Backprop(segment=calls(longest), steps=longest[0], calls=max(sum(calls(s) for s in plan) for plan in segments),
                    forward_calls=forward_calls, reference=second(longest) if regulariser.shaping else 0)


def segment_shape(sigma: Tensor, k_hi: int, k_lo: int) -> tuple[int, int, int]:
    """``(steps, stochastic steps, 1 if the top step is stochastic)`` of the pathwise segment ``k_hi .. k_lo``."""
    stoch = sum(1 for k in range(k_lo, k_hi + 1) if float(sigma[k]) > 0)
    return k_hi - k_lo + 1, stoch, int(float(sigma[k_hi]) > 0)


def segment_calls(steps: int, regulariser: Regulariser) -> int:
    """Model calls alive in a pathwise segment of ``steps`` steps: with an active regulariser every step but
    the first also differentiates a second call at its re-computed state (the reference model in exact
    mode, the trained model at the detached state in DPOK mode; see :func:`segment`)."""
    return 2 * steps - 1 if regulariser.active else steps


def segment_reference_calls(steps: int, regulariser: Regulariser) -> int:
    """Of :func:`segment_calls`, the reference-model calls (exact mode; DPOK's second calls are the trained
    model's, at detached states)."""
    return steps - 1 if regulariser.active and regulariser.shaping else 0


class Estimator(ABC):
    """Base class; subclasses register with ``@ESTIMATORS.register("name")`` (or are named in a config by
    ``module:Class``). Constructor arguments are the config's parameters; annotate them (types are checked
    and coerced) and raise :class:`~rlr_dist.registry.ParamError` for a bad value."""

    #: needs ∂R/∂x_0 (a differentiable reward); a config pairing it with a black-box reward is refused
    needs_reward_grad: bool = False

    def reward_grad_reason(self) -> str:
        """Why this estimator needs ``∂R/∂x_0``, naming the config field that makes it so when one does; the
        config error that refuses a black-box reward (before anything starts) quotes it."""
        return "it back-propagates the reward"

    def check(self, schedule: GaussianSchedule) -> None:
        """Raise a clear ValueError if this estimator cannot run on ``schedule`` (before any sampling)."""

    @abstractmethod
    def plan(self, schedule: GaussianSchedule, generator: torch.Generator | None = None) -> Plan: ...

    @abstractmethod
    def terms(self, batch: Batch) -> Iterator[tuple[str, Tensor]]: ...

    #: optimiser steps one learner call makes. With more than one, the learner back-propagates the terms of
    #: :meth:`phase_terms` ``(batch, 0)`` over all its chunks, steps the optimiser (which zeroes the gradients),
    #: then those of phase 1, ...; the caller makes the last step as for any estimator. Without an optimiser (the
    #: Monte-Carlo harness, gradient draws) the phases accumulate at the same weights: the sum of the per-phase
    #: gradients, which is what :meth:`terms` must yield.
    optimizer_steps: int = 1

    def phase_terms(self, batch: Batch, phase: int) -> Iterator[tuple[str, Tensor]]:
        """The terms of optimiser step ``phase`` (``0 <= phase <`` :attr:`optimizer_steps`); one phase: :meth:`terms`."""
        return self.terms(batch)

    #: takes a regulariser (``False``: a config with an active one is refused, naming ``regulariser.name``)
    takes_regulariser: bool = True

    #: the estimator reads per-term gradient norms (``gnorm/<term>``) in :meth:`observe`; the learner then
    #: measures them (one extra ``autograd.grad`` per term, no extra backward through the model)
    reads_term_norms: bool = False

    def observe(self, stats: dict[str, float]) -> None:
        """Per-term statistics of the last step, summed over every learner (``loss/<term>`` and, when
        :attr:`reads_term_norms`, ``gnorm/<term>``)."""

    def take_records(self) -> Any:
        """What this process's :meth:`terms` calls recorded since the last call, for the estimator to learn from
        (e.g. a value baseline's states and returns); ``None``: nothing. Every learner's records are gathered and
        handed to :meth:`learn_from` on every learner, so all end the iteration in the same state."""
        return None

    def learn_from(self, records: list) -> dict[str, float]:
        """Learn from the iteration's records (every learner's :meth:`take_records`, in rank order); returns
        metrics about it."""
        return {}

    def plan_metrics(self, plans: list[Plan], schedule: GaussianSchedule) -> dict[str, float]:
        """Numbers about the plans just drawn for an iteration (e.g. the RLR block start and its law)."""
        return {}

    def state_dict(self) -> dict:
        """What the estimator learned across iterations (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @abstractmethod
    def backprop(self, T: int, regulariser: Regulariser) -> Backprop:
        """What one optimiser step on a ``T``-step chain back-propagates through (for the planner)."""

    def memory_overrides(self) -> list[list[str]]:
        """Config overrides that lower this estimator's learner memory, cheapest to the recipe first (the
        planner tries them when a learner does not fit)."""
        return []

    def describe(self) -> dict:
        return {"name": getattr(self, "registry_name", type(self).__name__)}


ESTIMATORS.base = Estimator


# ---------------------------------------------------------------------------------------------------
# shared term builders


def explicit_cost(b: Batch, x: Tensor, k: int, mu: Tensor) -> Tensor:
    """Per-sample ``c_k`` at state ``x`` given ``μ_θ(x)`` (pathwise in ``x`` unless ``x`` is detached)."""
    s = b.sigma(k)
    return b.regulariser.cost(sq_norm(mu - b.chain.ref_mean(x, k, b.traj.cond)) / s**2) * b.logp_scale


def lr_term(b: Batch, k: int, weight: float = 1.0) -> Tensor:
    """Score-function term of step k at its recorded state (ZO-LR / DDPO), plus its explicit cost:
    ``−w·mean_b[ sg(A^(k)) ⟨μ_θ(sg x_k), sg ε_k⟩/σ_k − β c_k(sg x_k; θ) ]``."""
    x = b.traj.state(k).detach()
    mu = b.chain.mean(x, k, b.traj.cond)
    s = b.sigma(k)
    loss = -(b.advantage(k).to(torch.float64) * inner(mu, b.traj.noise(k)).double() / s).mean()
    if b.regulariser.active:
        loss = loss + b.regulariser.beta * explicit_cost(b, x, k, mu).double().mean()
    return weight * b.scale * loss


def segment(b: Batch, k_hi: int, k_lo: int, use_checkpoint: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Re-run steps ``k_hi .. k_lo`` pathwise from the recorded ``sg(x_{k_hi})`` with the stored noises.

    Returns ``(x_{k_lo}, μ_θ at step k_lo, Σ per-sample costs of the segment)``. Costs are pathwise
    + explicit when the regulariser shapes (exact), explicit at detached states otherwise (DPOK).
    """
    cond, reg = b.traj.cond, b.regulariser
    x = b.traj.state(k_hi).detach()
    cost = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    mu = x

    def step(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``μ_θ(x)`` and the step's cost (zeros when it has none) — one unit for checkpointing, so the
        reference call of the cost is recomputed in backward too instead of being held."""
        mu = b.chain.mean(x, k, cond)
        if not (reg.active and b.sigma(k) > 0):
            return mu, torch.zeros_like(cost)
        if reg.shaping or k == k_hi:
            return mu, explicit_cost(b, x, k, mu).double()
        xd = x.detach()
        return mu, explicit_cost(b, xd, k, b.chain.mean(xd, k, cond)).double()

    for k in range(k_hi, k_lo - 1, -1):
        mu, c = checkpoint(step, x, k, use_reentrant=False) if use_checkpoint else step(x, k)
        cost = cost + c
        if k > k_lo:
            x = mu + b.sigma(k) * b.traj.noise(k) if b.sigma(k) > 0 else mu
    return x, mu, cost


def pathwise_term(b: Batch, K: int, use_checkpoint: bool = False) -> Tensor:
    """Back-propagate the reward through the last K steps from ``sg(x_K)`` (K = 1: the RLR first-order
    term; K = T: full backprop): ``−mean_b[⟨sg(∂R̃/∂x_0), x_0(θ)⟩ − β Σ costs]``."""
    if b.dR is None:
        raise ValueError("this estimator back-propagates the reward: pass reward_grad (∂R/∂x_0), "
                         "or choose a black-box estimator (rlr with fo=False, lr)")
    _, mu, cost = segment(b, K, 1, use_checkpoint)
    x0 = mu + b.sigma(1) * b.traj.noise(1) if b.sigma(1) > 0 else mu
    loss = -inner(x0, b.dR).double().mean()
    if b.regulariser.active:
        loss = loss + b.regulariser.beta * cost.mean()
    return b.scale * loss


def require_stochastic(schedule: GaussianSchedule, steps, who: str) -> None:
    bad = [k for k in steps if not schedule.stochastic(k)]
    if bad:
        raise ValueError(
            f"{who}: likelihood-ratio terms need σ_k > 0 but steps {bad} are deterministic "
            f"(σ = 0); use eta > 0 (and a stochastic last step, e.g. DDIM set_alpha_to_one=False), "
            f"an estimator that back-propagates those steps, or deterministic='absorb' / 'skip'")


# ---------------------------------------------------------------------------------------------------
# deterministic steps among likelihood-ratio steps (flow-matching windows, a deterministic last step)
#
# ``deterministic=`` of the LR-type estimators: "error" refuses them; "skip" leaves them *fixed* (their
# g_k is dropped — biased; ``describe()["fixed_steps"]`` lists them); "absorb" re-runs the run of
# deterministic steps directly above a stochastic LR step pathwise, as an HO-style segment ending at it
# (unbiased: given the segment's top state the steps in between are a fixed differentiable map), at the
# memory of those steps. Steps below the lowest stochastic step can only be covered pathwise from the
# reward (RLR's FO term extends over them); without one they stay fixed.
DETERMINISTIC_MODES = ("error", "skip", "absorb")


def segment_top(sigma: Tensor, k: int) -> int:
    """``k`` plus the run of deterministic steps (σ = 0) directly above it: the top of the pathwise
    segment that ends at step k in "absorb" mode."""
    T = sigma.shape[0] - 1
    top = k
    while top < T and not float(sigma[top + 1]) > 0:
        top += 1
    return top


def segment_lr_term(b: Batch, k: int, top: int, weight: float = 1.0) -> Tensor:
    """:func:`lr_term` of step k over the segment ``top .. k``: re-run pathwise from ``sg(x_top)`` with the
    stored noises, likelihood ratio at step k (the RLR HO term with its block ending at a stochastic step):
    ``−w·mean_b[ sg(A^(k)) ⟨m_k(θ), sg ε_k⟩/σ_k − β Σ costs ]``. ``top == k`` is :func:`lr_term`."""
    if top == k:
        return lr_term(b, k, weight)
    _, m_k, cost = segment(b, top, k)
    loss = -(b.advantage(k) * inner(m_k, b.traj.noise(k)).double() / b.sigma(k)).mean()
    if b.regulariser.active:
        loss = loss + b.regulariser.beta * cost.mean()
    return weight * b.scale * loss


def backward_terms(terms: Iterator[tuple[str, Tensor]], params: list[Tensor] | None = None,
                   track_norms: bool = False, backward: Callable[[Tensor], None] | None = None) -> dict[str, float]:
    """Back-propagate each term as it is produced (freeing its graph), accumulating into ``.grad``.

    ``backward`` replaces ``loss.backward()`` (e.g. a DeepSpeed engine's). With ``track_norms`` the
    gradient ``g`` of every term with respect to ``params`` is taken first (``gnorm/<term>`` = ‖g‖, which
    the softmax j-law reads) and then handed to ``backward`` as the linear surrogate ``Σ ⟨sg g, θ⟩``,
    whose gradient is exactly ``g``: the model is back-propagated once per term either way, and an
    engine that reduces gradients in its own hooks (ZeRO-1/2) sees them arrive as usual.
    """
    backward = backward or Tensor.backward
    stats: dict[str, float] = {}
    for name, loss in terms:
        stats[f"loss/{name}"] = float(loss.detach())
        if track_norms and params:
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
            stats[f"gnorm/{name}"] = sum(float(g.double().pow(2).sum()) for _, g in pairs) ** 0.5
            if pairs:
                backward(sum((g.detach() * p).sum() for p, g in pairs))
        else:
            backward(loss)
    return stats
