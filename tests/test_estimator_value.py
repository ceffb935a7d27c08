"""The learned state baseline of RLR's likelihood-ratio terms (``estimator.baseline: value``).

``A = loo(G^(k) − V(x_k, k))``: V reads the state *before* step k's action, so the estimate stays unbiased
whatever V is. Checked as in ``test_estimators_unbiased.py`` (spec §11.3: Monte-Carlo mean through the production
sampling and estimator code against the exact gradient, Bonferroni z-bound), with V trained on the chain and then
frozen (the harness never calls ``learn_from``), with a deliberately bad V, and with a V that reads the state
*after* the action (the negative control: rejected). The variance it removes is measured on the same chain.
"""
import json

import pytest
import torch

from rlr_dist.chain.tiny import LinearChain, MLPChain, bump_reward, quadratic_reward
from rlr_dist.chain.trajectory import sample
from rlr_dist.config import ConfigError
from rlr_dist.estimators import ESTIMATORS, Advantages, Batch, backward_terms
from rlr_dist.estimators.montecarlo import (batch_variance, bonferroni_threshold, call_means, estimate,
                                            z_scores)
from rlr_dist.estimators.rlr import RLR
from rlr_dist.estimators.value import ValueBaseline, ValueConfig, value_features

TARGET = torch.tensor([0.5, -0.3], dtype=torch.float64)
T = 6
M = 64
REWARD = quadratic_reward(TARGET)


class PeekingRLR(RLR):
    """Negative control: V reads ``x_{k−1} = μ_θ(x_k) + σ_k ε_k``, the state *after* step k's action — the baseline
    then moves with ε_k and the estimate is biased."""

    def baseline_state(self, b, k, top):
        with torch.no_grad():
            mu = b.chain.mean(b.traj.state(k), k, b.traj.cond)
        return mu + b.sigma(k) * b.traj.noise(k)


def fit_value(est, chain, reward=REWARD, iterations=30, seed=5):
    """The training loop's bookkeeping for the value: plan, sample, back-propagate, ``learn_from``."""
    gen = torch.Generator().manual_seed(seed)
    metrics = {}
    for _ in range(iterations):
        plan = est.plan(chain.schedule, gen)
        traj = sample(chain, torch.randn(M, chain.D, generator=gen, dtype=torch.float64), plan, generator=gen,
                      prompt_ids=torch.zeros(M, dtype=torch.long))
        R, dR = reward(traj.x0)
        backward_terms(est.terms(Batch(traj, chain, R, dR if est.needs_reward_grad else None,
                                       advantages=Advantages("loo"))))
        for p in chain.trainable_parameters():
            p.grad = None
        metrics = est.learn_from([est.take_records()])
    return metrics


def exact_grad(per_step=False):
    chain = LinearChain(T=T, G=1)
    wrt = chain.with_step_copies() if per_step else chain.theta
    (g,) = torch.autograd.grad(chain.exact_objective(TARGET).sum(), wrt)
    return g[:, 0] if per_step else g[0]


def max_z(est, truth, chain, calls, seed=1, per_step=False, reward=REWARD):
    out = estimate(chain, est, reward, calls, m=M, seed=seed, per_step=per_step)
    cm = call_means(out).flatten(1)
    return float(z_scores(cm, truth.flatten()).abs().max()), bonferroni_threshold(int((cm.std(0) > 0).sum())), out


@pytest.fixture(scope="module")
def trained():
    """A value-baselined RLR (h = 1) and its peeking twin, each fitted on its own 30 iterations of the chain."""
    est, peek = RLR(h=1, baseline="value"), PeekingRLR(h=1, baseline="value")
    m = fit_value(est, LinearChain(T=T, G=1))
    fit_value(peek, LinearChain(T=T, G=1))
    return est, peek, m


def test_value_learns_the_late_steps(trained):
    est, _, m = trained
    skill = {k: est.value.skill(k) for k in range(2, T + 1)}
    print(f"\n[value] out-of-sample skill per step {({k: round(s, 3) for k, s in skill.items()})}, metrics {m}")
    assert skill[2] > 0.8 and skill[2] > skill[T]  # the state near the end decides the reward
    assert m["value/steps_used"] >= 3 and m["value/loss"] < 1.0


def test_value_baseline_unbiased_and_quieter_on_linear_chain(trained):
    est = trained[0]
    z, thr, out = max_z(est, exact_grad(), LinearChain(T=T, G=6), 200, seed=3)
    _, _, plain = max_z(RLR(h=1), exact_grad(), LinearChain(T=T, G=6), 200, seed=3)
    ratio = batch_variance(out) / batch_variance(plain)
    print(f"\n[value] linear chain T={T}, h=1: max|z| = {z:.2f} < {thr:.2f}; tr Cov value / group = {ratio:.2f}")
    assert z < thr
    assert ratio < 0.6, f"tr Cov ratio {ratio:.2f}"  # measured 0.33


def test_value_baseline_per_step_components(trained):
    """Fixed block start: each step's component ↔ its own exact g_k; the peeking baseline is rejected there."""
    est, peek, _ = trained
    truth = exact_grad(per_step=True)
    for e in (est, peek):
        e.j_law, e.j_range = "range", (3, 3)
    try:
        z, thr, _ = max_z(est, truth, LinearChain(T=T, G=6), 200, per_step=True)
        z_bad, _, _ = max_z(peek, truth, LinearChain(T=T, G=6), 200, per_step=True)
    finally:
        for e in (est, peek):
            e.j_law, e.j_range = "uniform", None
    print(f"\n[value] per-step: state before the action max|z| = {z:.2f}, after it {z_bad:.2f} (bound {thr:.2f})")
    assert z < thr < z_bad


def test_peeking_baseline_is_rejected(trained):
    z_bad, thr, _ = max_z(trained[1], exact_grad(), LinearChain(T=T, G=6), 200)
    print(f"\n[value] V at the state after the action: max|z| = {z_bad:.2f} (bound {thr:.2f})")
    assert z_bad > thr


def test_any_value_keeps_it_unbiased():
    """A V with nothing learned (random weights, scaled far off the returns) still gives an unbiased estimate."""
    est = RLR(h=2, baseline="value", value=ValueConfig(steps=1, min_skill=-1e9))
    fit_value(est, LinearChain(T=T, G=1), iterations=2)
    est.value.y_mean, est.value.y_std = 7.0, 25.0
    est.value.ss_tot, est.value.ss_res = {k: 1.0 for k in range(1, T + 1)}, {k: 5.0 for k in range(1, T + 1)}
    assert all(est.value.usable(k) for k in range(2, T + 1))
    z, thr, _ = max_z(est, exact_grad(), LinearChain(T=T, G=6), 200, seed=4)
    print(f"\n[value] a bad V (skill {est.value.skill(2):.2f} at step 2): max|z| = {z:.2f} < {thr:.2f}")
    assert z < thr


def test_value_baseline_black_box_and_mlp_chain():
    """fo = False (step 1 is a likelihood-ratio step too) on the linear chain; the non-linear chain against full
    backprop (the reference's own s.e. enters the z-score)."""
    bb = RLR(h=1, fo=False, baseline="value")
    fit_value(bb, LinearChain(T=T, G=1))
    z, thr, _ = max_z(bb, exact_grad(), LinearChain(T=T, G=6), 200, seed=6)
    print(f"\n[value] black-box linear chain: max|z| = {z:.2f} < {thr:.2f}")
    assert z < thr
    ref = call_means(estimate(MLPChain(T=T, G=40), ESTIMATORS.build("full_bp"), bump_reward, 60, m=M, seed=99))
    est = RLR(h=2, baseline="value")
    fit_value(est, MLPChain(T=T, G=1), reward=bump_reward)
    cm = call_means(estimate(MLPChain(T=T, G=6), est, bump_reward, 200, m=M, seed=7))
    z = float(z_scores(cm, ref.mean(0), ref.std(0) / ref.shape[0] ** 0.5).abs().max())
    thr = bonferroni_threshold(int((cm.std(0) > 0).sum()))
    print(f"[value] mlp chain: max|z| = {z:.2f} < {thr:.2f}")
    assert z < thr


# ------------------------------------------------------------------ bookkeeping

def test_learners_fed_the_same_records_stay_identical_and_checkpoint_round_trips():
    """Two learners each record half the samples; both fit on the gathered records (rank order) and end equal
    to one process that saw them all; the state survives JSON (checkpoints) exactly."""
    chain = LinearChain(T=T, G=1)
    gen = torch.Generator().manual_seed(0)
    ests = [RLR(h=1, baseline="value") for _ in range(3)]
    for _ in range(3):
        plan = ests[0].plan(chain.schedule, gen)
        traj = sample(chain, torch.randn(2 * M, chain.D, generator=gen, dtype=torch.float64), plan, generator=gen,
                      prompt_ids=torch.zeros(2 * M, dtype=torch.long))
        R, dR = REWARD(traj.x0)
        first = torch.arange(2 * M) < M
        for e, keep in ((ests[0], first), (ests[1], ~first)):
            list(e.terms(Batch(traj.select(keep), chain, R[keep], dR[keep], advantages=Advantages("loo"))))
        list(ests[2].terms(Batch(traj, chain, R, dR, advantages=Advantages("loo"))))
        gathered = [ests[0].take_records(), ests[1].take_records()]
        for e in ests[:2]:
            e.learn_from(gathered)
        ests[2].learn_from([ests[2].take_records()])
    feats, ks = torch.randn(5, 2), torch.tensor([2, 3, 4, 5, 6])
    preds = [e.value.predict(feats, ks) for e in ests]
    assert torch.equal(preds[0], preds[1]) and torch.equal(preds[0], preds[2])
    restored = RLR(h=1, baseline="value")
    restored.load_state_dict(json.loads(json.dumps(ests[0].state_dict())))
    assert torch.equal(restored.value.predict(feats, ks), preds[0])
    assert restored.value.skill(2) == ests[0].value.skill(2) and restored.value.fits == 3


def test_features_pool_every_latent_kind():
    assert value_features(torch.randn(3, 2, dtype=torch.float64), 8).shape == (3, 2)
    assert value_features(torch.randn(3, 4, 16, 16), 8).shape == (3, 4 * 64)
    assert value_features(torch.randn(3, 4, 6, 16, 16), 8).shape == (3, 4 * 6 * 64)
    assert value_features(torch.randn(3, 100, 16), 8).shape == (3, 16 * 64)
    assert ValueBaseline(ValueConfig()).take() is None


@pytest.mark.parametrize("section,field", [
    ({"name": "rlr", "baseline": "learned"}, "estimator.baseline"),
    ({"name": "rlr", "baseline": "value", "zo": "spsa"}, "estimator.baseline"),
    ({"name": "rlr", "value": {"hidden": 8}}, "estimator.value"),
    ({"name": "rlr", "baseline": "value", "value": {"hidden": 0}}, "value.hidden"),
])
def test_bad_value_config_names_the_field(section, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ESTIMATORS.build(section.pop("name"), section, "estimator")


def test_reward_scale_of_a_batch_without_spread_is_one():
    """A 0/1 reward with no hit in the batch: its std is 0. The group baseline's advantages are all 0 then, a state
    baseline's are ``−(V − mean V)``: a scale of ``1/min_std`` made them a million times too large (measured: a
    gradient norm of 4e7 against ~300 on the digits world's black-box reward)."""
    adv = Advantages("loo", "batch_std")
    assert adv.scale_factor(torch.zeros(16)) == 1.0
    assert adv.scale_factor(torch.tensor([0.0, 1.0, 0.0, 1.0])) == pytest.approx(1 / torch.tensor([0.0, 1, 0, 1]).std().item())
    chain = LinearChain(T=T, G=1)
    est = RLR(h=1, baseline="value", value=ValueConfig(min_skill=-1e9))
    fit_value(est, chain, iterations=3)
    est.value.ss_tot, est.value.ss_res = {k: 1.0 for k in range(1, T + 1)}, {k: 0.5 for k in range(1, T + 1)}
    gen = torch.Generator().manual_seed(2)
    traj = sample(chain, torch.randn(M, chain.D, generator=gen, dtype=torch.float64), est.plan(chain.schedule, gen),
                  generator=gen, prompt_ids=torch.zeros(M, dtype=torch.long))
    b = Batch(traj, chain, torch.zeros(M, dtype=torch.float64), torch.zeros(M, chain.D, dtype=torch.float64),
              advantages=adv)
    b.scale = adv.scale_factor(b.reward)
    stats = backward_terms(est.terms(b), chain.trainable_parameters(), track_norms=True)
    top = max(v for k, v in stats.items() if k.startswith("gnorm/"))
    print(f"\n[value] all-equal rewards: largest term norm {top:.3g}")
    assert 0 < top < 100  # 1e6 times larger before the fix
