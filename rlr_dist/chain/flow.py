"""Flow-matching samplers (SD3 / FLUX / Wan class models) as Gaussian chains (spec §13, docs/flow.md).

Flow time ``t ∈ [0, 1]``: ``x_t = (1 − t)·x_data + t·noise`` (``t = 1`` is pure noise); the model predicts
the velocity ``v(x, t, c) ≈ E[noise − data | x_t]``. Sampling runs ``t_T > ... > t_0 = 0``; step ``k`` maps
``x_k`` (at ``t = t_k``) to ``x_{k-1}`` (at ``t' = t_{k-1}``) with ``dt = t' − t < 0``. Every transition is
affine in ``(x, v)``::

    x_{k-1} = a_k·x_k + b_k·v(x_k, t_k, c) + σ_k·ε_k,     ε_k ~ N(0, I),

so a :class:`FlowSchedule` only stores ``a_k`` (``coef_x``), ``b_k`` (``coef_v``) and the transition std
``σ_k`` (``sigma``; 0 on a deterministic step). It has the protocol of
:class:`~rlr_dist.chain.schedule.GaussianSchedule` (``sigma``, ``timesteps``, ``T``, ``stochastic``,
``mean``, ``step``, ``to_dict``), so :class:`~rlr_dist.chain.denoiser.DenoiserChain`,
:func:`~rlr_dist.chain.trajectory.sample` and every estimator run on it unchanged.

Naming: ``sigma`` is the *transition std* (as everywhere in this package), never the flow time; flow
time is ``flow_t`` (diffusers calls it ``sigmas``).

Transitions (``transition=``), applied on the steps of the stochastic ``window`` (ODE steps elsewhere):

* ``ode``: Euler ``x' = x + v·dt`` — what ``FlowMatchEulerDiscreteScheduler.step`` computes.
* ``flow_sde``: Euler–Maruyama of the marginal-preserving reverse SDE
  ``dx = [v − (s²/2)∇log p_t]dt + s dW̄`` with ``∇log p_t(x) = −(x + (1−t)v)/t`` and Flow-GRPO's
  ``s = η√(t/(1−t))``: ``a = 1 + s²dt/(2t)``, ``b = (1 + s²(1−t)/(2t))·dt``, ``σ = s√(−dt)``.
* ``cps`` (coefficient-preserving): ``x̂₀ = x − t·v``, ``x̂₁ = x + (1−t)·v``, ``σ = t'·sin(ηπ/2)``,
  ``μ = (1−t')·x̂₀ + √(t'² − σ²)·x̂₁``.

Pure torch: this file knows nothing of Ray, and of diffusers only in :meth:`FlowSchedule.from_diffusers`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor

TRANSITIONS = ("ode", "flow_sde", "cps")
# How flow_sde's s = η√(t/(1−t)) is evaluated at t = 1 (where it is infinite), with t_g the first flow
# time below 1: "next" uses s(t_g) = η√(t_g/(1−t_g)); "flow_grpo" uses η√(1/(1−t_g)) (Flow-GRPO's code
# replaces only the denominator), larger by 1/√t_g.
T1_GUARDS = ("next", "flow_grpo")
REDUCTIONS = ("sum", "mean_compat")


@dataclass
class FlowSchedule:
    """Per-step coefficients of a flow-matching sampler (see the module docstring).

    Defining fields:
      flow_t:      ``t_k`` for k = 0..T (float64; ``flow_t[0]`` is where the last step lands, usually 0).
      timesteps:   model time fed to the velocity model at step k (diffusers convention ``t·1000``,
                   float32 exactly as the scheduler's ``timesteps``; index 0 is −1, unused).
      transition:  one of :data:`TRANSITIONS`; ``eta`` its noise level (``cps``: η ∈ [0, 1]).
      window:      the steps that use ``transition``; all others are ODE steps. ``None`` = every step.
      t1_guard:    flow_sde's ``s`` at ``t = 1`` (:data:`T1_GUARDS`).
      log_prob_scale: multiplies every log-density the estimators form (likelihood-ratio terms, KL costs):
                   1 = the exact density (default); ``1/D`` is the ``mean_compat`` reduction of
                   Flow-GRPO-style trainers, kept only for comparison (see :func:`log_prob`).

    Derived (float64, length T + 1, index 0 unused = 0): ``coef_x`` (a_k), ``coef_v`` (b_k), ``sigma``
    (σ_k, the transition std; 0 on ODE steps and wherever the transition's std vanishes).
    """

    flow_t: Tensor
    timesteps: Tensor
    transition: str = "ode"
    eta: float = 0.0
    window: frozenset[int] | None = None
    t1_guard: str = "next"
    log_prob_scale: float = 1.0
    coef_x: Tensor = field(init=False, repr=False)
    coef_v: Tensor = field(init=False, repr=False)
    sigma: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.transition not in TRANSITIONS:
            raise ValueError(f"schedule.transition must be one of {TRANSITIONS}, got {self.transition!r}")
        if self.t1_guard not in T1_GUARDS:
            raise ValueError(f"schedule.t1_guard must be one of {T1_GUARDS}, got {self.t1_guard!r}")
        self.flow_t = torch.as_tensor(self.flow_t, dtype=torch.float64)
        self.timesteps = torch.as_tensor(self.timesteps, dtype=torch.float32)
        self.eta = float(self.eta)
        T = self.flow_t.shape[0] - 1
        if T < 1:
            raise ValueError("flow_t needs at least two entries (t_0 and t_1)")
        if self.timesteps.shape[0] != T + 1:
            raise ValueError(f"schedule.timesteps must have length T+1={T + 1}")
        if not bool(torch.all(torch.isfinite(self.flow_t))):
            raise ValueError(f"flow_t is not finite: {self.flow_t.tolist()}")
        if not bool(torch.all(self.flow_t[1:] > self.flow_t[:-1])):
            raise ValueError("flow_t must increase strictly with k (sampling runs t_T > ... > t_0)")
        if self.eta < 0 or (self.transition == "cps" and self.eta > 1):
            raise ValueError(f"eta={self.eta} out of range for transition {self.transition!r} "
                             + ("(cps needs 0 <= eta <= 1)" if self.transition == "cps" else "(needs eta >= 0)"))
        win = frozenset(range(1, T + 1)) if self.window is None else frozenset(int(k) for k in self.window)
        if not win <= set(range(1, T + 1)):
            raise ValueError(f"window steps must lie in 1..{T}, got {sorted(win)}")
        self.window = win
        if self.transition != "ode" and win and not (float(self.flow_t[0]) >= 0 and float(self.flow_t[-1]) <= 1):
            raise ValueError(f"stochastic transitions need flow times in [0, 1], got "
                             f"[{float(self.flow_t[0])}, {float(self.flow_t[-1])}]")
        self.coef_x, self.coef_v, self.sigma = self._coefficients()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_flow_times(cls, flow_times: Iterable[float] | Tensor, transition: str = "ode", eta: float = 0.0,
                        window: Iterable[int] | None = None, num_train_timesteps: int = 1000,
                        t1_guard: str = "next") -> "FlowSchedule":
        """Schedule from flow times in *sampling order* ``t_T, ..., t_0`` (e.g. ``[1.0, 0.5, 0.0]``),
        already shifted. Model time = ``t·num_train_timesteps`` rounded to float32, as diffusers does."""
        t = torch.as_tensor(list(flow_times) if not isinstance(flow_times, Tensor) else flow_times,
                            dtype=torch.float64).flip(0)
        ts = (t.float() * num_train_timesteps).float()
        ts[0] = -1.0
        return cls(t, ts, transition, eta, None if window is None else frozenset(window), t1_guard)

    @classmethod
    def from_diffusers(cls, scheduler_or_config: Any, num_inference_steps: int, transition: str = "ode",
                       eta: float = 0.0, window: Iterable[int] | None = None, mu: float | None = None,
                       sigmas: Iterable[float] | None = None, t1_guard: str = "next") -> "FlowSchedule":
        """The schedule ``FlowMatchEulerDiscreteScheduler`` samples with (``transition="ode"`` reproduces its
        ``step`` to float32 rounding).

        ``scheduler_or_config``: a ``FlowMatchEulerDiscreteScheduler`` (not modified: ``set_timesteps`` runs
        on a deep copy) or its config dict. ``mu``: the resolution-dependent shift, required with
        ``use_dynamic_shifting`` (see :func:`resolution_mu`; ignored otherwise, as in diffusers).
        ``sigmas``: custom *unshifted* flow times, forwarded to ``set_timesteps`` (as the FLUX pipeline
        passes ``linspace(1, 1/N, N)``) — the scheduler shifts them itself, so passing the scheduler's own
        (already shifted) ``scheduler.sigmas`` back would shift twice.

        Supported configs: ``shift``, ``use_dynamic_shifting`` (``time_shift_type`` exponential / linear),
        ``shift_terminal``, karras / exponential / beta sigmas — everything ``set_timesteps`` does to the
        flow times. Refused: ``invert_sigmas`` (Mochi's reversed time), and ``stochastic_sampling`` unless
        ``transition="cps", eta=1`` on every step (which is exactly what that mode samples).
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        if isinstance(scheduler_or_config, FlowMatchEulerDiscreteScheduler):
            if type(scheduler_or_config) is not FlowMatchEulerDiscreteScheduler:
                raise ValueError(f"FlowSchedule.from_diffusers: unsupported scheduler subclass "
                                 f"{type(scheduler_or_config).__name__} (its step may differ)")
            sched = copy.deepcopy(scheduler_or_config)
        elif hasattr(scheduler_or_config, "keys"):
            sched = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_or_config))
        else:
            raise ValueError(f"FlowSchedule.from_diffusers: expected a FlowMatchEulerDiscreteScheduler or its "
                             f"config, got {type(scheduler_or_config).__name__}")
        cfg = sched.config
        if cfg.invert_sigmas:
            raise ValueError("scheduler config invert_sigmas=True (Mochi) is not supported: its flow time "
                             "runs the other way, so the velocity→score identity of the SDE transitions does not hold")
        if cfg.stochastic_sampling and not (transition == "cps" and eta == 1.0 and window is None):
            raise ValueError("scheduler config stochastic_sampling=True samples x' = (1−t')x̂₀ + t'·noise, which is "
                             "transition='cps', eta=1.0 on every step; pass that (or a config without "
                             "stochastic_sampling)")
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("scheduler config use_dynamic_shifting=True needs mu (see resolution_mu)")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        sched.set_timesteps(num_inference_steps, sigmas=None if sigmas is None else list(sigmas), mu=mu)
        T = int(sched.num_inference_steps)
        flow_t = sched.sigmas.to(torch.float64).flip(0)           # flow_t[k] = sigmas[T - k]
        ts = torch.cat([torch.full((1,), -1.0), sched.timesteps.to(torch.float32).flip(0)])
        if flow_t.shape[0] != T + 1 or ts.shape[0] != T + 1:
            raise ValueError("unexpected scheduler state after set_timesteps (sigmas/timesteps length)")
        return cls(flow_t, ts, transition, eta, None if window is None else frozenset(window), t1_guard)

    def with_window(self, window: Iterable[int] | None) -> "FlowSchedule":
        """The same sampler with another stochastic window (e.g. this iteration's, see :func:`fixed_window`)."""
        return FlowSchedule(self.flow_t, self.timesteps, self.transition, self.eta,
                            None if window is None else frozenset(window), self.t1_guard, self.log_prob_scale)

    def with_transition(self, transition: str, window: Iterable[int] | None = None) -> "FlowSchedule":
        """The same flow times with another transition (e.g. ``"ode"``: the deterministic sampler)."""
        return FlowSchedule(self.flow_t, self.timesteps, transition, self.eta,
                            None if window is None else frozenset(window), self.t1_guard, self.log_prob_scale)

    # ------------------------------------------------------------------ coefficients
    def _flow_sde_s(self, k: int) -> float:
        """Flow-GRPO's diffusion coefficient ``s = η√(t/(1−t))`` at step k, guarded at ``t = 1``."""
        t = float(self.flow_t[k])
        if t < 1.0:
            return self.eta * math.sqrt(t / (1.0 - t))
        below = [float(v) for v in self.flow_t if float(v) < 1.0]
        t_g = max(below)  # flow_t[0] < 1 always (strictly increasing), so this exists
        num = t_g if self.t1_guard == "next" else 1.0
        return self.eta * math.sqrt(num / (1.0 - t_g)) if t_g > 0 else 0.0

    def _coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        T = self.T
        a = torch.zeros(T + 1, dtype=torch.float64)
        b = torch.zeros(T + 1, dtype=torch.float64)
        std = torch.zeros(T + 1, dtype=torch.float64)
        for k in range(1, T + 1):
            t, tp = float(self.flow_t[k]), float(self.flow_t[k - 1])
            dt = float(self.flow_t[k - 1] - self.flow_t[k])  # exact: both are float32 values from diffusers
            kind = self.transition if (k in self.window and self.eta > 0) else "ode"
            if kind == "ode":
                a[k], b[k] = 1.0, dt
            elif kind == "flow_sde":
                s = self._flow_sde_s(k)
                a[k] = 1.0 + s * s * dt / (2.0 * t)
                b[k] = (1.0 + s * s * (1.0 - t) / (2.0 * t)) * dt
                std[k] = s * math.sqrt(-dt)
            else:  # cps
                half = self.eta * math.pi / 2
                s, c = tp * math.sin(half), tp * math.cos(half)  # c = √(t'² − s²)
                a[k] = (1.0 - tp) + c
                b[k] = -(1.0 - tp) * t + c * (1.0 - t)
                std[k] = s
        return a, b, std

    # ------------------------------------------------------------------ protocol
    @property
    def T(self) -> int:
        return self.flow_t.shape[0] - 1

    def stochastic(self, k: int) -> bool:
        return bool(self.sigma[k] > 0)

    def _coef(self, values: Tensor, k: int | Tensor, like: Tensor) -> Tensor:
        """Coefficient for step k (int, or a (B,) tensor of per-sample steps), broadcastable to ``like``."""
        if isinstance(k, int):
            return values[k].to(like.dtype)
        v = values.to(like.device)[k.to(like.device)].to(like.dtype)
        return v.reshape(v.shape + (1,) * (like.dim() - 1))

    def mean(self, x: Tensor, model_output: Tensor, k: int | Tensor) -> Tensor:
        """``μ(x_k, k) = a_k x + b_k v``; differentiable in both. Computed in the promoted dtype of ``x``
        and ``v`` (a bf16 velocity with fp32 latents gives an fp32 mean)."""
        like = x if x.dtype == torch.promote_types(x.dtype, model_output.dtype) else model_output
        return self._coef(self.coef_x, k, like) * x + self._coef(self.coef_v, k, like) * model_output

    def step(self, x: Tensor, model_output: Tensor, k: int | Tensor, noise: Tensor) -> Tensor:
        """``x_{k-1} = μ + σ_k ε_k``."""
        mu = self.mean(x, model_output, k)
        return mu + self._coef(self.sigma, k, mu) * noise

    def to_dict(self) -> dict:
        return {
            "kind": "flow", "flow_t": self.flow_t.tolist(), "timesteps": self.timesteps.tolist(),
            "transition": self.transition, "eta": self.eta, "window": sorted(self.window),
            "t1_guard": self.t1_guard, "log_prob_scale": self.log_prob_scale, "coef_x": self.coef_x.tolist(), "coef_v": self.coef_v.tolist(),
            "sigma": self.sigma.tolist(),
        }


# ---------------------------------------------------------------------------------------------------
# resolution-dependent shift


def resolution_mu(config: Any, image_seq_len: int) -> float:
    """``mu`` for ``use_dynamic_shifting``: linear in the latent token count between
    ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)`` of the scheduler config,
    as the FLUX / SD3 pipelines compute it."""
    get = config.get if hasattr(config, "get") else (lambda key, default=None: getattr(config, key, default))
    lo_n, hi_n = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
    lo_s, hi_s = get("base_shift", 0.5), get("max_shift", 1.15)
    slope = (hi_s - lo_s) / (hi_n - lo_n)
    return float(lo_s + slope * (image_seq_len - lo_n))


# ---------------------------------------------------------------------------------------------------
# stochastic windows (sets of steps k); positions are loop indices i = T − k (i = 0: first step, at noise)


def _window(T: int, start: int, length: int) -> frozenset[int]:
    if not (length >= 0 and 0 <= start and start + length <= T):
        raise ValueError(f"window start={start}, length={length} does not fit in T={T} steps")
    return frozenset(T - i for i in range(start, start + length))


def fixed_window(T: int, start: int, length: int) -> frozenset[int]:
    """The ``length`` sampler steps starting at loop index ``start`` (0 = the first step, at the noise)."""
    return _window(T, start, length)


def sliding_window(T: int, length: int, iteration: int, every: int = 1, stride: int = 1, start: int = 0,
                   max_start: int | None = None) -> frozenset[int]:
    """MixGRPO-style window that moves toward the output: loop-index start
    ``min(start + stride·(iteration // every), max_start)`` (``max_start`` defaults to ``T − length``:
    once at the end it stays there)."""
    if every < 1 or stride < 0 or iteration < 0:
        raise ValueError(f"sliding_window needs every >= 1, stride >= 0, iteration >= 0; got {every}, {stride}, {iteration}")
    cap = T - length if max_start is None else max_start
    return _window(T, min(start + stride * (iteration // every), cap), length)


def random_window(T: int, length: int, generator: torch.Generator | None = None, lo: int = 0,
                  hi: int | None = None) -> frozenset[int]:
    """One window per batch with a loop-index start drawn uniformly from ``lo..hi`` (``hi`` defaults to
    ``T − length``), as Flow-GRPO-Fast does. Draws one integer from ``generator``."""
    hi = T - length if hi is None else hi
    if not 0 <= lo <= hi <= T - length:
        raise ValueError(f"random_window: need 0 <= lo <= hi <= T - length, got lo={lo}, hi={hi}, T={T}, length={length}")
    start = int(torch.randint(lo, hi + 1, (1,), generator=generator))
    return _window(T, start, length)


# ---------------------------------------------------------------------------------------------------
# log-densities


def log_prob(x_next: Tensor, mean: Tensor, std: float | Tensor, reduction: str = "sum") -> Tensor:
    """Per-sample Gaussian transition log-density ``log N(x_next; mean, std² I)`` (float64, shape (B,)).

    ``reduction="sum"`` (the default, and the only one that is a log-density): summed over every latent
    dimension, ``−‖x' − μ‖²/(2 std²) − D log std − (D/2) log 2π``. ``"mean_compat"`` divides by D as
    Flow-GRPO-style trainers do — a compatibility option only: it rescales each step's term by 1/D, so
    a KL weight β or a likelihood ratio built from it changes meaning with the resolution.
    The difference ``x' − μ`` is taken in float64 from the given tensors (no fp32 cancellation).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    d = (x_next.double() - mean.double()).flatten(1)
    D = d.shape[1]
    s = torch.as_tensor(std, dtype=torch.float64, device=d.device).reshape(-1)
    if bool(torch.any(s <= 0)):
        raise ValueError("log_prob needs std > 0 (a deterministic step has no density)")
    lp = -d.pow(2).sum(1) / (2 * s**2) - D * torch.log(s) - 0.5 * D * math.log(2 * math.pi)
    return lp / D if reduction == "mean_compat" else lp


@dataclass
class Rollout:
    """Every state of a sampled batch and the log-density of each transition as the sampler saw it.

    x: ``(T+1, B, *latent)``, ``x[k]`` the state entering step k (``x[0]`` the output);
    log_prob: ``(B, T+1)`` float64, column k = ``log p(x_{k-1} | x_k)`` (0 on deterministic steps and column 0).
    """

    x: Tensor
    log_prob: Tensor


@torch.no_grad()
def rollout(chain: Any, x_T: Tensor, cond: Any = None, generator: torch.Generator | None = None,
            reduction: str = "sum") -> Rollout:
    """Sample like :func:`~rlr_dist.chain.trajectory.sample` (same noise draws from ``generator``) and record
    every state plus each stochastic transition's log-density at sampling time — the "old" log-probs of a
    PPO-style trainer, and the reference of the on-policy consistency test."""
    sched = chain.schedule
    T, B = sched.T, x_T.shape[0]
    xs = [x_T] * (T + 1)
    lp = torch.zeros(B, T + 1, dtype=torch.float64, device=x_T.device)
    x = x_T
    for k in range(T, 0, -1):
        xs[k] = x
        mu = chain.mean(x, k, cond)
        s = float(sched.sigma[k])
        if s > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = mu + s * noise
            lp[:, k] = log_prob(x, mu, s, reduction)
        else:
            x = mu
    xs[0] = x
    return Rollout(torch.stack(xs), lp)


def recompute_log_prob(chain: Any, x: Tensor, x_next: Tensor, k: int, cond: Any = None,
                       reduction: str = "sum") -> Tensor:
    """``log p_θ(x_next | x)`` of step k recomputed from a record (graph kept to the parameters)."""
    return log_prob(x_next, chain.mean(x, k, cond), float(chain.schedule.sigma[k]), reduction)
