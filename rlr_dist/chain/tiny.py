"""Tiny Gaussian chains with exact gradients, for estimator tests and benchmarks (spec §11.1); the Monte-Carlo
harness that runs estimators on them is :mod:`rlr_dist.estimators.montecarlo`.

* :class:`MLPChain` — ``ê_θ(x, k) = √(1−ᾱ_k) x + W2 tanh(W1 x + b1 + E_k) + b2``, shared across steps.
* :class:`LinearChain` — ``ê_θ(x, k) = √(1−ᾱ_k) (I + W) x + U_k``; with a quadratic reward ``E[R]`` and the per-step KL
  have closed forms, so :meth:`LinearChain.exact_objective` gives the *exact* gradient by autograd.

Both hold ``G`` independent parameter copies ``θ`` of shape ``(G, P)``; a batch of ``G·m`` samples uses
copy ``b // m``, so one autograd call of a batch-mean loss returns ``G`` independent batch gradients
(times ``1/G``). The ``√(1−ᾱ_k) x`` skip is the exact noise prediction for N(0, I) data, so the
untrained chains neither explode nor collapse. float64 throughout. ``step_delta`` (``(T+1, G, P)`` zeros requiring grad) gives per-step copies
``θ_k = θ + δ_k`` whose gradients are the per-step contributions ``g_k`` (spec §1).
"""
from __future__ import annotations


import torch
from torch import Tensor

from rlr_dist.chain.schedule import GaussianSchedule


def toy_schedule(T: int, eta: float = 1.0, deterministic_last: bool = False, kind: str = "logsnr") -> GaussianSchedule:
    """Schedules for the toy chains.

    ``"logsnr"``: ᾱ_k = sigmoid(λ_k), λ linear from 6 (k = 0) to −4 (k = T) — smooth, for the tests.
    ``"sd"``: Stable Diffusion 1.x's own ᾱ (scaled-linear β from 0.00085 to 0.012 over 1000 training
    steps) on T strided "leading" timesteps with offset 1, landing on ``alphas_cumprod[0]`` as
    ``set_alpha_to_one=False`` does — the step sizes a real fine-tuning run sees.
    """
    if kind == "logsnr":
        alpha_bar = torch.sigmoid(torch.linspace(6.0, -4.0, T + 1, dtype=torch.float64))
    elif kind == "sd":
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0)
        taus = torch.arange(T, dtype=torch.long) * (1000 // T) + 1  # τ_1 .. τ_T
        alpha_bar = torch.cat([ac[:1], ac[taus]])
    else:
        raise ValueError(f"toy schedule kind must be 'logsnr' or 'sd', got {kind!r}")
    return GaussianSchedule.from_alpha_bars(alpha_bar, eta=eta, last_step_eta=0.0 if deterministic_last else None)


class _GroupedChain:
    """Shared plumbing: grouped parameters, per-step copies, reference parameters."""

    def __init__(self, schedule: GaussianSchedule, P: int, G: int, init: Tensor, ref_noise: float, seed: int):
        self.schedule = schedule
        self.T, self.P, self.G = schedule.T, P, G
        gen = torch.Generator().manual_seed(seed + 1)
        self.theta = init.detach().clone().expand(G, P).clone().requires_grad_(True)
        # θ = θ_ref + noise, so the divergence to the reference is not zero
        self.theta_ref = (init - ref_noise * torch.randn(P, generator=gen, dtype=torch.float64)).detach()
        self.step_delta: Tensor | None = None

    def with_step_copies(self) -> Tensor:
        self.step_delta = torch.zeros(self.T + 1, self.G, self.P, dtype=torch.float64, requires_grad=True)
        return self.step_delta

    def trainable_parameters(self) -> list[Tensor]:
        return [self.theta]

    def _params(self, k: int) -> Tensor:
        th = self.theta
        return th if self.step_delta is None else th + self.step_delta[k]

    def _grouped(self, x: Tensor, th: Tensor) -> tuple[Tensor, int]:
        G = th.shape[0]
        return x.reshape(G, x.shape[0] // G, -1), G

    def _skip(self, k: int) -> float:
        return float((1 - self.schedule.alpha_bar[k]).sqrt())

    def mean(self, x: Tensor, k: int, cond=None) -> Tensor:
        return self.schedule.mean(x, self.eps_model(x, k, self._params(k)), k)

    def ref_mean(self, x: Tensor, k: int, cond=None) -> Tensor:
        return self.schedule.mean(x, self.eps_model(x, k, self.theta_ref[None]), k)


class MLPChain(_GroupedChain):
    def __init__(self, T: int = 6, D: int = 2, H: int = 8, G: int = 1, eta: float = 1.0,
                 deterministic_last: bool = False, ref_noise: float = 0.3, seed: int = 0, schedule: str = "logsnr"):
        self.D, self.H = D, H
        P = D * H + H + (T + 1) * H + H * D + D
        gen = torch.Generator().manual_seed(seed)
        init = 0.6 * torch.randn(P, generator=gen, dtype=torch.float64)
        super().__init__(toy_schedule(T, eta, deterministic_last, schedule), P, G, init, ref_noise, seed)

    def eps_model(self, x: Tensor, k: int, th: Tensor) -> Tensor:
        D, H, T = self.D, self.H, self.T
        sizes = [D * H, H, (T + 1) * H, H * D, D]
        W1, b1, E, W2, b2 = torch.split(th, sizes, dim=-1)
        G = th.shape[0]
        xg = x.reshape(G, x.shape[0] // G, D)
        E = E.reshape(G, T + 1, H)[:, k]
        h = torch.tanh(torch.einsum("gmd,gdh->gmh", xg, W1.reshape(G, D, H)) + (b1 + E)[:, None])
        out = torch.einsum("gmh,ghd->gmd", h, W2.reshape(G, H, D)) + b2[:, None]
        return self._skip(k) * x + out.reshape(x.shape)


class LinearChain(_GroupedChain):
    def __init__(self, T: int = 6, D: int = 2, G: int = 1, eta: float = 1.0, ref_noise: float = 0.1, seed: int = 0):
        self.D = D
        P = D * D + (T + 1) * D
        gen = torch.Generator().manual_seed(seed)
        init = 0.15 * torch.randn(P, generator=gen, dtype=torch.float64)
        super().__init__(toy_schedule(T, eta), P, G, init, ref_noise, seed)

    def _split(self, th: Tensor) -> tuple[Tensor, Tensor]:
        G, D, T = th.shape[0], self.D, self.T
        W, U = torch.split(th, [D * D, (T + 1) * D], dim=-1)
        return W.reshape(G, D, D), U.reshape(G, T + 1, D)

    def eps_model(self, x: Tensor, k: int, th: Tensor) -> Tensor:
        W, U = self._split(th)
        G = th.shape[0]
        xg = x.reshape(G, x.shape[0] // G, self.D)
        return (self._skip(k) * (xg + torch.einsum("gmd,ged->gme", xg, W)) + U[:, k][:, None]).reshape(x.shape)

    def _affine(self, k: int, th: Tensor) -> tuple[Tensor, Tensor]:
        """μ_k(x) = M x + c for each group: ``M (G,D,D)``, ``c (G,D)``."""
        one = torch.ones((), dtype=torch.float64)
        zero = torch.zeros((), dtype=torch.float64)
        a = self.schedule.mean(one, zero, k)
        b = self.schedule.mean(zero, one, k)
        W, U = self._split(th)
        M = a * torch.eye(self.D, dtype=torch.float64) + b * self._skip(k) * (torch.eye(self.D, dtype=torch.float64) + W)
        return M, b * U[:, k]

    def exact_objective(self, target: Tensor, beta: float = 0.0) -> Tensor:
        """``E[R] − β Σ_k E[KL_k]`` per group (G,), for ``R = −‖x_0 − target‖²``, exactly."""
        G, D = self.G, self.D
        m = torch.zeros(G, D, dtype=torch.float64)
        S = torch.eye(D, dtype=torch.float64).expand(G, D, D)
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
            S = M @ S @ M.transpose(1, 2) + s * s * torch.eye(D, dtype=torch.float64)
        ER = -((m - target).pow(2).sum(-1) + torch.diagonal(S, dim1=1, dim2=2).sum(-1))
        return ER - beta * kl


# ---------------------------------------------------------------------------------------------------
# rewards (smooth, bounded where possible); each returns (R, ∂R/∂x)


def bump_reward(x: Tensor, cond=None) -> tuple[Tensor, Tensor]:
    """``R(x) = exp(−‖x − a‖²/2) + 0.5 tanh(wᵀx)`` (spec §11.1)."""
    D = x.shape[-1]
    a = torch.tensor([0.5, -0.3] + [0.0] * (D - 2), dtype=x.dtype)
    w = torch.tensor([1.0, 0.5] + [0.0] * (D - 2), dtype=x.dtype)
    d = x - a
    g = torch.exp(-0.5 * d.pow(2).sum(-1))
    t = torch.tanh(x @ w)
    R = g + 0.5 * t
    dR = -g[:, None] * d + 0.5 * (1 - t * t)[:, None] * w
    return R, dR


def quadratic_reward(target: Tensor):
    def reward(x: Tensor, cond=None) -> tuple[Tensor, Tensor]:
        d = x - target.to(x.dtype)
        return -d.pow(2).sum(-1), -2 * d

    return reward
