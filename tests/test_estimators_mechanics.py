"""Deterministic checks of the estimator machinery (exact equalities, recording, errors)."""
import pytest
import torch

from rlr_dist.chain.trajectory import sample
from rlr_dist.estimators import ESTIMATORS, Advantages, Batch, backward_terms
from rlr_dist.estimators.advantages import leave_one_out_mean
from rlr_dist.estimators.rlr import RLR
from rlr_dist.regularisers import REGULARISERS
from rlr_dist.chain.tiny import MLPChain, bump_reward


def make_batch(est, chain=None, reg=None, adv=None, seed=0, m=16):
    chain = chain or MLPChain(T=8, G=1)
    reg = reg or REGULARISERS.build("none")
    gen = torch.Generator().manual_seed(seed)
    plan = est.plan(chain.schedule, gen)
    x_T = torch.randn(m, 2, generator=gen, dtype=torch.float64)
    traj = sample(chain, x_T, plan, generator=gen, with_reference=reg.active, prompt_ids=torch.arange(m) // 4)
    R, dR = bump_reward(traj.x0)
    return chain, Batch(traj, chain, R, dR, reg, adv or Advantages("loo"), reward_fn=lambda x, c: bump_reward(x)[0])


def grad_of(est, b, chain):
    loss = sum(t for _, t in est.terms(b))
    return torch.autograd.grad(loss, chain.theta)[0]


def test_ppo_first_epoch_equals_score_function_and_clips_later():
    plain, ppo = ESTIMATORS.build("lr"), ESTIMATORS.build("lr", clip_range=0.1)
    chain, b = make_batch(ppo)
    g_plain, g_ppo = grad_of(plain, b, chain), grad_of(ppo, b, chain)
    torch.testing.assert_close(g_ppo, g_plain, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # a later inner epoch: the policy has moved away from the sampling policy
        chain.theta += 0.3 * torch.randn(chain.theta.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_plain2, g_ppo2 = grad_of(plain, b, chain), grad_of(ppo, b, chain)
    assert (g_ppo2 - g_plain2).norm() > 1e-3 * g_plain2.norm()


def test_reward_scale_multiplies_every_term_alike():
    reg = REGULARISERS.build("kl_exact", beta=0.3)
    est = RLR(h=2)
    chain, b0 = make_batch(est, reg=reg, adv=Advantages("loo", "none"))
    _, b1 = make_batch(est, chain=chain, reg=reg, adv=Advantages("loo", "batch_std"))
    s = float(b0.reward.std())
    torch.testing.assert_close(grad_of(est, b1, chain), grad_of(est, b0, chain) / s, rtol=1e-10, atol=1e-14)


def test_selective_recording_stores_only_planned_steps():
    chain = MLPChain(T=20, G=1)
    sampled = RLR(h=2, zo="lr_sampled", K=2)
    _, b = make_batch(sampled, chain=chain)
    p = b.traj.plan
    assert set(b.traj.x) == set(p.states) and set(b.traj.eps) == set(p.noises)
    assert set(p.states) == {1, p.j + 1, *p.steps} and len(p.steps) == 2
    assert p.step_weight == pytest.approx((20 - 1 - 2) / 2)
    _, b_all = make_batch(ESTIMATORS.build("lr"), chain=chain)
    assert b.traj.nbytes() < b_all.traj.nbytes() / 3


def test_leave_one_out_baseline():
    v = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 7.0], dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 1, 1, 2])
    loo = leave_one_out_mean(v, g)
    torch.testing.assert_close(loo[:5], torch.tensor([2.5, 2.0, 1.5, 20.0, 10.0], dtype=torch.float64))
    assert loo[5] == pytest.approx((43 - 7) / 5)  # singleton prompt: the rest of the batch


def test_running_advantages_round_trip():
    a = Advantages("running", "running_std", momentum=0.5)
    R = torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(a(R, ids), R)  # no history: baseline 0
    a.update(R, ids)
    torch.testing.assert_close(a(R, ids), R - torch.tensor([2.0, 2.0, 6.0, 6.0], dtype=torch.float64))
    b = Advantages("running", "running_std")
    b.load_state_dict(a.state_dict())
    assert b.prompt_mean == a.prompt_mean and b.std == a.std


def test_backward_terms_matches_summed_loss_and_tracks_norms():
    est = RLR(h=2, j_law="softmax")
    chain, b = make_batch(est)
    expected = grad_of(est, b, chain)
    chain.theta.grad = None
    stats = backward_terms(est.terms(b), chain.trainable_parameters(), track_norms=True)
    torch.testing.assert_close(chain.theta.grad, expected)
    zo_norms = {k: v for k, v in stats.items() if k.startswith("gnorm/zo:")}
    assert len(zo_norms) == len(b.traj.plan.steps) and all(v > 0 for v in zo_norms.values())
    est.observe(stats)
    assert set(est.step_norm) == set(b.traj.plan.steps)


def test_spsa_restores_parameters():
    est = RLR(h=2, zo="spsa", spsa_scale=1e-2)
    chain, b = make_batch(est)
    before = chain.theta.detach().clone()
    g = grad_of(est, b, chain)
    torch.testing.assert_close(chain.theta.detach(), before, rtol=0, atol=1e-14)
    assert g.norm() > 0


@pytest.mark.parametrize("factory,needle", [
    (lambda: ESTIMATORS.build("lr"), "steps [1]"),
    (lambda: RLR(h=2, fo=False), "steps [1]"),
])
def test_likelihood_ratio_on_deterministic_step_is_refused(factory, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        factory().check(MLPChain(T=6, deterministic_last=True).schedule)


def test_lr_can_skip_deterministic_steps_and_says_so():
    chain = MLPChain(T=6, deterministic_last=True)
    est = ESTIMATORS.build("lr", deterministic="skip")
    est.check(chain.schedule)  # no error: step 1 is left out
    assert est.plan(chain.schedule).steps == (2, 3, 4, 5, 6)
    sampled = ESTIMATORS.build("lr", K=2, deterministic="skip").plan(chain.schedule, torch.Generator().manual_seed(0))
    assert len(sampled.steps) == 2 and 1 not in sampled.steps and sampled.step_weight == 5 / 2
    _, b = make_batch(est, chain)
    names = [name for name, _ in est.terms(b)]
    assert est.describe()["deterministic"] == "skip" and names == [f"lr:{k}" for k in range(2, 7)]


def test_bad_estimator_input_names_the_field():
    with pytest.raises(ValueError, match="unknown estimator 'rlrr'.*full_bp"):
        ESTIMATORS.build("rlrr")
    with pytest.raises(ValueError, match="^estimator.h: must be >= 1"):
        ESTIMATORS.build("rlr", {"h": 0}, "estimator")
    with pytest.raises(ValueError, match="^estimator.h: expected int, got 'two'"):
        ESTIMATORS.build("rlr", {"h": "two"}, "estimator")
    with pytest.raises(ValueError, match="^j_range: must be"):
        RLR(j_law="range", j_range=(5, 2))
    with pytest.raises(ValueError, match="K=9 exceeds"):
        ESTIMATORS.build("truncated_bp", K=9).check(MLPChain(T=6).schedule)
    with pytest.raises(ValueError, match="no valid block start"):
        RLR(h=6).check(MLPChain(T=6).schedule)
    with pytest.raises(ValueError, match="unknown regulariser"):
        REGULARISERS.build("kl_exactt")
    with pytest.raises(ValueError, match="^regulariser.beta: must be >= 0"):
        REGULARISERS.build("kl_exact", {"beta": -1}, "regulariser")


def test_pathwise_estimators_need_the_reward_gradient():
    est = RLR(h=2)
    chain, b = make_batch(est)
    b.dR = None
    with pytest.raises(ValueError, match="reward_grad"):
        list(est.terms(b))


def test_spsa_refuses_dpok_mode():
    est = RLR(h=2, zo="spsa")
    chain, b = make_batch(est, reg=REGULARISERS.build("kl_dpok", beta=0.1))
    with pytest.raises(ValueError, match="exact"):
        list(est.terms(b))


def test_truncated_bp_random_K_and_checkpointed_full_bp():
    est = ESTIMATORS.build("truncated_bp", k_min=2, k_max=5)
    sched = MLPChain(T=8).schedule
    gen = torch.Generator().manual_seed(0)
    Ks = {est.plan(sched, gen).K for _ in range(200)}
    assert Ks == {2, 3, 4, 5}
    chain, b = make_batch(est)
    assert set(b.traj.x) == {b.traj.plan.K} and set(b.traj.eps) == set(range(1, b.traj.plan.K + 1))
    full, full_ckpt = ESTIMATORS.build("full_bp", checkpoint=False), ESTIMATORS.build("full_bp", checkpoint=True)
    chain, b = make_batch(full, reg=REGULARISERS.build("kl_exact", beta=0.2))
    torch.testing.assert_close(grad_of(full_ckpt, b, chain), grad_of(full, b, chain), rtol=1e-12, atol=1e-14)
    # with the exact KL the reference call of every step is checkpointed with it: only latents are held
    from rlr_dist.memory import SavedTensorMeter

    peaks = {}
    for name, e in (("plain", full), ("ckpt", full_ckpt)):
        with SavedTensorMeter(exclude=[chain.theta, chain.step_delta]) as m:
            backward_terms(e.terms(b))
        peaks[name] = m.peak
    latents = b.traj.T * b.traj.state(b.traj.T).numel() * 8  # float64, one per checkpointed step
    assert peaks["ckpt"] <= 2 * latents < peaks["plain"] / 4
