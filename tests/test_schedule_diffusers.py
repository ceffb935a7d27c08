"""GaussianSchedule.from_diffusers reproduces DDIMScheduler / DDPMScheduler.step exactly."""
import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from rlr_dist.chain.diffusers_schedule import schedule_from_diffusers
from rlr_dist.chain.schedule import GaussianSchedule

T = 10  # inference steps, of 1000 training steps
SHAPES = [(2, 3, 4, 4), (1, 2, 3, 4, 4)]  # image (B,C,H,W) and video (B,C,F,H,W) latents
TOL = dict(atol=1e-5, rtol=1e-5)
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

DDIM_CASES = list(itertools.product(
    [0.0, 0.7, 1.0],  # eta
    ["leading", "trailing"],  # timestep_spacing
    [True, False],  # set_alpha_to_one
    [0, 1],  # steps_offset
    ["epsilon", "v_prediction"],  # prediction_type
    [False, True],  # clip_sample
))


def _ddim(spacing="leading", alpha_one=False, offset=1, pred="epsilon", clip=False, **kw):
    return DDIMScheduler(**SD_BETAS, timestep_spacing=spacing, set_alpha_to_one=alpha_one,
                         steps_offset=offset, prediction_type=pred, clip_sample=clip, **kw)


def _ddpm(spacing="leading", offset=0, pred="epsilon", clip=False, variance_type="fixed_small", **kw):
    return DDPMScheduler(**SD_BETAS, timestep_spacing=spacing, steps_offset=offset, prediction_type=pred,
                         clip_sample=clip, variance_type=variance_type, **kw)


def _inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("eta,spacing,alpha_one,offset,pred,clip", DDIM_CASES)
def test_ddim_matches_scheduler_step(eta, spacing, alpha_one, offset, pred, clip):
    sched = _ddim(spacing, alpha_one, offset, pred, clip)
    s = GaussianSchedule.from_diffusers(sched, T, eta=eta)
    assert sched.num_inference_steps is None  # the user's scheduler is left alone
    ref = _ddim(spacing, alpha_one, offset, pred, clip)
    ref.set_timesteps(T)
    assert (s.kind, s.prediction_type, s.T) == ("ddim", pred, T)
    assert s.clip_sample_range == (1.0 if clip else None)
    for k in range(T, 0, -1):
        t = int(ref.timesteps[T - k])
        assert int(s.timesteps[k]) == t
        for i, shape in enumerate(SHAPES):
            x, out, eps = _inputs(shape, seed=100 * k + i)
            want = ref.step(out, t, x, eta=eta, variance_noise=eps).prev_sample
            torch.testing.assert_close(s.mean(x, out, k) + s.sigma[k].float() * eps, want, **TOL)

    # Last step deterministic iff eta = 0, or it lands on ᾱ = 1, or it runs at t = 0 with
    # ᾱ_prev = final_alpha_cumprod = alphas_cumprod[0] (leading spacing, no offset).
    last_deterministic = eta == 0 or alpha_one or int(s.timesteps[1]) == 0
    assert (s.sigma[1] == 0) if last_deterministic else (s.sigma[1] > 0)
    assert bool(torch.all(s.sigma[2:] > 0)) == (eta > 0)


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log"])
def test_ddpm_matches_scheduler_step(spacing, offset, pred, clip, variance_type):
    sched = _ddpm(spacing, offset, pred, clip, variance_type)
    s = schedule_from_diffusers(sched, T)
    ref = _ddpm(spacing, offset, pred, clip, variance_type)
    ref.set_timesteps(T)
    assert (s.kind, s.prediction_type) == ("ddpm", pred)
    gen = torch.Generator().manual_seed(0)
    for k in range(T, 0, -1):
        t = int(ref.timesteps[T - k])
        assert int(s.timesteps[k]) == t
        for i, shape in enumerate(SHAPES):
            x, out, _ = _inputs(shape, seed=100 * k + i)
            # DDPMScheduler.step takes no noise: replay the generator to recover the noise it drew.
            state = gen.get_state()
            want = ref.step(out, t, x, generator=gen).prev_sample
            eps = randn_tensor(shape, generator=torch.Generator().set_state(state), dtype=out.dtype)
            torch.testing.assert_close(s.mean(x, out, k) + s.sigma[k].float() * eps, want, **TOL)
    assert s.sigma[1] == 0  # DDPM adds no noise on its last step
    assert bool(torch.all(s.sigma[2:] > 0))


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddpm_equals_ddim_eta1(spacing, offset, pred):
    """Spec §1: DDPM (fixed_small, no clipping) is DDIM(eta=1) on the same timesteps, in mean and sigma."""
    ddpm = schedule_from_diffusers(_ddpm(spacing, offset, pred), T)
    ddim = schedule_from_diffusers(_ddim(spacing, alpha_one=True, offset=offset, pred=pred), T, eta=1.0)
    assert torch.equal(ddpm.timesteps, ddim.timesteps)
    torch.testing.assert_close(ddpm.sigma, ddim.sigma, atol=1e-12, rtol=1e-10)
    for k in range(1, T + 1):
        x, out, _ = (v.double() for v in _inputs(SHAPES[0], seed=k))
        torch.testing.assert_close(ddpm.mean(x, out, k), ddim.mean(x, out, k), atol=1e-10, rtol=1e-10)


def test_last_step_eta_overrides_step_one():
    sched = _ddim()
    s = schedule_from_diffusers(sched, T, eta=1.0, last_step_eta=0.0)
    full = schedule_from_diffusers(sched, T, eta=1.0)
    assert s.sigma[1] == 0 and full.sigma[1] > 0
    assert torch.equal(s.sigma[2:], full.sigma[2:])
    sched.set_timesteps(T)
    x, out, eps = _inputs(SHAPES[0], seed=1)
    want = sched.step(out, int(s.timesteps[1]), x, eta=0.0).prev_sample
    torch.testing.assert_close(s.step(x, out, 1, eps), want, **TOL)


@pytest.mark.parametrize("make,kwargs,field", [
    (_ddim, dict(eta=-0.1), "eta"),
    (_ddim, dict(eta=1.0, last_step_eta=-1.0), "last_step_eta"),
    (_ddim, dict(eta=5.0), "eta"),  # sigma^2 > 1 - ᾱ_prev: diffusers would return NaN
    (_ddpm, dict(eta=0.5), "eta"),
    (_ddpm, dict(last_step_eta=0.0), "last_step_eta"),
    (_ddim, dict(num_inference_steps=0), "num_inference_steps"),
])
def test_bad_arguments_name_the_field(make, kwargs, field):
    kwargs = {"num_inference_steps": T, **kwargs}
    with pytest.raises(ValueError, match=field):
        schedule_from_diffusers(make(), **kwargs)


@pytest.mark.parametrize("sched,field", [
    (_ddim(thresholding=True), "thresholding"),
    (_ddpm(thresholding=True), "thresholding"),
    (_ddpm(variance_type="fixed_large"), "variance_type"),
    (_ddpm(variance_type="learned_range"), "variance_type"),
])
def test_unsupported_config_names_the_field(sched, field):
    with pytest.raises(ValueError, match=field):
        schedule_from_diffusers(sched, T)


def test_unsupported_scheduler_class():
    with pytest.raises(ValueError, match="EulerDiscreteScheduler.*DDIMScheduler, DDPMScheduler"):
        schedule_from_diffusers(EulerDiscreteScheduler(), T)
