"""The sampler as a Gaussian chain: ``x_{k-1} = mu_theta(x_k, k, c) + sigma_k * eps_k``.

Step index convention (spec §1): steps run ``k = T, ..., 1``; step ``k`` maps ``x_k -> x_{k-1}``
and ``x_0`` is the output. Arrays below are indexed by ``k`` (index 0 describes the state after the
last step and is unused for per-step quantities).

Pure torch: this file knows nothing of Ray, and of diffusers only in :func:`GaussianSchedule.from_diffusers`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
KINDS = ("ddim", "ddpm")
# sigma^2 at or below this is a deterministic step (diffusers' DDPM clamps its variance to 1e-20).
DETERMINISTIC_VAR = 1e-20


@dataclass
class GaussianSchedule:
    """Closed-form per-step coefficients of a DDIM(eta) / DDPM sampler.

    Attributes (all 1-D float64 tensors of length ``T + 1``, indexed by step ``k``):
      alpha_bar:      ``ᾱ_k`` at the model timestep of step k (index 0 unused).
      alpha_bar_prev: ``ᾱ_{k-1}``, the cumulative alpha the step lands on.
      sigma:          ``σ_k`` (0 for a deterministic step).
      timesteps:      the model timestep ``τ_k`` fed to the denoiser (index 0 is -1).
    """

    alpha_bar: Tensor
    alpha_bar_prev: Tensor
    sigma: Tensor
    timesteps: Tensor
    kind: str = "ddim"
    prediction_type: str = "epsilon"
    clip_sample_range: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"schedule.kind must be one of {KINDS}, got {self.kind!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"schedule.prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        n = self.alpha_bar.shape[0]
        for name in ("alpha_bar_prev", "sigma", "timesteps"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"schedule.{name} must have length T+1={n}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_alpha_bars(
        cls,
        alpha_bar: Tensor,
        eta: float = 1.0,
        last_step_eta: float | None = None,
        timesteps: Tensor | None = None,
        prediction_type: str = "epsilon",
    ) -> "GaussianSchedule":
        """DDIM(eta) chain from the sequence ``ᾱ_0, ᾱ_1, ..., ᾱ_T`` (``ᾱ_0`` = where the last step lands).

        Used by the toy chains; diffusers schedulers go through :meth:`from_diffusers`.
        """
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
        T = ab.shape[0] - 1
        if T < 1:
            raise ValueError("alpha_bar needs at least two entries (ᾱ_0 and ᾱ_1)")
        if not bool(torch.all(ab[1:] < ab[:-1])):
            raise ValueError("alpha_bar must decrease strictly with k (more noise at larger k)")
        cur = torch.cat([ab.new_full((1,), float("nan")), ab[1:]])
        prev = torch.cat([ab.new_full((1,), float("nan")), ab[:-1]])
        etas = torch.full((T + 1,), float(eta), dtype=torch.float64)
        if last_step_eta is not None:
            etas[1] = float(last_step_eta)
        var = (1 - prev) / (1 - cur) * (1 - cur / prev)
        sigma = etas * var.clamp_min(0).sqrt()
        sigma[0] = 0.0
        sigma = torch.where(sigma**2 <= DETERMINISTIC_VAR, torch.zeros_like(sigma), sigma)
        if timesteps is None:
            timesteps = torch.arange(T + 1, dtype=torch.long) - 1
            timesteps[0] = -1
        return cls(cur, prev, sigma, torch.as_tensor(timesteps, dtype=torch.long), "ddim", prediction_type)

    @classmethod
    def from_diffusers(cls, scheduler, num_inference_steps: int, eta: float = 1.0,
                       last_step_eta: float | None = None) -> "GaussianSchedule":
        from rlr_dist.chain.diffusers_schedule import schedule_from_diffusers

        return schedule_from_diffusers(scheduler, num_inference_steps, eta=eta, last_step_eta=last_step_eta)

    # ------------------------------------------------------------------ properties
    @property
    def T(self) -> int:
        return self.alpha_bar.shape[0] - 1

    def stochastic(self, k: int) -> bool:
        return bool(self.sigma[k] > 0)

    # ------------------------------------------------------------------ maths
    def _coef(self, values: Tensor, k: int | Tensor, like: Tensor) -> Tensor:
        """Coefficient for step k (int, or a (B,) tensor of per-sample steps), broadcastable to ``like``."""
        if isinstance(k, int):
            return values[k].to(like.dtype)
        v = values.to(like.device)[k.to(like.device)].to(like.dtype)
        return v.reshape(v.shape + (1,) * (like.dim() - 1))

    def predictions(self, x: Tensor, model_output: Tensor, k: int | Tensor) -> tuple[Tensor, Tensor]:
        """``(x̂_0, ê)`` from the model output at step k, as the diffusers schedulers compute them
        (ê from the unclipped x̂_0; x̂_0 clipped when ``clip_sample_range`` is set)."""
        ab = self._coef(self.alpha_bar, k, x)
        sa, sb = ab.sqrt(), (1 - ab).sqrt()
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x - sb * eps) / sa
        elif self.prediction_type == "v_prediction":
            x0 = sa * x - sb * model_output
            eps = sa * model_output + sb * x
        else:  # "sample"
            x0 = model_output
            eps = (x - sa * x0) / sb
        if self.clip_sample_range is not None:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0, eps

    def mean(self, x: Tensor, model_output: Tensor, k: int | Tensor) -> Tensor:
        """``μ(x_k, k)`` given the (guided) model output at ``x_k``; differentiable in both."""
        x0, eps = self.predictions(x, model_output, k)
        ab_prev = self._coef(self.alpha_bar_prev, k, x)
        if self.kind == "ddim":
            sig = self._coef(self.sigma, k, x)
            return ab_prev.sqrt() * x0 + (1 - ab_prev - sig**2).clamp_min(0).sqrt() * eps
        ab = self._coef(self.alpha_bar, k, x)
        alpha = ab / ab_prev
        beta = 1 - alpha
        return (ab_prev.sqrt() * beta / (1 - ab)) * x0 + (alpha.sqrt() * (1 - ab_prev) / (1 - ab)) * x

    def step(self, x: Tensor, model_output: Tensor, k: int | Tensor, noise: Tensor) -> Tensor:
        """``x_{k-1} = μ + σ_k ε_k``."""
        return self.mean(x, model_output, k) + self._coef(self.sigma, k, x) * noise

    def to_dict(self) -> dict:
        return {
            "alpha_bar": self.alpha_bar.tolist(), "alpha_bar_prev": self.alpha_bar_prev.tolist(),
            "sigma": self.sigma.tolist(), "timesteps": self.timesteps.tolist(), "kind": self.kind,
            "prediction_type": self.prediction_type, "clip_sample_range": self.clip_sample_range,
        }
