"""``rlr_release`` — the authors' released training loop as a (biased) estimator (spec §4, issue 18 §1).

(a) statistics: its expected update is rejected against the exact gradient on the linear-Gaussian chain — in
    size and, with the best scalar fitted, in direction — while the faithful ``rlr`` passes both checks at the
    same sample size; (b) mechanics: 1 + chain_len optimiser steps per learner call, the 0.05 first-order
    scale, the 1e-4 PPO clip, whole-batch reward normalisation, config errors that name the field; (c) a short
    single-process training run.

"Its gradient" (what (a) tests): the sum of the per-phase gradients at the same weights, i.e. the gradient of
the sum of :meth:`terms` at θ (what the Monte-Carlo harness and the study's gradient draws take). One learner
call under plain SGD moves θ by ``−lr`` times this sum up to O(lr²) — the later phases see weights moved by
O(lr) — so it is the direction of the update for a small step; ``test_sgd_update_is_the_summed_gradient``
checks that link.
"""
import math

import pytest
import torch

from rlr_dist.chain.tiny import LinearChain, MLPChain, bump_reward, quadratic_reward
from rlr_dist.chain.trajectory import inner, sample
from rlr_dist.config import ConfigError
from rlr_dist.estimators import ESTIMATORS, Advantages, Batch, backward_terms
from rlr_dist.estimators.base import pathwise_term
from rlr_dist.estimators.montecarlo import bonferroni_threshold, call_means, estimate, z_scores
from rlr_dist.regularisers import REGULARISERS
from rlr_dist.train import step

TARGET = torch.tensor([0.5, -0.3], dtype=torch.float64)
T, M, CALLS, G = 6, 64, 100, 20   # as tests/test_estimators_unbiased.py: 2000 batches of 64 per estimator


# ------------------------------------------------------------------------------------------- (a) statistics
def test_release_is_rejected_against_the_exact_gradient_and_rlr_is_not():
    ch = LinearChain(T=T, G=1)
    (g,) = torch.autograd.grad(ch.exact_objective(TARGET).sum(), ch.theta)
    truth = g[0]
    zs = {}
    for name, kw in [("rlr_release", {}), ("rlr", dict(h=2))]:
        out = estimate(LinearChain(T=T, G=G), ESTIMATORS.build(name, **kw), quadratic_reward(TARGET), CALLS, m=M,
                       seed=1)
        # the harness puts all G·m samples in one Batch, so the release normalises its rewards over those
        cm = call_means(out)
        thr = bonferroni_threshold(int((cm.std(0) > 0).sum()))
        z_plain = float(z_scores(cm, truth).abs().max())
        # direction only: against the best multiple c·∇J (c fitted to the mean; fitting can only lower |z|)
        c = float(cm.mean(0) @ truth / (truth @ truth))
        z_dir = float(z_scores(cm, c * truth).abs().max())
        zs[name] = (z_plain, z_dir, c, thr)
    print("max|z| (plain, direction, fitted scale, threshold):", zs)
    z_plain, z_dir, c, thr = zs["rlr_release"]
    assert z_plain > thr and z_dir > thr, f"rlr_release must be rejected: {zs['rlr_release']}"
    assert 0 < c < 0.05  # FO-dominated and down-weighted (fo_scale 0.05 on one of T steps)
    z_plain, z_dir, c, thr = zs["rlr"]
    assert z_plain < thr and z_dir < thr, f"rlr must pass at the same sample size: {zs['rlr']}"


# -------------------------------------------------------------------------------------------- (b) mechanics
def make_batch(est, chain=None, seed=0, m=16, reward=None, batch_reward=None):
    chain = chain or MLPChain(T=8, G=1)
    gen = torch.Generator().manual_seed(seed)
    plan = est.plan(chain.schedule, gen)
    traj = sample(chain, torch.randn(m, 2, generator=gen, dtype=torch.float64), plan, generator=gen,
                  prompt_ids=torch.arange(m) // 4)
    R, dR = bump_reward(traj.x0)
    return chain, Batch(traj, chain, R if reward is None else reward, dR, REGULARISERS.build("none"),
                        Advantages("loo"), batch_reward=batch_reward)


def grad(terms, chain):
    loss = sum(t for _, t in terms)
    (g,) = torch.autograd.grad(loss, chain.theta, allow_unused=True)
    return torch.zeros_like(chain.theta) if g is None else g


class TinyModel:
    """What :func:`rlr_dist.train.step.learn` needs of a model, around a tiny chain."""

    device = torch.device("cpu")

    def __init__(self, chain):
        self._chain = chain

    def chain(self, window=None):
        return self._chain

    def trainable_parameters(self):
        return [self._chain.theta]


def chunks_for(est, chain, seeds=(0, 1), m=8):
    out = []
    for s in seeds:
        _, b = make_batch(est, chain, seed=s, m=m)
        out.append(step.Chunk(traj=b.traj, prompts=[""] * m, version=0, reward=b.reward, reward_grad=b.dR))
    return out


def learn(est, chain, chunks, optimizer_step=None):
    R = torch.cat([c.reward for c in chunks])
    return step.learn(TinyModel(chain), est, REGULARISERS.build("none"), Advantages("loo"), chunks, R,
                      optimizer_step=optimizer_step)


def test_one_learner_call_makes_one_plus_chain_len_optimiser_steps():
    chain = MLPChain(T=8, G=1)
    for chain_len in (1, 3):
        est = ESTIMATORS.build("rlr_release", chain_len=chain_len)
        opt = torch.optim.SGD([chain.theta], lr=1e-3)
        seen = []

        def between():
            seen.append(chain.theta.grad.detach().clone())
            opt.step()
            opt.zero_grad(set_to_none=True)

        stats = learn(est, chain, chunks_for(est, chain), between)
        opt.step()  # the caller's, as for every estimator
        assert len(seen) + 1 == 1 + chain_len == est.optimizer_steps
        assert "loss/fo" in stats and sum(k.startswith("loss/ppo:") for k in stats) >= 1
        assert seen[0].norm() > 0  # phase 0 (first order) was stepped alone
    # every other estimator: one phase, no step in between, and the same gradient as before the hook
    for name, kw in [("rlr", dict(h=2)), ("lr", {}), ("full_bp", {})]:
        est = ESTIMATORS.build(name, **kw)
        chunks = chunks_for(est, chain)
        chain.theta.grad = None
        learn(est, chain, chunks, optimizer_step=lambda: pytest.fail(f"{name} stepped between phases"))
        got = chain.theta.grad.clone()
        chain.theta.grad = None
        total = sum(len(c.reward) for c in chunks)
        for c in chunks:  # the pre-hook loop: each chunk's terms, weighted by its share
            b = Batch(traj=c.traj, chain=chain, reward=c.reward, reward_grad=c.reward_grad,
                      regulariser=REGULARISERS.build("none"), advantages=Advantages("loo"))
            backward_terms(((n, len(c.reward) / total * t) for n, t in est.terms(b)))
        torch.testing.assert_close(got, chain.theta.grad, rtol=0, atol=0)


def test_sgd_update_is_the_summed_gradient():
    """The definition of "its gradient" in (a): −Δθ/lr of one learner call under plain SGD → Σ phase gradients."""
    chain = MLPChain(T=8, G=1)
    est = ESTIMATORS.build("rlr_release", chain_len=2)
    chunks = chunks_for(est, chain)
    chain.theta.grad = None
    learn(est, chain, chunks)  # no optimiser: the phases accumulate at the same weights
    summed = chain.theta.grad.clone()
    lr = 1e-7
    opt = torch.optim.SGD([chain.theta], lr=lr)
    before = chain.theta.detach().clone()
    opt.zero_grad(set_to_none=True)
    learn(est, chain, chunks, lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
    opt.step()
    torch.testing.assert_close(-(chain.theta.detach() - before) / lr, summed, rtol=1e-4, atol=1e-8)


def test_first_order_term_is_last_step_backprop_scaled_by_fo_scale():
    est = ESTIMATORS.build("rlr_release")
    chain, b = make_batch(est)
    g_fo = grad(est.phase_terms(b, 0), chain)
    g_v1 = grad([("bp", pathwise_term(b, 1))], chain)  # unit-weight one-step backprop (truncated_bp K=1's term)
    torch.testing.assert_close(g_fo, 0.05 * g_v1, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad(ESTIMATORS.build("rlr_release", fo_scale=1.0).phase_terms(b, 0), chain), g_v1,
                               rtol=1e-12, atol=0)


def test_ppo_term_is_the_mean_log_prob_ratio_and_clips_at_the_clip_range():
    est = ESTIMATORS.build("rlr_release")
    assert est.clip_range == 1e-4 and est.ho_scale == 1e-3
    chain, b = make_batch(est)
    k = b.traj.plan.steps[0]
    # at the sampling weights r = 1: −ho_scale · mean_b A_b ∇(⟨μ_θ, ε⟩/σ)/D, A normalised over the batch
    x, eps, s = b.traj.state(k), b.traj.noise(k), b.sigma(k)
    A = (b.reward - b.reward.mean()) / (b.reward.std(unbiased=False) + 1e-8)
    ref = -1e-3 * (A * inner(chain.mean(x, k), eps) / s / 2).mean()  # D = 2
    torch.testing.assert_close(grad(est.phase_terms(b, 1), chain), grad([("ref", ref)], chain), rtol=1e-10, atol=0)

    with torch.no_grad():  # a later phase: the weights have moved away from the sampling weights
        chain.theta += 0.3 * torch.randn(chain.theta.shape, generator=torch.Generator().manual_seed(1),
                                         dtype=torch.float64)
    log_r = est.log_ratio(b, k, chain.mean(x, k)).detach()
    assert log_r.abs().min() > 10 * est.clip_range  # every ratio outside 1 ± 1e-4
    side = torch.sign(log_r)

    def ppo_grad(reward, clip):
        e = ESTIMATORS.build("rlr_release", clip_range=clip)
        bb = Batch(b.traj, chain, reward.double())
        return grad(e.phase_terms(bb, 1), chain)

    # A of the ratio's sign: every sample on the clipped side of min(rA, clip(r)A) -> no gradient at all
    assert ppo_grad(side, 1e-4).abs().max() == 0
    assert ppo_grad(-side, 1e-4).norm() > 0   # the other side is not clipped
    assert ppo_grad(side, 10.0).norm() > 0    # nor is anything with a wide clip range


def test_reward_normalisation_uses_the_whole_batch():
    chain = MLPChain(T=8, G=1)
    est = ESTIMATORS.build("rlr_release", chain_len=2)
    chunks = chunks_for(est, chain)
    everyone = torch.cat([c.reward for c in chunks])
    _, b = make_batch(est, chain, seed=0, m=8, batch_reward=everyone)
    want = (b.reward - everyone.mean()) / (everyone.std(unbiased=False) + 1e-8)
    torch.testing.assert_close(est.advantage(b), want.double(), rtol=1e-12, atol=0)
    own = est.advantage(make_batch(est, chain, seed=0, m=8)[1])
    assert (own - want).abs().max() > 1e-3  # normalising over the chunk alone is different
    # and the learner hands every chunk the whole batch
    chain.theta.grad = None
    learn(est, chain, chunks)
    got = chain.theta.grad.clone()
    total = len(everyone)
    manual = sum(len(c.reward) / total * grad(est.terms(
        Batch(c.traj, chain, c.reward, c.reward_grad, batch_reward=everyone)), chain) for c in chunks)
    torch.testing.assert_close(got, manual, rtol=1e-10, atol=1e-14)


def test_deterministic_step_gives_a_zero_term_and_plans_record_what_is_used():
    chain = MLPChain(T=6, G=1, deterministic_last=True)
    est = ESTIMATORS.build("rlr_release", chain_len=4)
    _, b = make_batch(est, chain)
    p = b.traj.plan
    assert set(p.states) == ({1} | set(p.steps) | {k - 1 for k in p.steps}) - {0}
    assert 1 not in p.noises and set(p.noises) == set(p.steps) - {1}
    # σ_1 = 0: the release's NaN log-prob -> a zero loss; still a graph, so the optimiser steps on a zero gradient
    zero = est.ppo_term(b, 1)
    assert float(zero.detach()) == 0 and grad([("ppo", zero)], chain).abs().max() == 0
    assert grad(est.phase_terms(b, 0), chain).norm() > 0  # the FO term runs through the deterministic step


def test_config_errors_name_the_field():
    from rlr_dist.train.config import load_config

    base = ['--estimator={"name": "rlr_release"}', '--regulariser={"name": "none"}']
    cfg = load_config("jobs/configs/digits.yaml", base)
    assert cfg.make_estimator().optimizer_steps == 2
    for field, value, needle in [("chain_len", 0, "must be >= 1"), ("clip_range", 0, "must be a finite number > 0"),
                                 ("fo_scale", -0.05, "must be a finite number > 0"),
                                 ("fo_scale", "nan", "must be a finite number > 0")]:
        with pytest.raises(ConfigError, match=f"^estimator.{field}: {needle}"):
            load_config("jobs/configs/digits.yaml", base + [f"--estimator.{field}={value}"])
    with pytest.raises(ConfigError, match="^regulariser.name: estimator 'rlr_release' takes no regulariser"):
        load_config("jobs/configs/digits.yaml", base[:1])  # the demo's kl_exact
    assert "biased by design" in cfg.coverage(MLPChain(T=6).schedule, [])["bias"]


# ------------------------------------------------------------------------------------------- (c) a short run
def test_short_single_process_run(tmp_path):
    from rlr_dist.models import load_model
    from rlr_dist.train.config import load_config
    from rlr_dist.train.local import make_optimizer, train_local

    cfg = load_config("jobs/configs/digits.yaml", [
        '--estimator={"name": "rlr_release", "chain_len": 2}', '--regulariser={"name": "none"}',
        "--train.iterations=2", "--train.samples_per_prompt=4", "--train.eval_samples=8",
        f"--output_dir={tmp_path / 'run'}"])
    model = load_model(cfg.model)
    opt = make_optimizer(cfg, model.trainable_parameters())
    calls = []
    inner_step = opt.step
    opt.step = lambda *a, **k: (calls.append(1), inner_step(*a, **k))[1]
    before = [p.detach().clone() for p in model.trainable_parameters()]
    model, history = train_local(cfg, model=model, optimizer=opt)
    assert len(history) == 2 and len(calls) == 2 * 3  # 1 + chain_len optimiser steps per iteration
    for h in history:
        numbers = {k: v for k, v in h.items() if not k.startswith("time/")}
        assert all(math.isfinite(v) for v in numbers.values()), numbers
        assert "loss/fo" in h and "loss/ppo" in h
    assert "eval/heldout" in history[-1]
    assert any((p.detach() - q).abs().max() > 0 for p, q in zip(model.trainable_parameters(), before))
