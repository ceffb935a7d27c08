"""Flow-matching chains (rlr_dist.chain.flow, docs/flow.md): the ODE against diffusers'
FlowMatchEulerDiscreteScheduler, the stochastic transitions against independent readings of their SDEs,
marginal preservation on exact Gaussian data, on-policy log-probabilities, and the estimators'
unbiasedness on an exact linear flow chain — with and without a stochastic window.
"""
import itertools
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from rlr_dist.chain.denoiser import DenoiserChain
from rlr_dist.chain.flow import (FlowSchedule, fixed_window, log_prob, random_window, recompute_log_prob,
                                 resolution_mu, rollout, sliding_window)
from rlr_dist.chain.tiny_flow import (LinearFlowChain, gaussian_data_marginal, gaussian_data_velocity, gaussian_kl,
                                      tiny_flow_schedule)
from rlr_dist.chain.trajectory import Plan, sample
from rlr_dist.estimators import ESTIMATORS
from rlr_dist.regularisers import REGULARISERS
from rlr_dist.regularisers.regulariser import KLExact
from rlr_dist.chain.tiny import quadratic_reward
from rlr_dist.estimators.montecarlo import bonferroni_threshold, call_means, estimate, z_scores

SHAPES = [(2, 4, 6, 6), (1, 3, 2, 4, 4)]  # image (B,C,H,W) and video (B,C,F,H,W) latents

# ------------------------------------------------------------------------------------------- ODE = diffusers

_STATIC = [(dict(shift=s, shift_terminal=term), n, None, None)  # shift_terminal with N = 1 is NaN in diffusers
           for s, term, n in itertools.product([1.0, 3.0, 0.5], [None, 0.02], [1, 4, 28]) if n > 1 or term is None]
_STATIC += [(dict(shift=s, shift_terminal=0.02), 2, None, None) for s in (1.0, 3.0, 0.5)]
_DYNAMIC = [(dict(use_dynamic_shifting=True, time_shift_type=kind, shift_terminal=term), n, mu, None)
            for kind, mu, term, n in itertools.product(["exponential", "linear"], [0.5, "res4096"], [None, 0.02], [4, 20])]
_CUSTOM = ([(dict(use_dynamic_shifting=True), n, "res1024", "flux") for n in (4, 20, 50)]
           + [(dict(shift=3.0), n, None, "flux") for n in (4, 20)])
_CONVERTED = [(dict(shift=s, **{conv: True}), n, None, None)
              for conv, s, n in itertools.product(["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"],
                                                  [1.0, 3.0], [5, 20])]
ODE_CASES = _STATIC + _DYNAMIC + _CUSTOM + _CONVERTED
assert len(ODE_CASES) >= 50


def _resolve(cfg, mu, sigmas, n):
    conf = FlowMatchEulerDiscreteScheduler(**cfg).config
    if isinstance(mu, str):
        mu = resolution_mu(conf, int(mu[3:]))
    if sigmas == "flux":  # the FLUX pipeline's unshifted sigmas
        sigmas = list(np.linspace(1.0, 1 / n, n))
    return mu, sigmas


@pytest.mark.parametrize("cfg,n,mu,sigmas", ODE_CASES, ids=[f"{c}-N{n}-mu{m}-{s}" for c, n, m, s in ODE_CASES])
def test_ode_equals_flow_match_euler_step(cfg, n, mu, sigmas):
    mu, sigmas = _resolve(cfg, mu, sigmas, n)
    user = FlowMatchEulerDiscreteScheduler(**cfg)
    s = FlowSchedule.from_diffusers(user, n, mu=mu, sigmas=sigmas)
    assert getattr(user, "num_inference_steps", None) is None  # the user's scheduler is left alone
    ref = FlowMatchEulerDiscreteScheduler(**cfg)
    ref.set_timesteps(n, mu=mu, sigmas=sigmas)
    assert s.T == n and float(s.flow_t[0]) == 0.0 and bool(torch.all(s.sigma == 0))
    assert torch.equal(s.flow_t, ref.sigmas.double().flip(0))
    for shape in SHAPES:
        ref.set_timesteps(n, mu=mu, sigmas=sigmas)
        ref.set_begin_index(0)
        g = torch.Generator().manual_seed(n)
        x = torch.randn(shape, generator=g)
        for i, t in enumerate(ref.timesteps):
            k = n - i
            assert float(s.timesteps[k]) == float(t)
            v = torch.randn(shape, generator=g)
            want = ref.step(v, t, x).prev_sample
            got = s.step(x, v, k, torch.randn(shape, generator=g))  # σ = 0: the noise must not matter
            assert torch.equal(got, want), f"step k={k}: max |diff| = {float((got - want).abs().max()):.3g}"
            x = want


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_from_diffusers_accepts_a_config_and_refuses_what_it_cannot_reproduce():
    cfg = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    a = FlowSchedule.from_diffusers(cfg, 10)
    b = FlowSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(shift=3.0), 10)
    assert torch.equal(a.flow_t, b.flow_t) and torch.equal(a.timesteps, b.timesteps)
    with pytest.raises(ValueError, match="invert_sigmas"):
        FlowSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(invert_sigmas=True), 10)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        FlowSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), 10)
    with pytest.raises(ValueError, match="not finite"):  # diffusers' shift_terminal stretch divides by 0 at N = 1
        FlowSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(shift_terminal=0.1), 1)
    with pytest.raises(ValueError, match="needs mu"):
        FlowSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 10)

    class Patched(FlowMatchEulerDiscreteScheduler):
        pass

    with pytest.raises(ValueError, match="subclass"):
        FlowSchedule.from_diffusers(Patched(), 10)
    with pytest.raises(ValueError, match="cps needs"):
        tiny_flow_schedule(6, "cps", eta=1.5)
    with pytest.raises(ValueError, match="window steps"):
        tiny_flow_schedule(6, window={0, 3})
    with pytest.raises(ValueError, match="transition"):
        tiny_flow_schedule(6, "sde")


def test_stochastic_sampling_config_is_cps_with_eta_one():
    """diffusers' ``stochastic_sampling`` step, x' = (1−t')x̂₀ + t'·noise, is CPS at η = 1."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    s = FlowSchedule.from_diffusers(sched, 8, transition="cps", eta=1.0)
    sched.set_timesteps(8)
    sched.set_begin_index(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPES[0], generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(sched.timesteps):
        k = 8 - i
        v = torch.randn(SHAPES[0], generator=torch.Generator().manual_seed(10 + k))
        state = gen.get_state()
        want = sched.step(v, t, x, generator=gen).prev_sample
        eps = randn_tensor(SHAPES[0], generator=torch.Generator().set_state(state), dtype=x.dtype)
        torch.testing.assert_close(s.step(x, v, k, eps), want, atol=1e-6, rtol=1e-6)
        x = want


def test_sigmas_argument_is_unshifted_passing_shifted_ones_shifts_twice():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    default = FlowSchedule.from_diffusers(sched, 10)
    base = list(np.linspace(1.0, sched.sigma_min, 10))  # what set_timesteps(10) shifts
    same = FlowSchedule.from_diffusers(sched, 10, sigmas=base)
    torch.testing.assert_close(same.flow_t, default.flow_t, atol=1e-6, rtol=0)
    shifted = default.flow_t.flip(0)[:-1].tolist()  # = scheduler.sigmas after set_timesteps: already shifted
    twice = FlowSchedule.from_diffusers(sched, 10, sigmas=shifted)
    assert bool(torch.all(twice.flow_t[1:-1] > default.flow_t[1:-1] + 1e-3))


# ------------------------------------------------------------------------ stochastic transitions: SDE readings

def _sde_schedules():
    return [tiny_flow_schedule(6, "flow_sde", 0.7), tiny_flow_schedule(10, "flow_sde", 1.0, shift=3.0),
            FlowSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(shift=3.0), 12, "flow_sde", 0.7)]


@pytest.mark.parametrize("idx", range(3))
def test_flow_sde_is_euler_maruyama_of_the_reverse_sde(idx):
    """μ and std against the SDE dx = [v − (s²/2)∇log p_t]dt + s dW̄ built here from the velocity→score
    identity ∇log p_t(x) = −(x + (1−t)v)/t, with s = η√(t/(1−t)) (at t = 1: s at the next flow time)."""
    s = _sde_schedules()[idx]
    g = torch.Generator().manual_seed(idx)
    ts = s.flow_t.tolist()
    for k in range(1, s.T + 1):
        t, dt = ts[k], ts[k - 1] - ts[k]
        te = t if t < 1 else max(v for v in ts if v < 1)
        diff = s.eta * math.sqrt(te / (1 - te))
        x, v = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2))
        score = -(x + (1 - t) * v) / t
        want = x + (v - 0.5 * diff**2 * score) * dt
        torch.testing.assert_close(s.mean(x, v, k), want, atol=1e-12, rtol=1e-12)
        assert abs(float(s.sigma[k]) - diff * math.sqrt(-dt)) < 1e-14
        # per-step KL between two velocities at the same x: (1 + s²(1−t)/(2t))²·‖Δv‖²·(−dt)/(2s²)  (spec §13)
        dv = torch.randn(3, 4, generator=g, dtype=torch.float64)
        kl = (s.mean(x, v + dv, k) - s.mean(x, v, k)).pow(2).sum() / (2 * float(s.sigma[k]) ** 2)
        want_kl = (1 + diff**2 * (1 - t) / (2 * t)) ** 2 * dv.pow(2).sum() * (-dt) / (2 * diff**2)
        assert abs(float(kl / want_kl) - 1) < 1e-10
    # the last step lands on t = 0 and keeps its Euler–Maruyama noise: std = s(t_1)·√t_1 > 0
    assert s.stochastic(1) and abs(float(s.sigma[1]) - s.eta * ts[1] / math.sqrt(1 - ts[1])) < 1e-14


def test_flow_sde_t1_guard_variants():
    nxt = tiny_flow_schedule(5, "flow_sde", 0.7)
    grpo = FlowSchedule.from_flow_times(nxt.flow_t.flip(0), "flow_sde", 0.7, t1_guard="flow_grpo")
    tg = float(nxt.flow_t[4])  # 0.8
    dt = tg - 1.0
    assert abs(float(nxt.sigma[5]) - 0.7 * math.sqrt(tg / (1 - tg)) * math.sqrt(-dt)) < 1e-14
    assert abs(float(grpo.sigma[5]) - 0.7 * math.sqrt(1 / (1 - tg)) * math.sqrt(-dt)) < 1e-14
    assert torch.equal(nxt.sigma[1:5], grpo.sigma[1:5])


def test_cps_preserves_the_coefficients_of_a_point_mass():
    """With the true velocity of point-mass data, v = (x − x_d)/t: x̂₀ = x_d exactly, and x' is
    (1−t')·x_d + (coefficient on the old noise)·ε + std·ε' with coefficient² + std² = t'²."""
    for eta in (0.3, 0.7, 1.0):
        s = tiny_flow_schedule(8, "cps", eta, shift=3.0)
        g = torch.Generator().manual_seed(0)
        x_d = torch.randn(5, 3, generator=g, dtype=torch.float64)
        for k in range(1, s.T + 1):
            t, tp = float(s.flow_t[k]), float(s.flow_t[k - 1])
            eps = torch.randn(5, 3, generator=g, dtype=torch.float64)
            x = (1 - t) * x_d + t * eps
            v = (x - x_d) / t
            torch.testing.assert_close(x - t * v, x_d)
            rest = s.mean(x, v, k) - (1 - tp) * x_d  # = c·ε
            c = float((rest / eps).mean())
            torch.testing.assert_close(rest, c * eps, atol=1e-12, rtol=1e-10)
            std = float(s.sigma[k])
            assert abs(c**2 + std**2 - tp**2) < 1e-12 and abs(std - tp * math.sin(eta * math.pi / 2)) < 1e-14
            # Monte Carlo: (x' − (1−t')x_d)/t' is unit-variance noise
            if k == 4:
                n = 200_000
                e1, e2 = (torch.randn(n, 1, generator=g, dtype=torch.float64) for _ in range(2))
                xd = torch.full((n, 1), 0.3, dtype=torch.float64)
                xk = (1 - t) * xd + t * e1
                xn = s.step(xk, (xk - xd) / t, k, e2)
                z = (xn - (1 - tp) * xd) / tp
                assert abs(float(z.mean())) < 5 / n**0.5 and abs(float(z.var()) - 1) < 5 * (2 / n) ** 0.5
        assert s.sigma[1] == 0  # t' = 0: the last CPS step is deterministic ...
        x, v = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
        torch.testing.assert_close(s.mean(x, v, 1), x + v * (0 - float(s.flow_t[1])))  # ... and is the ODE step


def test_eta_zero_and_outside_the_window_are_ode_steps():
    ode = tiny_flow_schedule(6, "ode", 0.0)
    for tr in ("flow_sde", "cps"):
        zero = tiny_flow_schedule(6, tr, 0.0)
        assert torch.equal(zero.coef_x, ode.coef_x) and torch.equal(zero.coef_v, ode.coef_v) and not zero.sigma.any()
        win = tiny_flow_schedule(6, tr, 0.7, window=fixed_window(6, 2, 2))
        full = tiny_flow_schedule(6, tr, 0.7)
        assert win.window == {4, 3}
        for k in range(1, 7):
            src = full if k in (3, 4) else ode
            assert float(win.coef_x[k]) == float(src.coef_x[k]) and float(win.sigma[k]) == float(src.sigma[k])
        assert [k for k in range(1, 7) if win.stochastic(k)] == [3, 4]
        assert full.with_window({3, 4}).to_dict() == win.to_dict()


def test_per_sample_steps():
    s = tiny_flow_schedule(6, "flow_sde", 0.7, window={2, 3, 4})
    x, v, e = (torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(i)) for i in range(3))
    ks = torch.arange(1, 7)
    want = torch.stack([s.step(x[i:i + 1], v[i:i + 1], int(ks[i]), e[i:i + 1])[0] for i in range(6)])
    torch.testing.assert_close(s.step(x, v, ks, e), want)


def test_window_functions():
    assert fixed_window(10, 0, 2) == {10, 9}
    seen = [sliding_window(10, 3, it, every=5, stride=2) for it in (0, 4, 5, 10, 15, 100)]
    assert seen[:3] == [{10, 9, 8}, {10, 9, 8}, {8, 7, 6}] and seen[3] == {6, 5, 4}
    assert seen[4] == {4, 3, 2} and seen[5] == {3, 2, 1}  # clamped at the output end
    a = [random_window(10, 2, torch.Generator().manual_seed(s), lo=0, hi=4) for s in range(50)]
    b = [random_window(10, 2, torch.Generator().manual_seed(s), lo=0, hi=4) for s in range(50)]
    assert a == b and {max(w) for w in a} == {10, 9, 8, 7, 6} and all(len(w) == 2 for w in a)
    with pytest.raises(ValueError, match="does not fit"):
        fixed_window(10, 9, 2)


# ------------------------------------------------------------------------------------ marginal preservation

DATA_MEAN = torch.tensor([0.0, 0.0], dtype=torch.float64)
DATA_VAR = torch.tensor([0.01, 0.25], dtype=torch.float64)


def marginal_table(eta=0.7, Ns=(10, 100, 1000)):
    out = {}
    for name, tr, win_lo in [("ode", "ode", 1), ("flow_sde", "flow_sde", 1), ("flow_sde, ODE last step", "flow_sde", 2),
                             ("cps", "cps", 1)]:
        row = []
        for N in Ns:
            s = tiny_flow_schedule(N, tr, eta if tr != "ode" else 0.0, window=range(win_lo, N + 1))
            m, v = gaussian_data_marginal(s, DATA_MEAN, DATA_VAR)
            row.append(gaussian_kl(m, v, DATA_MEAN, DATA_VAR))
        out[name] = row
    return out


def test_flow_sde_preserves_marginals_and_cps_does_not():
    tab = marginal_table()
    ode, sde, sde_last, cps = tab["ode"], tab["flow_sde"], tab["flow_sde, ODE last step"], tab["cps"]
    assert all(a < b for a, b in zip(sde, ode)) and all(a < b for a, b in zip(sde_last, ode))
    assert sde[0] > sde[1] > sde[2] and sde[2] < 1e-5
    assert ode[2] < 1e-4 and ode[0] / ode[1] > 50  # Euler: KL ~ 1/N²
    assert cps[2] > 0.02 and cps[2] > 0.5 * cps[1]  # fixed η: converges to a different law, not the data


class _ExactGaussianChain:
    """Chain protocol around the true velocity of the Gaussian data (for the Monte-Carlo check)."""

    def __init__(self, schedule):
        self.schedule = schedule

    def mean(self, x, k, cond=None):
        alpha, beta = gaussian_data_velocity(float(self.schedule.flow_t[k]), DATA_MEAN, DATA_VAR)
        return self.schedule.mean(x, alpha * x + beta, k)


@pytest.mark.parametrize("tr", ["flow_sde", "cps"])
def test_exact_marginal_matches_monte_carlo(tr):
    s = tiny_flow_schedule(12, tr, 0.7, shift=3.0)
    m, v = gaussian_data_marginal(s, DATA_MEAN, DATA_VAR)
    n = 100_000
    x0 = rollout(_ExactGaussianChain(s), torch.randn(n, 2, generator=torch.Generator().manual_seed(3),
                                                     dtype=torch.float64), generator=torch.Generator().manual_seed(4)).x[0]
    assert bool(torch.all((x0.mean(0) - m).abs() < 5 * (v / n).sqrt()))
    assert bool(torch.all((x0.var(0) / v - 1).abs() < 5 * (2 / n) ** 0.5))


# ------------------------------------------------------------------------------------ log-densities, on-policy

def test_log_prob_is_the_summed_gaussian_density():
    g = torch.Generator().manual_seed(0)
    mu, x = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    want = torch.distributions.Normal(mu.double(), 0.3).log_prob(x.double()).sum((1, 2))
    torch.testing.assert_close(log_prob(x, mu, 0.3), want)
    torch.testing.assert_close(log_prob(x, mu, 0.3, reduction="mean_compat"), want / 15)
    with pytest.raises(ValueError, match="std > 0"):
        log_prob(x, mu, 0.0)
    with pytest.raises(ValueError, match="reduction"):
        log_prob(x, mu, 0.3, reduction="mean")


class TinyVelocity(nn.Module):
    """A small velocity MLP over (channel, time) per latent position."""

    def __init__(self, C=4, H=32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Linear(C + 1, H), nn.SiLU(), nn.Linear(H, H), nn.SiLU(), nn.Linear(H, C))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def forward(self, x, t, cond=None):
        B, C = x.shape[:2]
        h = x.movedim(1, -1)
        tt = (t.float() / 1000).reshape(B, *([1] * (h.dim() - 1))).expand(*h.shape[:-1], 1)
        return self.net(torch.cat([h, tt.to(h.dtype)], -1)).movedim(-1, 1)


def _on_policy_setup(eta=0.7):
    sched = FlowSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(shift=3.0), 8, "flow_sde", eta)
    chain = DenoiserChain(TinyVelocity(), sched)
    x_T = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return chain, x_T, rollout(chain, x_T, generator=torch.Generator().manual_seed(1))


def on_policy_drift():
    """Max |recomputed − sampled| log-prob over all transitions: fp32 batch 8, fp32 batch 1, bf16 autocast."""
    chain, _, ro = _on_policy_setup()
    fp32 = b1 = bf16 = 0.0
    with torch.no_grad():
        for k in range(1, chain.schedule.T + 1):
            old = ro.log_prob[:, k]
            fp32 = max(fp32, float((recompute_log_prob(chain, ro.x[k], ro.x[k - 1], k) - old).abs().max()))
            for i in (0, 5):
                one = recompute_log_prob(chain, ro.x[k][i:i + 1], ro.x[k - 1][i:i + 1], k)
                b1 = max(b1, float((one - old[i]).abs().max()))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lp = recompute_log_prob(chain, ro.x[k], ro.x[k - 1], k)
            bf16 = max(bf16, float((lp - old).abs().max()))
    return fp32, b1, bf16


def test_on_policy_log_probs_are_recomputed_exactly():
    chain, x_T, ro = _on_policy_setup()
    assert bool(torch.all(ro.log_prob[:, 1:] != 0))  # every step of this schedule is stochastic
    # the recording sampler is the production sampler (same noise stream, same states)
    traj = sample(chain, x_T, Plan(states=frozenset(range(1, 9))), generator=torch.Generator().manual_seed(1))
    assert torch.equal(traj.x0, ro.x[0]) and all(torch.equal(traj.x[k], ro.x[k]) for k in range(1, 9))
    fp32, b1, bf16 = on_policy_drift()
    assert fp32 <= 1e-6 and b1 <= 1e-6, (fp32, b1)
    assert bf16 > 1e-2, bf16  # bf16 recomputation is *not* on-policy: the ratio drifts (docs/flow.md)


# ------------------------------------------------------------------------------------ unbiasedness (exact chain)

TARGET = torch.tensor([0.5, -0.3], dtype=torch.float64)
T = 6
M = 64          # trajectories per batch
CALLS = 100     # independent optimiser steps (plan draws)
G = 20          # batches per call -> 128k trajectories per estimator
ETA = 0.7
WINDOW = fixed_window(T, 2, 2)  # {4, 3}: ODE steps 6, 5 above it and 2, 1 below it


def flow_chain(G=G, window=None, transition="flow_sde", ref_noise=0.1):
    return LinearFlowChain(T=T, G=G, transition=transition, eta=ETA, window=window, ref_noise=ref_noise)


def exact_grad(beta=0.0, per_step=False, **chain_kw):
    ch = flow_chain(G=1, **chain_kw)
    wrt = ch.with_step_copies() if per_step else ch.theta
    (g,) = torch.autograd.grad(ch.exact_objective(TARGET, beta).sum(), wrt)
    return g[:, 0] if per_step else g[0]


def restricted(steps, **chain_kw):
    """Σ_{k ∈ steps} g_k: the exact gradient credited to the covered steps only."""
    g = exact_grad(per_step=True, **chain_kw)
    return sum(g[k] for k in steps)


def max_z(est, truth, reg=None, per_step=False, seed=1, calls=CALLS, **chain_kw):
    est = ESTIMATORS.build(est[0], **est[1]) if isinstance(est, tuple) else est
    out = estimate(flow_chain(**chain_kw), est, quadratic_reward(TARGET), calls, m=M, regulariser=reg, seed=seed,
                   per_step=per_step)
    cm = call_means(out).flatten(1)
    z = z_scores(cm, truth.flatten())
    return float(z.abs().max()), bonferroni_threshold(int((cm.std(0) > 0).sum())), cm


UNBIASED = [
    ("full_bp", {}, {}),
    ("rlr", dict(h=1), {}),
    ("rlr", dict(h=2), {}),
    ("rlr", dict(h=1, zo="lr_sampled", K=2), {}),
    ("rlr", dict(h=2, zo="lr_sampled", K=2), {}),
    ("lr", {}, {}),
    ("rlr", dict(h=2), dict(window=range(2, T + 1))),   # deterministic last step: covered by the FO term
    ("rlr", dict(h=2), dict(transition="cps")),         # CPS: its last step is deterministic by construction
]


@pytest.mark.parametrize("name,kw,chain_kw", UNBIASED, ids=[f"{n}-{kw}-{c}" for n, kw, c in UNBIASED])
def test_flow_estimators_unbiased(name, kw, chain_kw):
    z, thr, _ = max_z((name, kw), exact_grad(**chain_kw), **chain_kw)
    print(f"\n[flow z] {name} {kw} {chain_kw}: max|z| = {z:.2f} (threshold {thr:.2f})")
    assert z < thr, f"{name} {kw}: max|z| = {z:.2f} >= {thr:.2f}"


class MeanOverDimsKL(KLExact):
    """The "KL" of public flow trainers: the per-step KL averaged over latent dimensions (1/D of the KL)."""

    def __init__(self, beta, D):
        super().__init__(beta)
        self.D = D

    def cost(self, delta):
        return 0.5 * delta / self.D


def test_flow_kl_exact_is_unbiased_and_mean_reduced_kl_is_not():
    beta = 0.5
    truth = exact_grad(beta, ref_noise=0.3)
    for name, kw in [("rlr", dict(h=2)), ("lr", {}), ("full_bp", {})]:
        z, thr, _ = max_z((name, kw), truth, reg=REGULARISERS.build("kl_exact", beta=beta), ref_noise=0.3)
        print(f"\n[flow z] {name} {kw} + kl_exact β={beta}: max|z| = {z:.2f} (threshold {thr:.2f})")
        assert z < thr, f"{name} {kw} + kl_exact: max|z| = {z:.2f}"
    z, thr, _ = max_z(("rlr", dict(h=2)), truth, reg=MeanOverDimsKL(beta, D=2), ref_noise=0.3)
    print(f"\n[flow z] rlr h=2 + mean-over-dims KL: max|z| = {z:.2f}")
    assert z > thr, f"a mean-over-dimensions KL must be biased for E[R] − β·KL, max|z| = {z:.2f}"


NEGATIVE = [
    ("truncated_bp K=1", ("truncated_bp", dict(K=1))),
    ("rlr zo=none", ("rlr", dict(h=2, zo="none"))),
]


@pytest.mark.parametrize("label,est", NEGATIVE, ids=[n for n, _ in NEGATIVE])
def test_flow_negative_controls_are_rejected(label, est):
    z, thr, _ = max_z(est, exact_grad())
    print(f"\n[flow z] negative {label}: max|z| = {z:.2f}")
    assert z > thr, f"{label} should be rejected but max|z| = {z:.2f} < {thr:.2f}"


# ------------------------------------------------------------------------------------ stochastic window

def test_window_is_refused_by_default():
    sched = flow_chain(G=1, window=WINDOW).schedule
    with pytest.raises(ValueError, match="deterministic"):
        ESTIMATORS.build("rlr", h=2).check(sched)
    with pytest.raises(ValueError, match="deterministic"):
        ESTIMATORS.build("lr").check(sched)
    with pytest.raises(ValueError, match="no stochastic block start"):
        ESTIMATORS.build("rlr", h=2, deterministic="skip", j_law="range", j_range=(5, 5)).check(sched)
    with pytest.raises(ValueError, match="clip_range"):
        ESTIMATORS.build("lr", deterministic="absorb", clip_range=0.2)


def test_absorb_records_segment_tops_and_reports_uncoverable_steps():
    """Black-box RLR (no FO term) cannot cover the ODE steps below the window: they are reported fixed.
    The plan records the state at the top of every absorbed segment."""
    sched = flow_chain(G=1, window=WINDOW).schedule
    est = ESTIMATORS.build("rlr", h=2, fo=False, deterministic="absorb")
    est.check(sched)
    assert est.describe()["fixed_steps"] == [1, 2]
    plans = [est.plan(sched, torch.Generator().manual_seed(s)) for s in range(20)]
    assert {p.j for p in plans} == {3, 4}  # only stochastic block starts
    for p in plans:
        assert 6 in p.states  # the HO block is extended over the ODE steps above it up to k = T
        assert set(p.steps) == ({3} if p.j == 4 else set())
    lr = ESTIMATORS.build("lr", deterministic="absorb")
    assert lr.plan(sched).states == {3, 6} and lr.plan(sched).steps == (3, 4)


WINDOWED = [
    # (estimator, kwargs, steps whose g_k it estimates, fixed steps it must report)
    ("rlr", dict(h=1, deterministic="skip"), {1, 3, 4}, [2, 5, 6]),
    ("lr", dict(deterministic="skip"), {3, 4}, [1, 2, 5, 6]),
    ("lr", dict(deterministic="absorb"), {3, 4, 5, 6}, [1, 2]),
    ("rlr", dict(h=1, deterministic="absorb"), set(range(1, T + 1)), []),
    ("rlr", dict(h=2, deterministic="absorb"), set(range(1, T + 1)), []),
    ("rlr", dict(h=2, zo="lr_sampled", K=1, deterministic="absorb"), set(range(1, T + 1)), []),
    ("full_bp", {}, set(range(1, T + 1)), None),
]


@pytest.mark.parametrize("name,kw,covered,fixed", WINDOWED, ids=[f"{n}-{kw}" for n, kw, _, _ in WINDOWED])
def test_window_estimators_estimate_the_covered_steps(name, kw, covered, fixed):
    est = ESTIMATORS.build(name, **kw)
    est.check(flow_chain(G=1, window=WINDOW).schedule)
    if fixed is not None:
        assert est.describe()["fixed_steps"] == fixed
    truth = restricted(covered, window=WINDOW)
    z, thr, cm = max_z(est, truth, window=WINDOW)
    print(f"\n[flow z] window {sorted(WINDOW)} {name} {kw}: max|z| vs covered-steps gradient = {z:.2f} ({thr:.2f})")
    assert z < thr, f"{name} {kw}: max|z| = {z:.2f} >= {thr:.2f}"
    if covered != set(range(1, T + 1)):  # the bias statement is real: the full gradient is rejected
        z_full = float(z_scores(cm, exact_grad(window=WINDOW)).abs().max())
        print(f"[flow z]   ... vs the full gradient: max|z| = {z_full:.2f}")
        assert z_full > thr, f"{name} {kw}: fixed steps should bias the estimate, max|z| = {z_full:.2f}"


def test_window_per_step_credit():
    """Per-step parameter copies: a fixed step gets exactly no gradient; each covered step's estimate
    (FO, HO block with its absorbed ODE steps, ZO-LR) matches its own g_k."""
    g = exact_grad(per_step=True, window=WINDOW)
    est = ESTIMATORS.build("rlr", h=1, deterministic="skip")
    out = estimate(flow_chain(G=5, window=WINDOW), est, quadratic_reward(TARGET), 2, m=M, per_step=True, seed=2)
    assert bool(torch.all(out[:, :, [2, 5, 6]] == 0)) and bool(torch.all(out[:, :, [1, 3, 4]].abs().sum(-1) > 0))
    est = ESTIMATORS.build("rlr", h=2, deterministic="absorb")
    z, thr, _ = max_z(est, g, per_step=True, window=WINDOW)
    print(f"\n[flow z] window per-step rlr h=2 absorb: max|z| = {z:.2f} ({thr:.2f})")
    assert z < thr


def test_window_with_kl_exact():
    """KL only on the window's steps; absorbed ODE steps are differentiated pathwise inside the segments."""
    beta = 0.5
    truth = exact_grad(beta, window=WINDOW, ref_noise=0.3)
    for kw in (dict(h=2, deterministic="absorb"), dict(h=1, zo="lr_sampled", K=1, deterministic="absorb")):
        z, thr, _ = max_z(("rlr", kw), truth, reg=REGULARISERS.build("kl_exact", beta=beta), window=WINDOW, ref_noise=0.3)
        print(f"\n[flow z] window rlr {kw} + kl_exact: max|z| = {z:.2f} ({thr:.2f})")
        assert z < thr
