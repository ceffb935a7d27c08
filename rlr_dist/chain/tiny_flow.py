"""Tiny flow-matching chains with exact answers, for the estimator tests (spec §13, docs/flow.md).

* :class:`LinearFlowChain` — velocity linear in x, ``v_θ(x, t) = c(t)·x + (A0 + t·A1)·x + b0 + t·b1`` with
  ``c(t) = (2t − 1)/((1−t)² + t²)`` the exact velocity of N(0, I) data (so the untrained chain is sane).
  ``A``, ``b`` depend on t through shared parameters, so every step's Jacobian involves the same θ —
  steps are coupled as in a real model. Every transition is affine in x, so each marginal is Gaussian
  and :meth:`LinearFlowChain.exact_objective` gives ``E[R] − β·KL`` in closed form: its autograd is the
  exact gradient. It plugs into :func:`rlr_dist.estimators.montecarlo.estimate` like :class:`rlr_dist.chain.tiny.LinearChain`
  (``G`` grouped parameter copies, ``step_delta`` per-step copies).
* :func:`gaussian_data_marginal` — the exact law of ``x_0`` when a :class:`FlowSchedule` samples with the
  *true* velocity of diagonal-Gaussian data (the marginal-preservation check).

float64 throughout.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from rlr_dist.chain.flow import FlowSchedule
from rlr_dist.chain.tiny import _GroupedChain


def tiny_flow_schedule(T: int, transition: str = "flow_sde", eta: float = 0.7, window: Iterable[int] | None = None,
                      shift: float = 1.0) -> FlowSchedule:
    """Uniform flow times ``1, (T−1)/T, ..., 0`` with SD3's static shift ``s·t/(1 + (s−1)·t)``."""
    t = torch.linspace(1.0, 0.0, T + 1, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return FlowSchedule.from_flow_times(t, transition=transition, eta=eta, window=window)


def _base_velocity(t: float) -> float:
    """Exact velocity coefficient of N(0, I) data: ``E[x1 − x0 | x_t] = c(t)·x_t``."""
    return (2 * t - 1) / ((1 - t) ** 2 + t**2)


class LinearFlowChain(_GroupedChain):
    """``μ_θ(x_k) = a_k x + b_k v_θ(x, t_k)`` with the linear velocity above; θ = (A0, A1, b0, b1), P = 2D² + 2D."""

    def __init__(self, T: int = 6, D: int = 2, G: int = 1, transition: str = "flow_sde", eta: float = 0.7,
                 window: Iterable[int] | None = None, ref_noise: float = 0.1, seed: int = 0,
                 schedule: FlowSchedule | None = None):
        self.D = D
        P = 2 * D * D + 2 * D
        gen = torch.Generator().manual_seed(seed)
        init = 0.15 * torch.randn(P, generator=gen, dtype=torch.float64)
        sched = schedule if schedule is not None else tiny_flow_schedule(T, transition, eta, window)
        super().__init__(sched, P, G, init, ref_noise, seed)

    def _split(self, th: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        G, D = th.shape[0], self.D
        A0, A1, b0, b1 = torch.split(th, [D * D, D * D, D, D], dim=-1)
        return A0.reshape(G, D, D), A1.reshape(G, D, D), b0, b1

    def _linear(self, k: int, th: Tensor) -> tuple[Tensor, Tensor]:
        """``v(x) = W x + u`` at step k for each group: ``W (G,D,D)``, ``u (G,D)``."""
        t = float(self.schedule.flow_t[k])
        A0, A1, b0, b1 = self._split(th)
        eye = torch.eye(self.D, dtype=torch.float64)
        return _base_velocity(t) * eye + A0 + t * A1, b0 + t * b1

    def velocity(self, x: Tensor, k: int, th: Tensor) -> Tensor:
        W, u = self._linear(k, th)
        G = th.shape[0]
        xg = x.reshape(G, x.shape[0] // G, self.D)
        return (torch.einsum("gmd,ged->gme", xg, W) + u[:, None]).reshape(x.shape)

    def mean(self, x: Tensor, k: int, cond=None) -> Tensor:
        return self.schedule.mean(x, self.velocity(x, k, self._params(k)), k)

    def ref_mean(self, x: Tensor, k: int, cond=None) -> Tensor:
        return self.schedule.mean(x, self.velocity(x, k, self.theta_ref[None]), k)

    def _affine(self, k: int, th: Tensor) -> tuple[Tensor, Tensor]:
        """``μ_k(x) = M x + c``: ``M = a_k I + b_k W``, ``c = b_k u``."""
        W, u = self._linear(k, th)
        a, b = float(self.schedule.coef_x[k]), float(self.schedule.coef_v[k])
        return a * torch.eye(self.D, dtype=torch.float64) + b * W, b * u

    def exact_objective(self, target: Tensor, beta: float = 0.0) -> Tensor:
        """``E[R] − β Σ_k E[KL_k]`` per group (G,), exactly, for ``R = −‖x_0 − target‖²`` and the per-step
        Gaussian KL ``‖μ_θ − μ_ref‖²/(2σ_k²)`` summed over the stochastic steps (σ_k > 0) only."""
        G, D = self.G, self.D
        eye = torch.eye(D, dtype=torch.float64)
        m = torch.zeros(G, D, dtype=torch.float64)
        S = eye.expand(G, D, D)
        kl = torch.zeros(G, dtype=torch.float64)
        for k in range(self.T, 0, -1):
            M, c = self._affine(k, self._params(k))
            s = float(self.schedule.sigma[k])
            if beta > 0 and s > 0:
                Mr, cr = self._affine(k, self.theta_ref[None])
                dM, dc = M - Mr, c - cr
                dm = torch.einsum("gij,gj->gi", dM, m) + dc
                kl = kl + (dm.pow(2).sum(-1) + torch.einsum("gij,gjk,gik->g", dM, S, dM)) / (2 * s * s)
            m = torch.einsum("gij,gj->gi", M, m) + c
            S = M @ S @ M.transpose(1, 2) + s * s * eye
        ER = -((m - target).pow(2).sum(-1) + torch.diagonal(S, dim1=1, dim2=2).sum(-1))
        return ER - beta * kl


# ---------------------------------------------------------------------------------------------------
# exact Gaussian data: marginal preservation


def gaussian_data_velocity(t: float, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """True velocity of data ``N(mean, diag(var))`` at flow time t, ``v(x) = α ⊙ x + β`` (elementwise).

    ``x_t = (1−t) x_0 + t x_1`` is Gaussian with mean ``(1−t)·mean`` and variance ``(1−t)²var + t²``;
    ``Cov(x_1 − x_0, x_t) = t − (1−t)·var``, so ``E[x_1 − x_0 | x_t]`` is affine with slope
    ``α = (t − (1−t)var)/((1−t)²var + t²)`` and ``v((1−t)·mean) = −mean``.
    """
    alpha = (t - (1 - t) * var) / ((1 - t) ** 2 * var + t**2)
    return alpha, -mean - alpha * (1 - t) * mean


def gaussian_data_marginal(schedule: FlowSchedule, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Exact mean and variance of ``x_0`` when ``schedule`` samples from ``x_T ~ N(0, I)`` with the true
    velocity of ``N(mean, diag(var))`` data (every state stays Gaussian: the steps are affine)."""
    m = torch.zeros_like(mean, dtype=torch.float64)
    v = torch.ones_like(var, dtype=torch.float64)
    for k in range(schedule.T, 0, -1):
        alpha, beta = gaussian_data_velocity(float(schedule.flow_t[k]), mean.double(), var.double())
        a, b, s = float(schedule.coef_x[k]), float(schedule.coef_v[k]), float(schedule.sigma[k])
        g = a + b * alpha
        m = g * m + b * beta
        v = g * g * v + s * s
    return m, v


def gaussian_kl(m: Tensor, v: Tensor, m_ref: Tensor, v_ref: Tensor) -> float:
    """``KL(N(m, diag v) ‖ N(m_ref, diag v_ref))`` summed over dimensions."""
    return float(0.5 * (v / v_ref + (m - m_ref) ** 2 / v_ref - 1 + torch.log(v_ref / v)).sum())
