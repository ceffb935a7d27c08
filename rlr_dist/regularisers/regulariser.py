"""Regularisers toward the pretrained (reference) chain, as used by every estimator (spec §6–7).

A regulariser contributes to the objective ``J = E[R̃(x_0)] − β Σ_k E[c_k]`` where ``c_k`` is a per-step
divergence of the Gaussian transitions, a function of ``δ_k = ‖μ_θ(x_k) − μ_ref(x_k)‖² / σ_k²``.

``shaping=True`` ("exact" mode) makes every estimator unbiased for ``∇J``: the likelihood-ratio weight
of step m becomes the reward-to-go ``G^(m) = R̃ − β Σ_{k<m} c_k``, and costs inside back-propagated
segments are differentiated pathwise as well as explicitly. ``shaping=False`` is DPOK's explicit-only
gradient ``β Σ_k ∇_θ c_k(sg x_k)`` (cheaper, biased for ``∇J``).

Deterministic steps (σ_k = 0, e.g. the usual last step) carry no cost: their KL is infinite unless the
means agree, so they are treated as a fixed decoder and excluded (spec §12 item 14).

Surrogate-reward f-divergences (``fdiv``) replace R by ``R̃ = β log (f')⁻¹((R − λ)/β)`` and then use
the KL machinery: the KL-regularised optimum for R̃ is the f-regularised optimum for R (spec §7.1).
"""
from __future__ import annotations

from torch import Tensor

from rlr_dist.registry import Registry, check_param
from rlr_dist.regularisers.divergences import FDIVS, STEPWISE, solve_lambda, surrogate_reward

REGULARISERS: Registry[type["Regulariser"]] = Registry("regulariser", group="rlr_dist.regularisers")


class Regulariser:
    beta: float = 0.0
    shaping: bool = True

    @property
    def active(self) -> bool:
        return self.beta > 0

    def cost(self, delta: Tensor) -> Tensor:
        """Per-step divergence ``c(δ)`` (elementwise, differentiable)."""
        return 0.5 * delta

    def transform_reward(self, R: Tensor, dR: Tensor | None) -> tuple[Tensor, Tensor | None, dict]:
        """Reward actually optimised (identity unless a surrogate f-divergence is used)."""
        return R, dR, {}

    def describe(self) -> dict:
        return {"name": getattr(self, "registry_name", type(self).__name__), "beta": self.beta, "shaping": self.shaping}


def _check_beta(beta: float) -> float:
    beta = float(beta)
    check_param("beta", beta >= 0, f"must be >= 0, got {beta}")
    return beta


@REGULARISERS.register("none")
class NoRegulariser(Regulariser):
    def __init__(self) -> None:
        self.beta = 0.0


@REGULARISERS.register("kl_exact")
class KLExact(Regulariser):
    """Per-step Gaussian KL ``δ/2`` with reward-to-go shaping: unbiased for the KL-regularised objective."""

    def __init__(self, beta: float = 0.01) -> None:
        self.beta = _check_beta(beta)
        self.shaping = True


@REGULARISERS.register("kl_dpok")
class KLDPOK(Regulariser):
    """DPOK: per-step KL differentiated at the sampled states only (explicit term, no shaping)."""

    def __init__(self, beta: float = 0.01) -> None:
        self.beta = _check_beta(beta)
        self.shaping = False


@REGULARISERS.register("stepwise")
class Stepwise(Regulariser):
    """Closed-form per-step f-divergence between the two Gaussian transitions (spec §7.2).

    ``divergence`` is one of the step-wise forms (``kl``, ``amari`` with ``alpha``, ``hellinger``,
    ``chi2``, ``tv``). Note ``Σ_k E[d_f]`` is a valid mean-matching regulariser but is not the path
    f-divergence for f ≠ KL.
    """

    def __init__(self, beta: float = 0.01, divergence: str = "amari", shaping: bool = True, **params) -> None:
        self.beta = _check_beta(beta)
        self.shaping = bool(shaping)
        self.divergence = divergence
        self.params = params
        self._d = STEPWISE.build(divergence, params)

    @classmethod
    def check_params(cls, divergence: str = "amari", **params) -> None:
        STEPWISE.check(divergence, {k: v for k, v in params.items() if k not in ("beta", "shaping")})

    def cost(self, delta: Tensor) -> Tensor:
        return self._d(delta)

    def describe(self) -> dict:
        return {**super().describe(), "divergence": self.divergence, **self.params}


@REGULARISERS.register("fdiv")
class SurrogateF(Regulariser):
    """Path f-divergence through the surrogate reward, then per-step KL with shaping (spec §7.1).

    ``lam="auto"`` solves λ on each batch of rewards (a ratio-type estimate; slightly biased);
    a number fixes it (e.g. solved once on reference-model samples with :meth:`fit_lambda`).
    """

    def __init__(self, beta: float = 0.01, f: str = "forward_kl", lam: float | str = "auto", **params) -> None:
        self.beta = _check_beta(beta)
        check_param("beta", self.beta > 0, "must be > 0 for the surrogate-reward f-divergence")
        self.shaping = True
        self.f_name = f
        self.params = params
        self.fdiv = FDIVS.build(f, params)
        check_param("lam", lam == "auto" or isinstance(lam, (int, float)), f"must be 'auto' or a number, got {lam!r}")
        self.lam = lam

    @classmethod
    def check_params(cls, f: str = "forward_kl", **params) -> None:
        FDIVS.check(f, {k: v for k, v in params.items() if k not in ("beta", "lam")})

    def fit_lambda(self, reference_rewards: Tensor) -> float:
        self.lam = float(solve_lambda(reference_rewards.detach().double(), self.fdiv, self.beta))
        return self.lam

    def transform_reward(self, R: Tensor, dR: Tensor | None) -> tuple[Tensor, Tensor | None, dict]:
        R64 = R.detach().double()
        lam = float(solve_lambda(R64, self.fdiv, self.beta)) if self.lam == "auto" else float(self.lam)
        Rt, dRt, clamped = surrogate_reward(R64, self.fdiv, self.beta, lam)
        n_clamped = int(clamped.sum())
        dR_new = None
        if dR is not None:
            dR_new = dR * dRt.to(dR.dtype).reshape((-1,) + (1,) * (dR.dim() - 1))
        return Rt.to(R.dtype), dR_new, {"fdiv/lambda": lam, "fdiv/clamped": n_clamped}

    def describe(self) -> dict:
        return {**super().describe(), "f": self.f_name, "lam": self.lam, **self.params}


REGULARISERS.base = Regulariser
