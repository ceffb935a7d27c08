"""Statistical tests of the estimators (spec §11): the Monte-Carlo mean of each estimator, run through
the production sampling and surrogate-loss code, against the true gradient with a Bonferroni z-bound —
and negative controls that the same test must reject.

Exact truth comes from the linear-Gaussian chain (closed-form E[R] and KL); for the non-linear MLP chain
the reference is full backprop with more samples. Seeds are fixed, so the outcome is reproducible.
"""
from dataclasses import replace

import pytest
import torch

from rlr_dist.estimators import ESTIMATORS
from rlr_dist.estimators.rlr import RLR
from rlr_dist.regularisers import REGULARISERS
from rlr_dist.chain.tiny import LinearChain, MLPChain, bump_reward, quadratic_reward
from rlr_dist.estimators.montecarlo import bonferroni_threshold, call_means, estimate, z_scores

TARGET = torch.tensor([0.5, -0.3], dtype=torch.float64)
T = 6
M = 64          # trajectories per batch
CALLS = 100     # independent optimiser steps (plan draws)
G = 20          # batches per call -> 2000 batches, 128k trajectories per estimator


def exact_grad(beta=0.0, per_step=False, ref_noise=0.1):
    ch = LinearChain(T=T, G=1, ref_noise=ref_noise)
    wrt = ch.with_step_copies() if per_step else ch.theta
    (g,) = torch.autograd.grad(ch.exact_objective(TARGET, beta).sum(), wrt)
    return g[:, 0] if per_step else g[0]


def max_z(name_or_est, truth, reg=None, chain=None, reward=None, per_step=False, seed=1, calls=CALLS, **kw):
    est = name_or_est if not isinstance(name_or_est, str) else ESTIMATORS.build(name_or_est, **kw)
    ch = chain or LinearChain(T=T, G=G)
    out = estimate(ch, est, reward or quadratic_reward(TARGET), calls, m=M, regulariser=reg, seed=seed,
                   per_step=per_step)
    cm = call_means(out).flatten(1)
    z = z_scores(cm, truth.flatten())
    return float(z.abs().max()), bonferroni_threshold(int((cm.std(0) > 0).sum()))


class OffByOneRLR(RLR):
    """A deliberately mis-indexed HO block: the ZO set skips {j+1..j+h} instead of {j..j+h-1}, so
    step j is counted twice and step j+h never."""

    def zo_set(self, T, j):
        return [k for k in range(2, T + 1) if not j + 1 <= k <= j + self.h]


class LiteralEq6RLR(RLR):
    """Paper eq. (6) read literally (spec §12 item 1): the block re-runs h+1 transitions {j..j+h} while
    the ZO set still skips only {j..j+h-1}, so step j+h is counted twice."""

    def j_candidates(self, T):
        return [j for j in super().j_candidates(T) if j + self.h <= T]

    def plan(self, schedule, generator=None):
        p = super().plan(schedule, generator)
        return replace(p, states=p.states | {p.j + p.h}, noises=p.noises | {p.j + p.h})

    def ho_term(self, b, j, h):
        return super().ho_term(b, j, h + 1)


UNBIASED = [
    ("full_bp", {}),
    ("rlr", dict(h=1)),
    ("rlr", dict(h=2)),
    ("rlr", dict(h=4)),
    ("rlr", dict(h=2, zo="lr_sampled", K=2)),
    ("rlr", dict(h=2, j_law="range", j_range=(3, 4))),
    ("rlr", dict(h=2, fo=False)),          # black-box reward mode
    ("lr", {}),
    ("lr", dict(K=3)),
]


@pytest.mark.parametrize("name,kw", UNBIASED, ids=[f"{n}-{kw}" for n, kw in UNBIASED])
def test_unbiased_against_exact_gradient(name, kw):
    z, thr = max_z(name, exact_grad(), **kw)
    assert z < thr, f"{name} {kw}: max|z| = {z:.2f} >= {thr:.2f}"


NEGATIVE = [
    ("fo_only", lambda: ESTIMATORS.build("truncated_bp", K=1)),          # ablation V1
    ("rlr_without_zo", lambda: ESTIMATORS.build("rlr", h=2, zo="none")),  # ablation V2
    ("off_by_one_block", lambda: LiteralEq6RLR(h=2)),
]


@pytest.mark.parametrize("label,factory", NEGATIVE, ids=[n for n, _ in NEGATIVE])
def test_negative_controls_are_rejected(label, factory):
    z, thr = max_z(factory(), exact_grad())
    assert z > thr, f"{label} should be rejected but max|z| = {z:.2f} < {thr:.2f}"


def test_components_match_per_step_gradients():
    """FO ↔ g_1, each HO-block step ↔ its g_k, each ZO-LR step ↔ its g_k (fixed block {3, 4})."""
    truth = exact_grad(per_step=True)
    est = RLR(h=2, j_law="range", j_range=(3, 3))
    z, thr = max_z(est, truth, per_step=True)
    assert z < thr, f"per-step max|z| = {z:.2f}"
    z_bad, _ = max_z(OffByOneRLR(h=2, j_law="range", j_range=(3, 3)), truth, per_step=True)
    assert z_bad > thr


def test_kl_exact_is_unbiased_and_dpok_is_not():
    """Exact gradient of E[R] − β Σ_k E[KL_k] on the linear chain (reference offset 0.3, β = 0.5)."""
    beta = 0.5
    truth = exact_grad(beta, ref_noise=0.3)
    for name, kw in [("rlr", dict(h=2)), ("rlr", dict(h=3, zo="lr_sampled", K=1)), ("lr", {}), ("full_bp", {})]:
        z, thr = max_z(name, truth, reg=REGULARISERS.build("kl_exact", beta=beta),
                       chain=LinearChain(T=T, G=G, ref_noise=0.3), **kw)
        assert z < thr, f"{name} {kw} + kl_exact: max|z| = {z:.2f}"
    z, thr = max_z("rlr", truth, reg=REGULARISERS.build("kl_dpok", beta=beta),
                   chain=LinearChain(T=T, G=G, ref_noise=0.3), h=2)
    assert z > thr, f"kl_dpok must be biased for the regularised objective, max|z| = {z:.2f}"


def test_softmax_j_law_is_unbiased_and_follows_the_norms():
    est = RLR(h=2, j_law="softmax", temperature=0.5)
    est.observe({"gnorm/zo:2": 1.0, "gnorm/zo:3": 4.0, "gnorm/zo:4": 0.5, "gnorm/zo:5": 2.0})
    gen = torch.Generator().manual_seed(0)
    sched = LinearChain(T=T).schedule
    js = torch.tensor([est.plan(sched, gen).j for _ in range(4000)])
    freq = torch.stack([(js == j).double().mean() for j in (2, 3, 4, 5)])
    assert freq.argmax() == 1 and freq[1] > 0.5 and freq[2] < 0.1
    z, thr = max_z(est, exact_grad())
    assert z < thr


# ------------------------------------------------------------------- non-linear chain (MC reference)

@pytest.fixture(scope="module")
def mlp_reference():
    def ref(deterministic_last=False, reg=None):
        ch = MLPChain(T=T, G=100, deterministic_last=deterministic_last)
        out = estimate(ch, ESTIMATORS.build("full_bp"), bump_reward, 60, m=M, regulariser=reg, seed=99)
        cm = call_means(out)
        return cm.mean(0), cm.std(0) / cm.shape[0] ** 0.5

    return ref


def mlp_max_z(est, ref, deterministic_last=False, reg=None, calls=CALLS, g=G):
    ch = MLPChain(T=T, G=g, deterministic_last=deterministic_last)
    cm = call_means(estimate(ch, est, bump_reward, calls, m=M, regulariser=reg, seed=7))
    mean, se = ref
    z = z_scores(cm, mean, se)
    return float(z.abs().max()), bonferroni_threshold(int((cm.std(0) > 0).sum()))


@pytest.mark.parametrize("det", [False, True], ids=["stochastic-last", "deterministic-last"])
def test_rlr_unbiased_on_mlp_chain(mlp_reference, det):
    ref = mlp_reference(det)
    for est in (RLR(h=2), RLR(h=3, zo="lr_sampled", K=1)):
        z, thr = mlp_max_z(est, ref, det)
        assert z < thr, f"{est.describe()} det={det}: max|z| = {z:.2f}"
    z, thr = mlp_max_z(ESTIMATORS.build("truncated_bp", K=1), ref, det)
    assert z > thr


def test_spsa_is_unbiased_for_small_perturbations(mlp_reference):
    z, thr = mlp_max_z(RLR(h=2, zo="spsa", spsa_scale=1e-3), mlp_reference(), calls=400, g=5)
    assert z < thr, f"SPSA max|z| = {z:.2f}"


F_REGULARISERS = [
    ("stepwise-amari0.5", dict(name="stepwise", beta=0.3, divergence="amari", alpha=0.5)),
    ("stepwise-chi2", dict(name="stepwise", beta=0.1, divergence="chi2")),
    ("fdiv-forward_kl", dict(name="fdiv", beta=0.5, f="forward_kl", lam=2.0)),
    ("fdiv-chi2", dict(name="fdiv", beta=0.5, f="chi2", lam=0.0)),
]


@pytest.mark.parametrize("label,cfg", F_REGULARISERS, ids=[n for n, _ in F_REGULARISERS])
def test_f_regularisers_unbiased_against_full_backprop(mlp_reference, label, cfg):
    """RLR with a step-wise or surrogate-reward f-divergence matches full backprop of the same objective
    (λ fixed, so the surrogate reward is a fixed transform)."""
    cfg = dict(cfg)
    reg = REGULARISERS.build(cfg.pop("name"), **cfg)
    z, thr = mlp_max_z(RLR(h=2), mlp_reference(reg=reg), reg=reg)
    assert z < thr, f"{label}: max|z| = {z:.2f}"


def test_f_regulariser_negative_controls(mlp_reference):
    """Explicit-only (DPOK-style) step-wise Amari, and plain KL in place of the forward-KL surrogate,
    must both be rejected against the regularised objective's full-backprop gradient."""
    amari = dict(beta=0.3, divergence="amari", alpha=0.5)
    ref = mlp_reference(reg=REGULARISERS.build("stepwise", **amari))
    z, thr = mlp_max_z(RLR(h=2), ref, reg=REGULARISERS.build("stepwise", shaping=False, **amari))
    assert z > thr, f"explicit-only amari max|z| = {z:.2f}"
    ref = mlp_reference(reg=REGULARISERS.build("fdiv", beta=0.5, f="forward_kl", lam=2.0))
    z, thr = mlp_max_z(RLR(h=2), ref, reg=REGULARISERS.build("kl_exact", beta=0.5))
    assert z > thr, f"kl_exact in place of forward-KL surrogate max|z| = {z:.2f}"
