"""The methods RLR is compared with, in the same framework (spec §8).

* ``lr``: DDPO's score-function estimator on every step (or K sampled steps weighted T/K), with an
  optional PPO-style importance ratio + clipping for several inner epochs on the same samples;
* ``truncated_bp``: AlignProp / DRaFT-K — back-propagate the reward through the last K steps only
  (fixed K, or K drawn uniformly from [k_min, k_max] each step); biased;
* ``full_bp``: back-propagate through all T steps, one gradient checkpoint per model call.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import torch
from torch import Tensor

from rlr_dist.chain.schedule import GaussianSchedule
from rlr_dist.chain.trajectory import Plan, inner, sq_norm
from rlr_dist.registry import check_param
from rlr_dist.estimators.base import (DETERMINISTIC_MODES, ESTIMATORS, Backprop, Batch, Estimator, absorbed_backprop,
                                      explicit_cost, pathwise_term, require_stochastic, segment_calls, segment_lr_term,
                                      segment_reference_calls, segment_shape, segment_top)


@ESTIMATORS.register("lr")
class LikelihoodRatio(Estimator):
    """DDPO. ``clip_range=None``: the plain score function (unbiased, on-policy). With ``clip_range`` the
    per-step importance ratio ``p_θ/p_old`` is clipped as in PPO (the first epoch equals the score
    function; later epochs are biased by design).

    ``deterministic``: what to do with σ = 0 steps (see ``estimators.base``): "error"; "skip" (fixed:
    their g_k is dropped, biased); "absorb" (each stochastic step's term re-runs the deterministic steps
    directly above it pathwise; those below the lowest stochastic step stay fixed).
    ``describe()["fixed_steps"]`` lists the steps left without gradient."""

    def __init__(self, K: int | None = None, clip_range: float | None = None, max_log_ratio: float = 20.0,
                 deterministic: str = "error") -> None:
        check_param("K", K is None or K >= 1, f"must be >= 1 or null, got {K}")
        check_param("clip_range", clip_range is None or clip_range > 0, f"must be > 0 or null, got {clip_range}")
        check_param("deterministic", deterministic in DETERMINISTIC_MODES,
                    f"must be one of {DETERMINISTIC_MODES}, got {deterministic!r}")
        check_param("deterministic", deterministic != "absorb" or clip_range is None,
                    "'absorb' is not supported with clip_range (PPO ratios are per step)")
        self.K, self.clip_range, self.max_log_ratio = K, clip_range, max_log_ratio
        self.deterministic = deterministic  # skip: no gradient for σ = 0 steps (biased: their g_k is dropped)
        self.fixed_steps: tuple[int, ...] | None = None  # steps left without gradient (set by check / plan)
        self._segments: tuple[int, list] | None = None    # (T, pathwise segments) with absorb (set by check)

    def _steps(self, schedule: GaussianSchedule) -> list[int]:
        return [k for k in range(1, schedule.T + 1) if self.deterministic == "error" or schedule.stochastic(k)]

    def _top(self, sigma: Tensor, k: int) -> int:
        return segment_top(sigma, k) if self.deterministic == "absorb" else k

    def _fixed(self, schedule: GaussianSchedule) -> tuple[int, ...]:
        covered = {i for k in self._steps(schedule) for i in range(k, self._top(schedule.sigma, k) + 1)}
        return tuple(k for k in range(1, schedule.T + 1) if k not in covered)

    def check(self, schedule: GaussianSchedule) -> None:
        require_stochastic(schedule, self._steps(schedule), "lr")
        self.fixed_steps = self._fixed(schedule)
        if self.deterministic != "error":  # the chain's windows set the segments (absorb lengthens them)
            segs = sorted((segment_shape(schedule.sigma, self._top(schedule.sigma, k), k) for k in self._steps(schedule)),
                          reverse=True)
            self._segments = (schedule.T, [segs[: self.K] if self.K else segs])

    def plan(self, schedule: GaussianSchedule, generator: torch.Generator | None = None) -> Plan:
        every = self._steps(schedule)
        n = len(every)
        if self.K is None or self.K >= n:
            steps, weight = tuple(every), 1.0
        else:
            steps, weight = tuple(sorted(every[int(i)] for i in torch.randperm(n, generator=generator)[: self.K])), n / self.K
        states = {self._top(schedule.sigma, k) for k in steps} | ({k - 1 for k in steps} if self.clip_range is not None else set())
        self.fixed_steps = self._fixed(schedule)
        return Plan(states=frozenset(states - {0}), noises=frozenset(steps), steps=steps, step_weight=weight)

    def terms(self, b: Batch) -> Iterator[tuple[str, Tensor]]:
        p = b.traj.plan
        for k in p.steps:
            if self.clip_range is not None:
                yield f"lr:{k}", self.ppo_term(b, k, p.step_weight)
            else:
                yield f"lr:{k}", segment_lr_term(b, k, self._top(b.traj.sigma, k), p.step_weight)

    def ppo_term(self, b: Batch, k: int, weight: float) -> Tensor:
        """``−mean_b min(r A, clip(r) A)`` with ``log r = ⟨ε, Δ⟩/σ − ‖Δ‖²/(2σ²)``, ``Δ = μ_θ − μ_old`` and
        ``μ_old = x_{k-1} − σ ε`` recovered from the record (no catastrophic cancellation)."""
        tr, s = b.traj, b.sigma(k)
        x = tr.state(k).detach()
        eps = tr.noise(k)
        mu = b.chain.mean(x, k, tr.cond)
        d = mu - (tr.state(k - 1) - s * eps)
        log_r = (inner(d, eps).double() / s - sq_norm(d).double() / (2 * s**2)).clamp(-self.max_log_ratio, self.max_log_ratio)
        r = log_r.exp()
        A = b.advantage(k)
        c = self.clip_range
        loss = -torch.minimum(r * A, r.clamp(1 - c, 1 + c) * A).mean()
        if b.regulariser.active:
            loss = loss + b.regulariser.beta * explicit_cost(b, x, k, mu).double().mean()
        return weight * b.scale * loss

    def backprop(self, T: int, regulariser) -> Backprop:
        if self._segments is not None and self._segments[0] == T:  # absorbed ODE steps, measured by check()
            return absorbed_backprop(self._segments[1], regulariser)
        return Backprop(segment=1, steps=1, calls=min(self.K or T, T))

    def describe(self) -> dict:
        return {"name": "lr", "K": self.K, "clip_range": self.clip_range, "deterministic": self.deterministic,
                "fixed_steps": None if self.fixed_steps is None else list(self.fixed_steps)}


@ESTIMATORS.register("truncated_bp")
class TruncatedBP(Estimator):
    """Reward gradient through the last K steps; the earlier steps get no gradient (biased)."""

    needs_reward_grad = True

    def __init__(self, K: int = 1, k_min: int | None = None, k_max: int | None = None, checkpoint: bool = False) -> None:
        check_param("k_max", (k_min is None) == (k_max is None), "k_min and k_max go together (random K)")
        check_param("k_min", k_min is None or 1 <= k_min <= k_max, f"need 1 <= k_min <= k_max, got {k_min}, {k_max}")
        check_param("K", K >= 1, f"must be >= 1, got {K}")
        self.K, self.k_min, self.k_max, self.checkpoint = K, k_min, k_max, checkpoint
        self.fixed_steps: tuple[int, ...] | None = None  # steps above K: no gradient (set by check)
        self._segment: tuple[int, tuple[int, int, int]] | None = None  # (T, shape of the longest segment), by check

    def reward_grad_reason(self) -> str:
        K = (f"estimator.k_min: {self.k_min}, estimator.k_max: {self.k_max}" if self.k_min is not None
             else f"estimator.K: {self.K}")
        return f"it back-propagates the reward through the last K steps ({K})"

    def top(self, T: int) -> int:
        """The highest step a segment starts from (random K: ``k_max``)."""
        return min(self.k_max if self.k_min is not None else self.K, T)

    def check(self, schedule: GaussianSchedule) -> None:
        top = self.k_max if self.k_min is not None else self.K
        if top > schedule.T:
            raise ValueError(f"estimator: K={top} exceeds the number of sampler steps T={schedule.T}")
        # steps above K get no gradient (random K: steps above k_min only sometimes)
        self.fixed_steps = tuple(range((self.k_min if self.k_min is not None else self.K) + 1, schedule.T + 1))
        self._remember_segment(schedule)

    def _remember_segment(self, schedule: GaussianSchedule) -> None:
        """The longest segment's shape on this chain (a deterministic last step has no KL call)."""
        self._segment = (schedule.T, segment_shape(schedule.sigma, self.top(schedule.T), 1))

    def plan(self, schedule: GaussianSchedule, generator: torch.Generator | None = None) -> Plan:
        K = self.K
        if self.k_min is not None:
            K = int(torch.randint(self.k_min, self.k_max + 1, (1,), generator=generator))
        noises = {k for k in range(1, K + 1) if schedule.stochastic(k)}
        return Plan(states=frozenset({K}), noises=frozenset(noises), K=K)

    def terms(self, b: Batch) -> Iterator[tuple[str, Tensor]]:
        yield f"bp:{b.traj.plan.K}", pathwise_term(b, b.traj.plan.K, self.checkpoint)

    def backprop(self, T: int, regulariser) -> Backprop:
        K = self.top(T)
        if self._segment is not None and self._segment[0] == T:  # the chain's σ pattern, measured by check()
            b = absorbed_backprop([[self._segment[1]]], regulariser)
            return replace(b, calls=K, checkpointed=self.checkpoint)
        return Backprop(segment=segment_calls(K, regulariser), steps=K, calls=K, checkpointed=self.checkpoint,
                        reference=segment_reference_calls(K, regulariser))

    def memory_overrides(self) -> list[list[str]]:
        return [] if self.checkpoint else [["--estimator.checkpoint=true"]]

    def describe(self) -> dict:
        return {"name": "truncated_bp", "K": self.K, "k_min": self.k_min, "k_max": self.k_max,
                "fixed_steps": None if self.fixed_steps is None else list(self.fixed_steps)}


@ESTIMATORS.register("full_bp")
class FullBP(TruncatedBP):
    """Pathwise gradient through every step (DRaFT): unbiased, lowest variance, memory ∝ T without
    checkpointing; with ``checkpoint=True`` (default) one model call's activations at a time."""

    def __init__(self, checkpoint: bool = True) -> None:
        super().__init__(K=1, checkpoint=checkpoint)

    def top(self, T: int) -> int:
        return T

    def reward_grad_reason(self) -> str:
        return "it back-propagates the reward through every step"

    def check(self, schedule: GaussianSchedule) -> None:
        self.fixed_steps = ()
        self._remember_segment(schedule)

    def plan(self, schedule: GaussianSchedule, generator: torch.Generator | None = None) -> Plan:
        T = schedule.T
        return Plan(states=frozenset({T}), noises=frozenset(k for k in range(1, T + 1) if schedule.stochastic(k)), K=T)

    def describe(self) -> dict:
        return {"name": "full_bp", "checkpoint": self.checkpoint, "fixed_steps": []}
