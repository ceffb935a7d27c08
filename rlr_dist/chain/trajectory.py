"""Trajectory records with selective recording, and the no-grad sampling pass that fills them.

An estimator decides *before* sampling which steps it will train on (its :class:`Plan`); the sampler
then stores only those states ``x_k`` and noises ``ε_k`` (plus per-step divergence values when a
regulariser needs them). Everything is detached and may be shipped to another process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rlr_dist.chain.base import Chain


@dataclass
class Plan:
    """What one optimiser step will train on, drawn before sampling.

    states / noises: the steps ``k`` whose ``x_k`` / ``ε_k`` must be recorded (``x_0`` is always kept);
    ``record_all`` also keeps ``x_T`` and every noise (SPSA re-runs the chain with common random numbers).
    ``window``: the stochastic steps of a flow sampler this iteration (drawn by the learner with the plan;
    ``None``: the model's configured schedule) — samplers and learners build their chain from it.
    The remaining fields are estimator-specific and opaque to the sampler.
    """

    states: frozenset[int] = frozenset()
    noises: frozenset[int] = frozenset()
    record_all: bool = False
    j: int | None = None                 # RLR: first (lowest) step of the half-order block
    h: int | None = None                 # RLR: block length
    steps: tuple[int, ...] = ()          # likelihood-ratio steps this iteration trains on
    step_weight: float = 1.0             # importance weight of each of those steps (|C|/K when subsampled)
    K: int | None = None                 # truncated BP: number of last steps back-propagated
    seed: int | None = None              # SPSA perturbation seed
    window: frozenset[int] | None = None # flow samplers: this iteration's stochastic steps (None: as configured)

    def needs_state(self, k: int) -> bool:
        return k in self.states

    def needs_noise(self, k: int) -> bool:
        return self.record_all or k in self.noises


@dataclass
class Trajectory:
    """A batch of sampled chains ``x_T -> ... -> x_0`` (only the recorded parts).

    x[k], eps[k]: state entering step k and the noise injected at step k, shape ``(B, *latent)``;
    delta: ``(B, T+1)`` per-step ``‖μ_θ − μ_ref‖² / σ_k²`` at the sampled states (column k = step k,
    0 where σ_k = 0 or column 0); the per-step Gaussian KL is ``delta / 2``.
    """

    x0: Tensor
    x: dict[int, Tensor]
    eps: dict[int, Tensor]
    sigma: Tensor
    timesteps: Tensor
    plan: Plan
    cond: Any = None
    prompt_ids: Tensor | None = None
    delta: Tensor | None = None
    seed: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def T(self) -> int:
        return self.sigma.shape[0] - 1

    @property
    def batch_size(self) -> int:
        return self.x0.shape[0]

    def state(self, k: int) -> Tensor:
        if k == 0:
            return self.x0
        if k not in self.x:
            raise KeyError(f"state x_{k} was not recorded (plan records {sorted(self.x)})")
        return self.x[k]

    def noise(self, k: int) -> Tensor:
        if k not in self.eps:
            raise KeyError(f"noise ε_{k} was not recorded (plan records {sorted(self.eps)})")
        return self.eps[k]

    def to(self, device: str | torch.device) -> "Trajectory":
        """A copy with every tensor on ``device`` (plan, seed and meta shared)."""
        def mv(v: Any) -> Any:
            return v.to(device) if isinstance(v, Tensor) else v

        return Trajectory(x0=mv(self.x0), x={k: mv(v) for k, v in self.x.items()},
                          eps={k: mv(v) for k, v in self.eps.items()}, sigma=mv(self.sigma),
                          timesteps=mv(self.timesteps), plan=self.plan, cond=mv(self.cond),
                          prompt_ids=mv(self.prompt_ids), delta=mv(self.delta), seed=self.seed, meta=self.meta)

    def select(self, keep: Tensor) -> "Trajectory":
        """The samples where ``keep`` (B,) is true (e.g. dropping non-finite rewards)."""
        def sel(v: Any) -> Any:
            return v[keep] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == keep.shape[0] else v

        return Trajectory(x0=sel(self.x0), x={k: sel(v) for k, v in self.x.items()},
                          eps={k: sel(v) for k, v in self.eps.items()}, sigma=self.sigma,
                          timesteps=self.timesteps, plan=self.plan, cond=sel(self.cond),
                          prompt_ids=sel(self.prompt_ids), delta=sel(self.delta), seed=self.seed, meta=self.meta)

    def nbytes(self) -> int:
        tensors = [self.x0, *self.x.values(), *self.eps.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def sq_norm(t: Tensor) -> Tensor:
    """Per-sample squared norm over all latent dims, in fp32 or better."""
    t = t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t.flatten(1).pow(2).sum(1)


def inner(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product over all latent dims, in fp32 or better."""
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()
    return (a * b.to(a.dtype)).flatten(1).sum(1)


@torch.no_grad()
def sample(
    chain: Chain,
    x_T: Tensor,
    plan: Plan,
    cond: Any = None,
    generator: torch.Generator | None = None,
    with_reference: bool = False,
    prompt_ids: Tensor | None = None,
    seed: int | None = None,
) -> Trajectory:
    """Run the chain from ``x_T`` without gradients, recording what ``plan`` asks for.

    With ``with_reference`` the reference mean is evaluated at every sampled state to record
    ``delta`` (needed by every regulariser: reward-to-go shaping and logging of the KL).
    """
    sched = chain.schedule
    T = sched.T
    sigma = sched.sigma
    B = x_T.shape[0]
    x = x_T
    xs: dict[int, Tensor] = {}
    eps: dict[int, Tensor] = {}
    delta = torch.zeros(B, T + 1, dtype=torch.float64, device=x_T.device) if with_reference else None
    if plan.record_all:
        xs[T] = x_T.clone()
    for k in range(T, 0, -1):
        if plan.needs_state(k):
            xs[k] = x.clone()
        mu = chain.mean(x, k, cond)
        s = float(sigma[k])
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) if s > 0 else torch.zeros_like(x)
        if delta is not None and s > 0:
            delta[:, k] = (sq_norm(mu - chain.ref_mean(x, k, cond)) / s**2).double()
        if plan.needs_noise(k):
            eps[k] = noise
        x = mu + s * noise
    return Trajectory(x0=x, x=xs, eps=eps, sigma=sigma.clone(), timesteps=sched.timesteps.clone(), plan=plan,
                      cond=cond, prompt_ids=prompt_ids, delta=delta, seed=seed)
