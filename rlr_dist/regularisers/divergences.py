"""Divergences toward the reference chain (spec §6.2, §7.1, §7.2). Pure torch, float64-safe.

Two families live here.

* **Step-wise closed forms** (``STEPWISE``, spec §7.2): the f-divergence ``d_f(δ)`` between two
  equal-variance Gaussian transitions ``N(μ_θ, s²I)`` and ``N(μ_ref, s²I)`` as a differentiable function of
  ``δ = ‖μ_θ − μ_ref‖² / s²``. Convention ``D_f(P‖Q) = E_Q[f(dP/dQ)]``, P = fine-tuned, Q = reference:

  ============  =====================================  =================================
  name          f(u)                                   d(δ)
  ============  =====================================  =================================
  ``kl``        u log u                                δ/2
  ``amari``     (u^α − 1 − α(u−1)) / (α(α−1))          (1 − exp(−α(1−α)δ/2)) / (α(1−α))
  ``hellinger`` (√u − 1)²                              2(1 − exp(−δ/8))
  ``chi2``      (u − 1)²                               exp(δ) − 1
  ``tv``        ½|u − 1|  (total-variation distance)   2Φ(√δ/2) − 1
  ============  =====================================  =================================

  ``tv`` is the TV *distance* (values in [0, 1]), i.e. f = ½|u−1|, which is what the formula of §7.2 is;
  with f = |u−1| the value would be twice that. It is not differentiable in δ at 0 (slope → ∞); we
  return value 0 and gradient 0 there (a valid sub-gradient for μ: the gradient w.r.t. μ stays bounded).

* **f-divergences for the surrogate-reward route** (``FDIVS``, spec §7.1 table): each class gives ``f``,
  ``f_prime``, ``inv_f_prime`` (the optimal tilt ``p*/p_ref = (f')⁻¹(y)``, ``y = (R − λ)/β``), its log and
  log-derivative, and the open domain ``(y_lo, y_hi)`` of y where the tilt is positive and finite:
  below ``y_lo`` the tilt is exactly 0 (positive part, e.g. χ², Amari α > 1), at/above ``y_hi`` no u
  solves ``f'(u) = y`` and ``inv_f_prime`` returns +inf (the supremum; forward KL, Hellinger, JS,
  Amari α < 1). :func:`solve_lambda` finds the normaliser λ, :func:`surrogate_reward` the reward
  ``R̃ = β log (f')⁻¹((R − λ)/β)`` and ``dR̃/dR``.

Adding a divergence is one decorated class (``@STEPWISE.register("name")`` / ``@FDIVS.register("name")``).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rlr_dist.registry import ParamError, Registry

__all__ = ["STEPWISE", "FDIVS", "StepwiseDivergence", "FDivergence", "SurrogateReward", "solve_lambda",
           "surrogate_reward"]

_LOG2 = math.log(2.0)


STEPWISE: Registry = Registry("step-wise divergence", group="rlr_dist.stepwise_divergences")
FDIVS: Registry = Registry("f-divergence", group="rlr_dist.f_divergences")


def _check_alpha(alpha: Any) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ParamError("alpha", f"must be a real number, got {alpha!r}") from None
    if not math.isfinite(a) or isinstance(alpha, bool):
        raise ParamError("alpha", f"must be a finite real number, got {alpha!r}")
    if a in (0.0, 1.0):
        raise ParamError("alpha", f"must not be 0 or 1 (got {a:g}): those limits are the KL divergences, "
                         "use 'kl' (step-wise) or 'forward_kl' / 'reverse_kl' (surrogate)")
    return a


def _check_beta(beta: Any) -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ParamError("beta", f"must be a real number > 0, got {beta!r}") from None
    if not (math.isfinite(b) and b > 0):
        raise ParamError("beta", f"must be a finite number > 0, got {beta!r}")
    return b


def _as_tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)


class _Described:
    """Name (from the registry), parameters, ``describe()`` and ``repr`` shared by both families."""

    registry_name: str = "?"

    def params(self) -> dict:
        return {}

    @property
    def name(self) -> str:
        return self.registry_name

    def describe(self) -> dict:
        return {"name": self.name, **self.params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


# ====================================================================== step-wise closed forms (§7.2)


class StepwiseDivergence(_Described):
    """``d(δ)``: f-divergence between ``N(μ_θ, s²I)`` and ``N(μ_ref, s²I)``, ``δ = ‖μ_θ − μ_ref‖²/s²``.

    ``__call__`` is elementwise, differentiable and keeps ``delta``'s dtype and device.
    """


    def __call__(self, delta: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError



@STEPWISE.register("kl")
class StepKL(StepwiseDivergence):
    """KL (either direction for equal variances): ``δ/2``."""

    def __call__(self, delta: Tensor) -> Tensor:
        return 0.5 * _as_tensor(delta)


@STEPWISE.register("amari")
class StepAmari(StepwiseDivergence):
    """Amari α: ``(1 − exp(−α(1−α)δ/2)) / (α(1−α))``; α ∈ (0,1) saturates, α > 1 or α < 0 stiffens.

    ``alpha`` defaults to 0.5 (= 2 × squared Hellinger). α → 0 or 1 tends to KL (δ/2).
    """

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = _check_alpha(alpha)
        self._c = self.alpha * (1.0 - self.alpha)

    def __call__(self, delta: Tensor) -> Tensor:
        delta = _as_tensor(delta)
        return -torch.expm1(-0.5 * self._c * delta) / self._c

    def params(self) -> dict:
        return {"alpha": self.alpha}


@STEPWISE.register("hellinger")
class StepHellinger(StepwiseDivergence):
    """Squared Hellinger with ``f = (√u − 1)²``: ``2(1 − exp(−δ/8))`` (bounded by 2)."""

    def __call__(self, delta: Tensor) -> Tensor:
        return -2.0 * torch.expm1(-_as_tensor(delta) / 8.0)


@STEPWISE.register("chi2")
class StepChi2(StepwiseDivergence):
    """Pearson χ² with ``f = (u − 1)²`` (either direction for equal variances): ``exp(δ) − 1``."""

    def __call__(self, delta: Tensor) -> Tensor:
        return torch.expm1(_as_tensor(delta))


@STEPWISE.register("tv")
class StepTV(StepwiseDivergence):
    """Total-variation distance (``f = ½|u − 1|``): ``2Φ(√δ/2) − 1 = erf(√δ / (2√2))``.

    At δ = 0 (and δ < 0) the value is 0 and the gradient 0 instead of the one-sided +∞ slope.
    """

    def __call__(self, delta: Tensor) -> Tensor:
        delta = _as_tensor(delta)
        pos = delta > 0
        safe = torch.where(pos, delta, torch.ones_like(delta))
        r = torch.where(pos, torch.sqrt(safe), torch.zeros_like(delta))
        out = torch.special.erf(r / (2.0 * math.sqrt(2.0)))
        return torch.where(torch.isnan(delta), delta, out)


# ====================================================================== f-divergences, surrogate route (§7.1)


def _log1mexp(z: Tensor) -> Tensor:
    """``log(1 − e^z)`` for z < 0, accurate at both ends."""
    return torch.where(z > -_LOG2, torch.log(-torch.expm1(z)), torch.log1p(-torch.exp(z)))


class FDivergence(_Described):
    """An f-divergence ``D_f(P‖Q) = E_Q[f(dP/dQ)]`` and the optimal tilt of ``max E_P[R] − β D_f(P‖Q)``.

    Subclasses define ``f``, ``f_prime`` (for ``u ≥ 0``) and, for ``y`` inside the open domain
    ``(y_lo, y_hi)``, ``_tilt`` = ``(f')⁻¹(y)``, ``_log_tilt`` and ``_dlog_tilt`` = ``d log (f')⁻¹(y) / dy``.
    The public ``inv_f_prime`` / ``log_inv_f_prime`` / ``d_log_inv_f_prime`` extend them to all y:
    tilt 0 (log −inf, slope 0) at ``y ≤ y_lo``, +inf (slope 0) at ``y ≥ y_hi``, NaN stays NaN.
    """

    y_lo: float = -math.inf
    y_hi: float = math.inf

    # ---- to be provided by subclasses
    def f(self, u: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def f_prime(self, u: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _tilt(self, y: Tensor) -> Tensor:
        return torch.exp(self._log_tilt(y))

    def _log_tilt(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _dlog_tilt(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- generic
    @property
    def domain(self) -> tuple[float, float]:
        """Open interval ``(y_lo, y_hi)`` of ``y = (R − λ)/β`` on which the tilt is positive and finite."""
        return (self.y_lo, self.y_hi)

    @property
    def y_one(self) -> float:
        """``f'(1)``: the y of an untilted sample (always inside the domain)."""
        return float(self.f_prime(torch.ones((), dtype=torch.float64)))

    def in_domain(self, y: Tensor) -> Tensor:
        y = _as_tensor(y)
        return (y > self.y_lo) & (y < self.y_hi)

    def _extend(self, y: Tensor, fn, below: float, above: float) -> Tensor:
        y = _as_tensor(y)
        inside = self.in_domain(y)
        ys = torch.where(inside, y, torch.full_like(y, self.y_one))
        out = torch.where(inside, fn(ys), torch.where(y <= self.y_lo, torch.full_like(y, below),
                                                      torch.full_like(y, above)))
        return torch.where(torch.isnan(y), y, out)

    def inv_f_prime(self, y: Tensor) -> Tensor:
        """The tilt ``p*/p_ref = (f')⁻¹(y)``: 0 at ``y ≤ y_lo`` (positive part), +inf at ``y ≥ y_hi``."""
        return self._extend(y, self._tilt, 0.0, math.inf)

    def log_inv_f_prime(self, y: Tensor) -> Tensor:
        """``log (f')⁻¹(y)`` computed stably; −inf at ``y ≤ y_lo``, +inf at ``y ≥ y_hi``."""
        return self._extend(y, self._log_tilt, -math.inf, math.inf)

    def d_log_inv_f_prime(self, y: Tensor) -> Tensor:
        """``d log (f')⁻¹(y) / dy`` (= ``dR̃/dR``); 0 outside the domain."""
        return self._extend(y, self._dlog_tilt, 0.0, 0.0)

    def lambda_closed_form(self, rewards: Tensor, beta: float) -> float | None:
        """Optional exact λ (float64 1-D ``rewards``); ``None`` → bisection in :func:`solve_lambda`."""
        return None

    def exact_surrogate(self, R: Tensor, beta: float, lam: float) -> tuple[Tensor, Tensor] | None:
        """Optional exact ``(R̃, dR̃/dR)``; ``None`` → the generic stable-log route."""
        return None



@FDIVS.register("reverse_kl")
class ReverseKL(FDivergence):
    """``KL(P‖Q)``: f = u log u, tilt ``e^{y−1}``, ``R̃ = R − λ − β`` exactly (dR̃/dR = 1)."""

    def f(self, u):
        u = _as_tensor(u)
        return torch.xlogy(u, u)

    def f_prime(self, u):
        return torch.log(_as_tensor(u)) + 1.0

    def _tilt(self, y):
        return torch.exp(y - 1.0)

    def _log_tilt(self, y):
        return y - 1.0

    def _dlog_tilt(self, y):
        return torch.ones_like(y)

    def lambda_closed_form(self, rewards, beta):
        n = rewards.numel()
        return float(beta * (torch.logsumexp(rewards / beta, 0) - math.log(n) - 1.0))

    def exact_surrogate(self, R, beta, lam):
        return R - lam - beta, torch.ones_like(R)


@FDIVS.register("forward_kl")
class ForwardKL(FDivergence):
    """``KL(Q‖P)``: f = −log u, tilt ``−1/y`` (y < 0), i.e. ``β/(λ − R)`` with λ > max R."""

    y_hi = 0.0

    def f(self, u):
        return -torch.log(_as_tensor(u))

    def f_prime(self, u):
        return -1.0 / _as_tensor(u)

    def _tilt(self, y):
        return -1.0 / y

    def _log_tilt(self, y):
        return -torch.log(-y)

    def _dlog_tilt(self, y):
        return -1.0 / y


@FDIVS.register("alpha")
class Amari(FDivergence):
    """Amari α (α ∉ {0, 1}): f = (u^α − 1 − α(u−1))/(α(α−1)), tilt ``(1 + (α−1)y)_+^{1/(α−1)}``.

    α > 1: tilt 0 for ``y ≤ −1/(α−1)``; α < 1: defined for ``y < 1/(1−α)``. α = 2 is ½χ², α = ½ is
    2 × squared Hellinger; α → 1 / α → 0 recover reverse / forward KL (up to a shift of λ).
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = _check_alpha(alpha)
        self._a = self.alpha - 1.0
        if self._a > 0:
            self.y_lo = -1.0 / self._a
        else:
            self.y_hi = -1.0 / self._a

    def f(self, u):
        u = _as_tensor(u)
        al = self.alpha
        return (torch.expm1(al * torch.log(u)) - al * (u - 1.0)) / (al * (al - 1.0))

    def f_prime(self, u):
        u = _as_tensor(u)
        return torch.expm1(self._a * torch.log(u)) / self._a

    def _log_tilt(self, y):
        return torch.log1p(self._a * y) / self._a

    def _dlog_tilt(self, y):
        return 1.0 / (1.0 + self._a * y)

    def params(self) -> dict:
        return {"alpha": self.alpha}


@FDIVS.register("chi2")
class Chi2(FDivergence):
    """Pearson χ²: f = (u − 1)², tilt ``(1 + y/2)_+`` (0 for y ≤ −2)."""

    y_lo = -2.0

    def f(self, u):
        return (_as_tensor(u) - 1.0) ** 2

    def f_prime(self, u):
        return 2.0 * (_as_tensor(u) - 1.0)

    def _tilt(self, y):
        return 1.0 + 0.5 * y

    def _log_tilt(self, y):
        return torch.log1p(0.5 * y)

    def _dlog_tilt(self, y):
        return 1.0 / (2.0 + y)


@FDIVS.register("hellinger")
class Hellinger(FDivergence):
    """Squared Hellinger: f = (√u − 1)², tilt ``(1 − y)^{−2}`` (y < 1)."""

    y_hi = 1.0

    def f(self, u):
        return (torch.sqrt(_as_tensor(u)) - 1.0) ** 2

    def f_prime(self, u):
        return 1.0 - torch.rsqrt(_as_tensor(u))

    def _tilt(self, y):
        return (1.0 - y) ** -2

    def _log_tilt(self, y):
        return -2.0 * torch.log1p(-y)

    def _dlog_tilt(self, y):
        return 2.0 / (1.0 - y)


@FDIVS.register("js")
class JensenShannon(FDivergence):
    """Jensen–Shannon (½-weighted): f = ½[u log u − (1+u) log((1+u)/2)], tilt ``e^{2y}/(2 − e^{2y})``
    (y < ½ log 2)."""

    y_hi = 0.5 * _LOG2

    def f(self, u):
        u = _as_tensor(u)
        return 0.5 * (torch.xlogy(u, u) - (1.0 + u) * (torch.log1p(u) - _LOG2))

    def f_prime(self, u):
        u = _as_tensor(u)
        return 0.5 * (_LOG2 + torch.log(u) - torch.log1p(u))

    # z = 2y − log 2 < 0 on the domain; tilt = e^z / (1 − e^z) = 1 / expm1(−z)
    def _tilt(self, y):
        return 1.0 / torch.expm1(_LOG2 - 2.0 * y)

    def _log_tilt(self, y):
        z = 2.0 * y - _LOG2
        return z - _log1mexp(z)

    def _dlog_tilt(self, y):
        return -2.0 / torch.expm1(2.0 * y - _LOG2)


# ====================================================================== λ and the surrogate reward


def _as_fdiv(fdiv: FDivergence | str) -> FDivergence:
    if isinstance(fdiv, str):
        return FDIVS.build(fdiv)
    if not isinstance(fdiv, FDivergence):
        raise ValueError(f"fdiv must be an FDivergence instance or one of {FDIVS.names()}, got {fdiv!r}")
    return fdiv


def _check_rewards(rewards: Any, what: str = "rewards") -> Tensor:
    R = torch.as_tensor(rewards)
    if R.is_complex():
        raise ValueError(f"{what} must be real, got dtype {R.dtype}")
    R = R.detach().to(torch.float64)
    bad = ~torch.isfinite(R)
    if bool(bad.any()):
        idx = torch.nonzero(bad.flatten()).flatten()[:8].tolist()
        raise ValueError(f"{what} contain non-finite values (NaN/inf), e.g. at flat indices {idx}")
    return R


def solve_lambda(rewards: Tensor, fdiv: FDivergence | str, beta: float) -> float:
    """The λ with ``mean((f')⁻¹((R − λ)/β)) = 1`` over the batch ``rewards`` (any shape, flattened).

    Works in float64 on the CPU. With ``t = (max R − λ)/β`` (the y of the best sample) the mean tilt is
    non-decreasing in t and the root lies in ``[f'(1), f'(n)]`` (the best sample's tilt is between the
    mean, 1, and n × the mean), which is inside the domain; bisection there is exact to float64
    resolution. The returned λ keeps every sample strictly inside the domain on its upper side
    (e.g. forward KL: λ > max R). Reverse KL uses the closed form ``β(logsumexp(R/β) − log n − 1)``.

    Raises ValueError for an empty batch, non-finite rewards, ``beta <= 0`` or if no root is found.
    """
    beta = _check_beta(beta)
    fdiv = _as_fdiv(fdiv)
    R = _check_rewards(rewards).cpu().flatten()
    n = R.numel()
    if n == 0:
        raise ValueError("rewards is empty: cannot solve for lambda on an empty batch")

    lam = fdiv.lambda_closed_form(R, beta)
    closed_form = lam is not None
    if not closed_form:
        rmax = float(R.max())
        d = (R - rmax) / beta  # <= 0; y_i = d_i + t

        def g(t: float) -> float:
            return float(fdiv.inv_f_prime(d + t).mean()) - 1.0

        lo, hi = (float(v) for v in fdiv.f_prime(torch.tensor([1.0, float(n)], dtype=torch.float64)))
        g_lo, g_hi = g(lo), g(hi)
        if not (g_lo <= 1e-12 and g_hi >= -1e-12):
            raise ValueError(f"no root for lambda ({fdiv!r}, beta={beta}): mean tilt - 1 is {g_lo:.3g} at "
                             f"t=f'(1) and {g_hi:.3g} at t=f'(n); is f convex with f' increasing?")
        for _ in range(4000):
            if g_lo == 0.0 or g_hi == 0.0:
                break
            mid = 0.5 * (lo + hi)
            if not (lo < mid < hi):
                break
            gm = g(mid)
            if gm > 0:
                hi, g_hi = mid, gm
            elif gm < 0:
                lo, g_lo = mid, gm
            else:
                lo = hi = mid
                g_lo = g_hi = 0.0
                break
        t, gt = (lo, g_lo) if abs(g_lo) <= abs(g_hi) else (hi, g_hi)
        if not (math.isfinite(gt) and abs(gt) <= 1e-6):
            raise ValueError(f"no root for lambda ({fdiv!r}, beta={beta}): best |mean tilt - 1| = {abs(gt):.3g}")
        lam = rmax - beta * t

    if not math.isfinite(lam):
        raise ValueError(f"no finite root for lambda ({fdiv!r}, beta={beta}); got {lam}")
    if not closed_form:
        lam = _polish(R, fdiv, beta, lam)
    # keep every sample strictly below the upper end of the domain after rounding of λ
    if math.isfinite(fdiv.y_hi):
        rmax = float(R.max())
        for k in range(64):
            if (rmax - lam) / beta < fdiv.y_hi:
                break
            lam += math.ulp(lam) * 2.0 ** k
    return float(lam)


def _polish(R: Tensor, fdiv: FDivergence, beta: float, lam: float) -> float:
    """Move λ by a few ulps so that the mean tilt evaluated as users do, ``(R − λ)/β``, is closest to 1.

    The root in t is exact; representing λ = max R − βt as a float can cost more than 1e-8 in the mean
    tilt when |R| ≫ β and the tilt is steep (e.g. rewards ~1e3, β = 0.05, Amari α < 0).
    """
    def err(l: float) -> float:
        v = abs(float(fdiv.inv_f_prime((R - l) / beta).mean()) - 1.0)
        return v if math.isfinite(v) else math.inf

    best, e_best = lam, err(lam)
    for direction in (math.inf, -math.inf):
        cur = lam
        for _ in range(64):
            cur = math.nextafter(cur, direction)
            e = err(cur)
            if e < e_best:
                best, e_best = cur, e
            elif e > e_best:
                break
    return best


class SurrogateReward(NamedTuple):
    """Result of :func:`surrogate_reward`; a 3-tuple ``(reward, dreward, clamped)``."""

    reward: Tensor   #: ``R̃ = β log tilt`` (same shape as R)
    dreward: Tensor  #: ``dR̃/dR`` (elementwise; 0 where clamped)
    clamped: Tensor  #: bool mask of entries whose tilt was clamped to ``[tilt_floor, tilt_ceil]``


def surrogate_reward(R: Tensor, fdiv: FDivergence | str, beta: float, lam: float, *,
                     tilt_floor: float = 1e-12, tilt_ceil: float = 1e12) -> SurrogateReward:
    """``R̃ = β log (f')⁻¹((R − λ)/β)`` and ``dR̃/dR = d log (f')⁻¹(y)/dy`` elementwise (spec §7.1).

    Computed in float64 from the stable log-tilt (returned in ``R``'s floating dtype, on its device).
    Clamping (reported in ``clamped``; ``dR̃/dR = 0`` there): for families whose tilt reaches 0 (χ²,
    Amari α > 1) the tilt is floored at ``tilt_floor``; for families whose tilt blows up at a finite y
    (forward KL, Hellinger, JS, Amari α < 1) it is capped at ``tilt_ceil`` — which also covers samples
    beyond the domain (e.g. forward KL with R ≥ λ for a λ fitted on other samples). The tilt is
    ``p*/p_ref``, normalised to batch mean 1 when λ comes from :func:`solve_lambda`, so the bounds are
    relative to that mean; with such a λ the cap never binds (max tilt ≤ n). Reverse KL is exact and never
    clamped: ``R̃ = R − λ − β``, ``dR̃/dR = 1``. Clamping keeps R̃ non-decreasing in R.
    """
    beta = _check_beta(beta)
    fdiv = _as_fdiv(fdiv)
    try:
        lam = float(lam)
    except (TypeError, ValueError):
        raise ValueError(f"lam must be a finite number, got {lam!r}") from None
    if not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number, got {lam!r}")
    if not (0 < tilt_floor <= 1 <= tilt_ceil < math.inf):
        raise ValueError(f"need 0 < tilt_floor <= 1 <= tilt_ceil < inf, got {tilt_floor}, {tilt_ceil}")
    R_in = torch.as_tensor(R)
    out_dtype = R_in.dtype if R_in.is_floating_point() else torch.float64
    R64 = _check_rewards(R_in)

    exact = fdiv.exact_surrogate(R64, beta, lam)
    if exact is not None:
        Rt, dRt = exact
        clamped = torch.zeros_like(R64, dtype=torch.bool)
    else:
        y = (R64 - lam) / beta
        logt = fdiv.log_inv_f_prime(y)
        dlog = fdiv.d_log_inv_f_prime(y)
        clamped = torch.zeros_like(R64, dtype=torch.bool)
        lo, hi = math.log(tilt_floor), math.log(tilt_ceil)
        if math.isfinite(fdiv.y_lo):
            clamped |= logt < lo
        if math.isfinite(fdiv.y_hi):
            clamped |= logt > hi
        logt = torch.where(clamped, logt.clamp(lo, hi), logt)
        Rt = beta * logt
        dRt = torch.where(clamped, torch.zeros_like(dlog), dlog)
    return SurrogateReward(Rt.to(out_dtype), dRt.to(out_dtype), clamped)
