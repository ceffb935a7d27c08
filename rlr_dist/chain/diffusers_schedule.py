"""Build a :class:`GaussianSchedule` from a diffusers ``DDIMScheduler`` / ``DDPMScheduler``.

The coefficients replicate what each scheduler's ``step`` computes (diffusers 0.42), so that
``schedule.mean(x, out, k) + sigma[k] * eps == scheduler.step(out, τ_k, x, ...).prev_sample``:

* DDIM: ``prev_t = t - num_train_timesteps // num_inference_steps`` (whatever the timestep spacing),
  ``ᾱ_prev = final_alpha_cumprod`` when ``prev_t < 0``; ``σ = η · sqrt(var(t, prev_t))``.
* DDPM: ``prev_t = scheduler.previous_timestep(t)``, ``ᾱ_prev = 1`` when ``prev_t < 0``;
  ``σ = sqrt(max(var, 1e-20))``, and no noise at ``t == 0``.

with ``var = (1 - ᾱ_prev) / (1 - ᾱ_t) · (1 - ᾱ_t / ᾱ_prev)``, evaluated here in float64 from the
scheduler's float32 ``alphas_cumprod``.
"""
from __future__ import annotations

import copy
import math

import torch

from rlr_dist.chain.schedule import DETERMINISTIC_VAR, GaussianSchedule

SUPPORTED_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler")
# 'fixed_small_log' draws with exp(0.5 * log(var)) = the same std as 'fixed_small'.
SUPPORTED_DDPM_VARIANCES = ("fixed_small", "fixed_small_log")


def _scheduler_kind(scheduler) -> str:
    from diffusers import DDIMScheduler, DDPMScheduler

    # Exact classes only: subclasses (e.g. DDPOScheduler-style wrappers) may change ``step``.
    if type(scheduler) is DDIMScheduler:
        return "ddim"
    if type(scheduler) is DDPMScheduler:
        return "ddpm"
    raise ValueError(
        f"schedule_from_diffusers: unsupported scheduler class {type(scheduler).__name__}; "
        f"supported: {', '.join(SUPPORTED_SCHEDULERS)}"
    )


def _check_config(kind: str, config, eta: float, last_step_eta: float | None) -> None:
    if config.thresholding:
        raise ValueError("scheduler config thresholding=True is not supported (x̂_0 would not be a fixed clamp)")
    if kind == "ddim":
        for name, value in (("eta", eta), ("last_step_eta", last_step_eta)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 for DDIMScheduler, got {value}")
    else:
        if config.variance_type not in SUPPORTED_DDPM_VARIANCES:
            raise ValueError(
                f"DDPMScheduler config variance_type={config.variance_type!r} is not supported; "
                f"supported: {SUPPORTED_DDPM_VARIANCES}"
            )
        if eta != 1.0:
            raise ValueError(f"eta={eta} given for DDPMScheduler, which has no eta (use DDIMScheduler, or eta=1.0)")
        if last_step_eta is not None:
            raise ValueError("last_step_eta is only supported for DDIMScheduler (DDPMScheduler has no eta)")


def schedule_from_diffusers(scheduler, num_inference_steps: int, eta: float = 1.0,
                            last_step_eta: float | None = None) -> GaussianSchedule:
    """The :class:`GaussianSchedule` that ``scheduler`` samples with ``num_inference_steps`` steps.

    ``eta`` is DDIM's η for every step, ``last_step_eta`` overrides it on step k = 1 (DDIM only).
    The user's scheduler is not modified (``set_timesteps`` runs on a deep copy).
    """
    kind = _scheduler_kind(scheduler)
    config = scheduler.config
    _check_config(kind, config, eta, last_step_eta)
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")

    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_inference_steps)
    T = num_inference_steps
    acp = sched.alphas_cumprod.to(torch.float64).tolist()
    # Diffusers loop index i = T - k, so step k runs at sched.timesteps[T - k].
    taus = [int(t) for t in sched.timesteps.flip(0)]

    alpha_bar = torch.full((T + 1,), float("nan"), dtype=torch.float64)
    alpha_bar_prev = torch.full((T + 1,), float("nan"), dtype=torch.float64)
    sigma = torch.zeros(T + 1, dtype=torch.float64)
    timesteps = torch.full((T + 1,), -1, dtype=torch.long)
    for k, t in enumerate(taus, start=1):
        ab = acp[t]
        if kind == "ddim":
            prev_t = t - config.num_train_timesteps // T
            ab_prev = acp[prev_t] if prev_t >= 0 else float(sched.final_alpha_cumprod)
        else:
            prev_t = int(sched.previous_timestep(t))
            ab_prev = acp[prev_t] if prev_t >= 0 else 1.0
        var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        if kind == "ddim":
            step_eta = last_step_eta if (k == 1 and last_step_eta is not None) else eta
            sig2 = step_eta**2 * max(var, 0.0)
            if 1 - ab_prev - sig2 < 0:  # only possible for eta > 1; diffusers would return NaN
                raise ValueError(f"eta={step_eta} too large at step k={k}: sigma^2 exceeds 1 - alpha_bar_prev")
        else:
            sig2 = max(var, DETERMINISTIC_VAR) if t > 0 else 0.0
        alpha_bar[k], alpha_bar_prev[k], timesteps[k] = ab, ab_prev, t
        sigma[k] = 0.0 if sig2 <= DETERMINISTIC_VAR else math.sqrt(sig2)

    clip = float(config.clip_sample_range) if config.clip_sample else None
    return GaussianSchedule(alpha_bar, alpha_bar_prev, sigma, timesteps, kind, config.prediction_type, clip)
