"""The Recursive Likelihood Ratio (RLR) estimator — the RLR loss lives in this file (spec §3).

Steps ``k = T..1`` are split into
  * FO: step 1, pathwise (needs ``∂R/∂x_0``): ``−⟨sg(∂R/∂x_0), x_0(θ)⟩``;
  * HO: the block ``S = {j, ..., j+h-1}``: re-run pathwise from ``sg(x_{j+h-1})`` with the stored noises,
    likelihood ratio at its lowest step j: ``−sg(A^(j)) ⟨m_j(θ), sg ε_j⟩/σ_j``;
  * ZO: the remaining steps ``C`` — inherent-noise likelihood ratio on all of C (``zo="lr"``), on K
    uniformly drawn steps weighted ``|C|/K`` (``"lr_sampled"``; with ``zo_sampling="variance"`` drawn
    ∝ the running per-step term norms and weighted ``1/π_k``, see :func:`systematic_sample`), a seeded
    two-point parameter perturbation shared by C (``"spsa"``, MeZO-style, no parameter copy), or nothing
    (``"none"``, the biased ablation V2).
Every step is covered exactly once, so for any ``h`` and any law of ``j`` the estimate is unbiased
(SPSA: for the parameter-smoothed objective, O(s_p²)). ``fo=False`` is the black-box-reward mode:
step 1 joins C (it then needs σ_1 > 0) and the block may start at j = 1.

Deterministic steps (σ = 0: a flow-matching window's ODE steps, a deterministic last step) are covered
pathwise when they lie in the FO step or the HO block. Elsewhere ``deterministic=`` decides (see
``estimators.base``): "error" refuses; "skip" leaves those in C *fixed* (g_k dropped, biased; listed in
``describe()["fixed_steps"]``); "absorb" extends the FO segment, the HO block and each ZO-LR step's
segment upward over the deterministic steps directly above them (unbiased; memory of those steps).
With "skip"/"absorb" the block start j is drawn among the stochastic candidates only; with zo="spsa"
the parameter perturbation covers deterministic steps of C itself, so nothing is absorbed.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from rlr_dist.chain.schedule import GaussianSchedule
from rlr_dist.chain.trajectory import Plan, inner
from rlr_dist.registry import check_param
from rlr_dist.estimators.value import ValueBaseline, ValueConfig
from rlr_dist.estimators.base import (DETERMINISTIC_MODES, ESTIMATORS, Backprop, Batch, Estimator, absorbed_backprop,
                                      explicit_cost, pathwise_term, require_stochastic, segment, segment_calls,
                                      segment_lr_term, segment_reference_calls, segment_shape, segment_top)

ZO_MODES = ("lr", "lr_sampled", "spsa", "none")
J_LAWS = ("uniform", "range", "softmax")
ZO_SAMPLING = ("uniform", "variance")
BASELINES = ("group", "value")


@dataclass
class ZOPlan(Plan):
    """A :class:`Plan` whose sampled ZO steps carry one importance weight each (``zo_sampling="variance"``):
    ``step_weights[i]`` = ``1/π`` of ``steps[i]``; ``step_weight`` is unused."""

    step_weights: tuple[float, ...] = ()


def inclusion_probabilities(p: Tensor, K: int) -> Tensor:
    """``π_k = min(1, c·p_k)`` with ``c`` such that ``Σ π_k = K`` (steps whose ``K·p_k`` would exceed 1 are
    taken with certainty and the rest share what is left, in proportion to p); all ones when ``K >= len(p)``.
    Needs ``p_k > 0``."""
    n = p.numel()
    if K >= n:
        return torch.ones_like(p)
    pi = torch.zeros_like(p)
    fixed = torch.zeros(n, dtype=torch.bool)
    while True:
        free = ~fixed
        pi[free] = (K - int(fixed.sum())) * p[free] / p[free].sum()
        over = free & (pi >= 1)
        if not over.any():
            return pi
        pi[over] = 1.0
        fixed |= over


def systematic_sample(pi: Tensor, generator: torch.Generator | None = None) -> list[int]:
    """Indices drawn without replacement with inclusion probabilities exactly ``pi`` (each ``<= 1``, summing to
    an integer K): systematic πps sampling (Madow 1949) over a random order — lay the ``π_k`` end to end on
    ``[0, K)`` and take the items under ``U, U+1, ..., U+K−1``, ``U ~ U[0, 1)``. An interval of length ``π_k <= 1``
    holds one of those points with probability ``π_k``, so ``Σ_{k∈S} g_k/π_k`` is unbiased for ``Σ_k g_k``
    (Horvitz–Thompson) and S has exactly K distinct items."""
    n = pi.numel()
    order = torch.randperm(n, generator=generator)
    cum = torch.cumsum(pi[order], 0)
    K = int(round(float(pi.sum())))
    u = torch.rand((), generator=generator, dtype=torch.float64)
    idx = torch.searchsorted(cum, u + torch.arange(K, dtype=torch.float64), right=True).clamp(max=n - 1)
    return sorted({int(order[i]) for i in idx})


@ESTIMATORS.register("rlr")
class RLR(Estimator):
    def __init__(self, h: int = 2, zo: str = "lr", K: int = 4, j_law: str = "uniform",
                 j_range: tuple[int, int] | None = None, temperature: float = 1.0, ema: float = 0.9,
                 spsa_scale: float = 1e-2, fo: bool = True, deterministic: str = "error",
                 zo_sampling: str = "uniform", zo_mix: float = 0.1, baseline: str = "group",
                 value: ValueConfig | None = None) -> None:
        check_param("h", h >= 1, f"must be >= 1, got {h}")
        check_param("zo", zo in ZO_MODES, f"must be one of {ZO_MODES}, got {zo!r}")
        check_param("j_law", j_law in J_LAWS, f"must be one of {J_LAWS}, got {j_law!r}")
        check_param("j_range", j_law != "range" or (j_range is not None and len(j_range) == 2 and j_range[0] <= j_range[1]),
                    f"must be (a, b) with a <= b for j_law='range', got {j_range!r}")
        check_param("K", zo != "lr_sampled" or K >= 1, f"must be >= 1 for zo='lr_sampled', got {K}")
        check_param("temperature", temperature > 0, f"must be > 0, got {temperature}")
        check_param("ema", 0 <= ema < 1, f"must be in [0, 1), got {ema}")
        check_param("spsa_scale", zo != "spsa" or spsa_scale > 0, f"must be > 0, got {spsa_scale}")
        check_param("deterministic", deterministic in DETERMINISTIC_MODES,
                    f"must be one of {DETERMINISTIC_MODES}, got {deterministic!r}")
        check_param("zo_sampling", zo_sampling in ZO_SAMPLING, f"must be one of {ZO_SAMPLING}, got {zo_sampling!r}")
        check_param("zo_sampling", zo_sampling == "uniform" or zo == "lr_sampled",
                    f"{zo_sampling!r} chooses which K ZO steps to sample: it needs zo='lr_sampled', got zo={zo!r}")
        check_param("zo_mix", 0 < zo_mix <= 1,
                    f"must be in (0, 1] (the uniform share of the ZO step law, which keeps every p_k > 0), "
                    f"got {zo_mix}")
        check_param("baseline", baseline in BASELINES, f"must be one of {BASELINES}, got {baseline!r}")
        check_param("value", value is None or baseline == "value",
                    f"configures the learned baseline: it needs baseline='value', got baseline={baseline!r}")
        check_param("baseline", baseline == "group" or zo in ("lr", "lr_sampled"),
                    f"{baseline!r} baselines the zero-order likelihood ratios: it needs zo='lr' or 'lr_sampled', "
                    f"got zo={zo!r}")
        self.baseline = baseline
        self.value = ValueBaseline(value or ValueConfig()) if baseline == "value" else None
        self.deterministic = deterministic
        self.fixed_steps: tuple[int, ...] | None = None  # steps left without gradient (set by check / plan)
        self._segments: tuple[int, list] | None = None    # (T, per-plan pathwise segments) with absorb (set by check)
        self.h, self.zo, self.K, self.j_law, self.j_range = h, zo, K, j_law, j_range
        self.temperature, self.ema, self.spsa_scale, self.fo = temperature, ema, spsa_scale, fo
        self.zo_sampling, self.zo_mix = zo_sampling, zo_mix
        self.needs_reward_grad = fo
        self.reads_term_norms = j_law == "softmax" or zo_sampling == "variance"
        # EMA of per-step gradient norms (softmax j-law; the ZO step law, there of the unweighted terms)
        self.step_norm: dict[int, float] = {}
        # per iteration planned and not yet observed: step -> Σ of its ZO weights over the iteration's plans
        self._zo_weights: deque[dict[int, float]] = deque(maxlen=8)

    def reward_grad_reason(self) -> str:
        return ("its first-order term back-propagates the reward through step 1 (estimator.fo: true; "
                "estimator.fo: false makes it a black-box estimator)")

    # ------------------------------------------------------------------ which steps go where
    def j_candidates(self, T: int) -> list[int]:
        lo = 2 if self.fo else 1
        hi = T - self.h + 1
        if self.j_law == "range":
            a, b = self.j_range
            lo, hi = max(lo, a), min(hi, b)
        return list(range(lo, hi + 1))

    def zo_set(self, T: int, j: int) -> list[int]:
        first = 2 if self.fo else 1
        return [k for k in range(first, T + 1) if not j <= k < j + self.h]

    def _starts(self, schedule: GaussianSchedule) -> list[int]:
        """Block starts j this schedule allows (stochastic ones only unless deterministic='error')."""
        cands = self.j_candidates(schedule.T)
        return cands if self.deterministic == "error" else [j for j in cands if schedule.stochastic(j)]

    @property
    def _absorb(self) -> bool:
        return self.deterministic == "absorb" and self.zo != "spsa"

    def _top(self, sigma: Tensor, k: int) -> int:
        return segment_top(sigma, k) if self._absorb else k

    def _lr_set(self, schedule: GaussianSchedule, C: list[int]) -> list[int]:
        """The ZO-LR steps of C: all of C, or its stochastic steps unless deterministic='error'."""
        return C if self.deterministic == "error" else [k for k in C if schedule.stochastic(k)]

    def _fixed(self, schedule: GaussianSchedule, j: int) -> tuple[int, ...]:
        """Steps no term covers for block start j (their g_k is dropped)."""
        sig, T = schedule.sigma, schedule.T
        C = self.zo_set(T, j)
        covered = set(range(j, max(j + self.h - 1, self._top(sig, j + self.h - 1)) + 1))
        if self.fo:
            covered |= set(range(1, self._top(sig, 1) + 1))
        if self.zo == "spsa":
            covered |= set(C)
        elif self.zo != "none":
            covered |= {i for k in self._lr_set(schedule, C) for i in range(k, self._top(sig, k) + 1)}
        return tuple(k for k in range(1, T + 1) if k not in covered)

    def check(self, schedule: GaussianSchedule) -> None:
        T = schedule.T
        if not self.j_candidates(T):
            raise ValueError(f"estimator: no valid block start j for T={T}, h={self.h}"
                             + (f", j_range={self.j_range}" if self.j_law == "range" else "")
                             + (" (the block must fit in steps 2..T, below it is the FO step)" if self.fo else ""))
        if self.deterministic == "error":
            lr_steps = set(self.j_candidates(T))
            if self.zo in ("lr", "lr_sampled"):
                lr_steps |= set(range(2 if self.fo else 1, T + 1))
            require_stochastic(schedule, sorted(lr_steps), f"rlr (h={self.h}, zo={self.zo})")
        elif not self._starts(schedule):
            raise ValueError(f"estimator: no stochastic block start j among {self.j_candidates(T)} "
                             f"(the HO likelihood ratio sits at step j, which needs σ_j > 0)")
        self.fixed_steps = tuple(sorted({k for j in self._starts(schedule) for k in self._fixed(schedule, j)}))
        if self.deterministic != "error":  # the chain's windows set the segments (absorb lengthens them)
            self._segments = (T, [self._plan_segments(schedule, j) for j in self._starts(schedule)])

    def _plan_segments(self, schedule: GaussianSchedule, j: int) -> list[tuple[int, int, int]]:
        """Shapes of the pathwise segments block start j back-propagates (ZO-LR: all of C, or the K longest)."""
        sig = schedule.sigma
        segs = [segment_shape(sig, max(j + self.h - 1, self._top(sig, j + self.h - 1)), j)]
        if self.fo:
            segs.append(segment_shape(sig, self._top(sig, 1), 1))
        if self.zo == "spsa":
            return segs
        if self.zo in ("lr", "lr_sampled"):
            lr = sorted((segment_shape(sig, self._top(sig, k), k) for k in self._lr_set(schedule, self.zo_set(schedule.T, j))),
                        reverse=True)
            segs += lr[: self.K] if self.zo == "lr_sampled" else lr
        return segs

    def plan(self, schedule: GaussianSchedule, generator: torch.Generator | None = None) -> Plan:
        T = schedule.T
        cands = self._starts(schedule)
        j = cands[int(torch.multinomial(self._j_probs(cands), 1, generator=generator))]
        C = self._lr_set(schedule, self.zo_set(T, j)) if self.zo in ("lr", "lr_sampled") else self.zo_set(T, j)
        steps, weight, seed, weights = (), 1.0, None, None
        if self.zo == "lr":
            steps = tuple(C)
        elif self.zo == "lr_sampled" and self.zo_sampling == "variance":
            steps, weights = self._zo_draw(C, generator) if C else ((), ())
        elif self.zo == "lr_sampled" and C:
            K = min(self.K, len(C))
            idx = torch.randperm(len(C), generator=generator)[:K]
            steps, weight = tuple(sorted(C[int(i)] for i in idx)), len(C) / K
        elif self.zo == "spsa":
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        block = set(range(j, j + self.h))
        sig = schedule.sigma
        states = {self._top(sig, j + self.h - 1), *(self._top(sig, k) for k in steps)}
        states |= {self._top(sig, 1)} if self.fo else set()
        noises = block | set(steps) | ({1} if self.fo and schedule.stochastic(1) else set())
        self.fixed_steps = self._fixed(schedule, j)
        if weights is not None:
            return ZOPlan(states=frozenset(states), noises=frozenset(noises), j=j, h=self.h, steps=steps,
                          step_weights=weights)
        return Plan(states=frozenset(states), noises=frozenset(noises), record_all=self.zo == "spsa",
                    j=j, h=self.h, steps=steps, step_weight=weight, seed=seed)

    def _zo_probs(self, C: list[int]) -> Tensor:
        """The variance-aware ZO step law on C: ``p_k = (1 − zo_mix)·n_k/Σ n + zo_mix/|C|`` with ``n_k`` the
        running norm of step k's unweighted ZO term (a step without one gets the mean of the measured ones;
        none measured: uniform). Every ``p_k >= zo_mix/|C| > 0``."""
        n = torch.tensor([self.step_norm.get(k, float("nan")) for k in C], dtype=torch.float64)
        known = ~torch.isnan(n)
        uniform = torch.full((len(C),), 1.0 / len(C), dtype=torch.float64)
        if not known.any():
            return uniform
        n = torch.where(known, n, n[known].mean()).clamp_min(0)
        if float(n.sum()) <= 0:
            return uniform
        return (1 - self.zo_mix) * n / n.sum() + self.zo_mix * uniform

    def _zo_draw(self, C: list[int], generator: torch.Generator | None) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """K distinct steps of C with inclusion probabilities ``π = inclusion_probabilities(p, K)`` (``K·p_k`` unless
        capped at 1), each weighted ``1/π_k`` (``1/(K p_k)``): unbiased for any p."""
        pi = inclusion_probabilities(self._zo_probs(C), min(self.K, len(C)))
        idx = systematic_sample(pi, generator)
        return tuple(C[i] for i in idx), tuple(1.0 / float(pi[i]) for i in idx)

    def zo_probabilities(self, schedule: GaussianSchedule) -> dict[int, float]:
        """The ZO step law over every step that can be a ZO-LR step (before the block is taken out; a plan
        renormalises it over its own C) — uniform for ``zo_sampling="uniform"``."""
        steps = self._lr_set(schedule, self.zo_set(schedule.T, schedule.T + 1))
        if not steps:
            return {}
        if self.zo_sampling != "variance":
            return {k: 1.0 / len(steps) for k in steps}
        return dict(zip(steps, self._zo_probs(steps).tolist()))

    def _j_probs(self, cands: list[int]) -> torch.Tensor:
        """Uniform, or the softmax of the running per-step gradient norms (normalised by their mean, over
        ``temperature``); a candidate without a measured norm gets the mean of the measured ones."""
        if self.j_law == "softmax" and self.step_norm:
            n = torch.tensor([self.step_norm.get(j, float("nan")) for j in cands], dtype=torch.float64)
            n = torch.where(torch.isnan(n), n[~torch.isnan(n)].mean() if (~torch.isnan(n)).any() else 1.0, n)
            return torch.softmax(n / n.mean().clamp_min(1e-12) / self.temperature, 0)
        return torch.full((len(cands),), 1.0 / len(cands), dtype=torch.float64)

    # ------------------------------------------------------------------ the surrogate loss
    def terms(self, b: Batch) -> Iterator[tuple[str, Tensor]]:
        p = b.traj.plan
        if self.zo == "spsa":  # first: it shifts θ in place, which must not happen under a live graph
            yield "zo:spsa", spsa_term(b, self.zo_set(b.traj.T, p.j), self.spsa_scale, p.seed)
        sig = b.traj.sigma
        h = max(p.h, self._top(sig, p.j + p.h - 1) - p.j + 1)
        if self.value is not None:  # V at the state each likelihood-ratio term starts from (never after its action)
            for k, top in ((p.j, p.j + h - 1), *((k, self._top(sig, k)) for k in p.steps)):
                v = self.value.baseline(self.baseline_state(b, k, top), top, b.returns(k), b.traj.T)
                if v is not None:
                    b.set_state_baseline(k, v)
        if self.fo:
            yield "fo", pathwise_term(b, self._top(sig, 1))
        yield "ho", self.ho_term(b, p.j, h)
        weights = getattr(p, "step_weights", None) or (p.step_weight,) * len(p.steps)
        for k, w in zip(p.steps, weights):
            yield f"zo:{k}", segment_lr_term(b, k, self._top(sig, k), w)

    def baseline_state(self, b: Batch, k: int, top: int) -> Tensor:
        """The state the value baseline of step k's likelihood ratio reads: ``x_top``, recorded *before* the
        action ε_k (a state after it would correlate the baseline with the action: biased)."""
        return b.traj.state(top)

    def take_records(self):
        return None if self.value is None else self.value.take()

    def learn_from(self, records: list) -> dict[str, float]:
        return {} if self.value is None else self.value.fit(records)

    def ho_term(self, b: Batch, j: int, h: int) -> Tensor:
        """``−mean_b[ sg(A^(j)) ⟨m_j(θ), sg ε_j⟩/σ_j − β Σ_{k∈S} c_k(x̃_k(θ); θ) ]``."""
        _, m_j, cost = segment(b, j + h - 1, j)
        loss = -(b.advantage(j) * inner(m_j, b.traj.noise(j)).double() / b.sigma(j)).mean()
        if b.regulariser.active:
            loss = loss + b.regulariser.beta * cost.mean()
        return b.scale * loss

    def observe(self, stats: dict[str, float]) -> None:
        """Fold ``gnorm/zo:k`` into the running per-step norms. With ``zo_sampling="variance"`` the norm is of
        the *unweighted* term: the summed norm over the iteration's plans divided by the sum of the weights
        those plans gave step k (recorded by :meth:`plan_metrics`; without a record, as measured)."""
        weights = self._zo_weights.popleft() if self.zo_sampling == "variance" and self._zo_weights else {}
        for key, v in stats.items():
            if key.startswith("gnorm/zo:") and key[9:].isdigit():
                k = int(key[9:])
                if weights.get(k, 0) > 0:
                    v = v / weights[k]
                old = self.step_norm.get(k)
                self.step_norm[k] = v if old is None else self.ema * old + (1 - self.ema) * v

    def state_dict(self) -> dict:
        out = {"step_norm": {str(k): v for k, v in self.step_norm.items()}}
        return out if self.value is None else {**out, "value": self.value.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step_norm = {int(k): float(v) for k, v in state.get("step_norm", {}).items()}
        if self.value is not None:
            self.value.load_state_dict(state.get("value", {}))

    def j_probabilities(self, schedule: GaussianSchedule) -> dict[int, float]:
        """The law of the block start j this estimator draws from now (uniform until norms are measured)."""
        cands = self._starts(schedule)
        return dict(zip(cands, self._j_probs(cands).tolist()))

    def plan_metrics(self, plans: list[Plan], schedule: GaussianSchedule) -> dict[str, float]:
        """``plan/j``: the block starts drawn (mean over the iteration's plans); ``plan/p_j``: their mean
        probability under the law they were drawn from; ``plan/j_tv``: that law's total-variation distance
        from uniform (0 for the uniform law); ``step_law/j_NN``: the law itself (softmax law only).
        ``zo_sampling="variance"``: ``step_law/zo_NN`` (the ZO step law p_k, :meth:`zo_probabilities`),
        ``plan/zo_tv`` (its distance from uniform) and ``plan/zo_weight_max`` (the largest weight ``1/π_k``
        used); it also records the weights each step got, for :meth:`observe`."""
        law = self.j_probabilities(schedule)
        n, T = len(law), schedule.T
        out = {"plan/j": sum(p.j for p in plans) / len(plans), "plan/p_j": sum(law[p.j] for p in plans) / len(plans),
               "plan/j_tv": 0.5 * sum(abs(q - 1 / n) for q in law.values())}
        width = max(2, len(str(T)))
        if self.j_law == "softmax":
            out.update({f"step_law/j_{j:0{width}d}": q for j, q in law.items()})
        if self.zo_sampling == "variance":
            zo = self.zo_probabilities(schedule)
            out.update({f"step_law/zo_{k:0{width}d}": q for k, q in zo.items()})
            out["plan/zo_tv"] = 0.5 * sum(abs(q - 1 / len(zo)) for q in zo.values()) if zo else 0.0
            ws = [w for p in plans for w in getattr(p, "step_weights", ())]
            out["plan/zo_weight_max"] = max(ws) if ws else 0.0
            summed: dict[int, float] = {}
            for p in plans:
                for k, w in zip(p.steps, getattr(p, "step_weights", ())):
                    summed[k] = summed.get(k, 0.0) + w
            self._zo_weights.append(summed)
        return out

    def backprop(self, T: int, regulariser) -> Backprop:
        if self._segments is not None and self._segments[0] == T:  # measured on the chain by check()
            return absorbed_backprop(self._segments[1], regulariser, 2 * T if self.zo == "spsa" else 0)
        seg = segment_calls(self.h, regulariser)
        C = T - self.h - int(self.fo)
        zo = {"lr": C, "lr_sampled": min(self.K, C)}.get(self.zo, 0)
        return Backprop(segment=seg, steps=self.h, calls=int(self.fo) + seg + max(zo, 0),
                        forward_calls=2 * T if self.zo == "spsa" else 0,
                        reference=segment_reference_calls(self.h, regulariser))

    def memory_overrides(self) -> list[list[str]]:
        return [[f"--estimator.h={max(1, self.h // 2)}"]] if self.h > 1 else []

    def describe(self) -> dict:
        return {"name": "rlr", "h": self.h, "zo": self.zo, "K": self.K, "j_law": self.j_law,
                "j_range": self.j_range, "fo": self.fo, "spsa_scale": self.spsa_scale,
                "deterministic": self.deterministic, "zo_sampling": self.zo_sampling, "zo_mix": self.zo_mix,
                "baseline": self.baseline,
                "fixed_steps": None if self.fixed_steps is None else list(self.fixed_steps)}


# ---------------------------------------------------------------------------------------------------
# SPSA (zeroth order in parameter space)


def _direction(p: Tensor, seed: int, index: int) -> Tensor:
    g = torch.Generator(device=p.device).manual_seed((seed * 1_000_003 + index) % (2**63 - 1))
    return torch.randn(p.shape, generator=g, dtype=p.dtype, device=p.device)


@torch.no_grad()
def _shift(params: list[Tensor], seed: int, amount: float) -> None:
    """θ += amount · u, with u regenerated from the seed one tensor at a time (no copy of θ)."""
    if amount != 0.0:
        for i, p in enumerate(params):
            p.add_(_direction(p, seed, i), alpha=amount)


@torch.no_grad()
def _perturbed_return(b: Batch, C: set[int], amount: float, seed: int) -> Tensor:
    """Re-run the whole chain from the recorded x_T with the recorded noises (common random numbers),
    with θ + amount·u on the steps of C and θ elsewhere; return the regularised return per sample."""
    if b.reward_fn is None:
        raise ValueError("zo='spsa' queries the reward again: pass reward_fn to the Batch")
    chain, tr, reg = b.chain, b.traj, b.regulariser
    params = chain.trainable_parameters()
    x = tr.state(tr.T)
    cost = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    on = 0.0
    try:
        for k in range(tr.T, 0, -1):
            want = amount if k in C else 0.0
            _shift(params, seed, want - on)
            on = want
            mu = chain.mean(x, k, tr.cond)
            s = b.sigma(k)
            if reg.active and s > 0:
                cost += explicit_cost(b, x, k, mu).double()
            x = mu + s * tr.noise(k) if s > 0 else mu
    finally:
        _shift(params, seed, -on)
    R, _, _ = reg.transform_reward(b.reward_fn(x, tr.cond).detach(), None)
    return R.double() - reg.beta * cost


def spsa_term(b: Batch, C: list[int], scale: float, seed: int) -> Tensor:
    """``−c ⟨sg u, θ⟩`` with ``c = mean_b (F(θ_C+s u) − F(θ_C−s u)) / 2s``: autograd gives ``−c·u``."""
    if b.regulariser.active and not b.regulariser.shaping:
        raise ValueError("zo='spsa' supports regularisers in exact (shaping) mode only")
    if getattr(b.regulariser, "lam", None) == "auto":
        raise ValueError("zo='spsa' needs a fixed surrogate λ (regulariser.lam) so both passes see the same reward")
    Cs = set(C)
    c = ((_perturbed_return(b, Cs, scale, seed) - _perturbed_return(b, Cs, -scale, seed)) / (2 * scale)).mean()
    params = b.chain.trainable_parameters()
    surrogate = sum((_direction(p, seed, i) * p).sum() for i, p in enumerate(params))
    return -b.scale * float(c) * surrogate
