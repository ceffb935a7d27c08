"""DenoiserChain on tiny diffusers UNets: shapes, batched CFG gradients, frozen reference."""
import copy

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel, UNet3DConditionModel
from torch import nn

from rlr_dist.chain import Chain, GaussianSchedule
from rlr_dist.chain.denoiser import DenoiserChain, unet_fn

T = 4
W = 3.0
TINY = dict(sample_size=8, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4)


def _text2d():
    unet = UNet2DConditionModel(**TINY, in_channels=4, out_channels=4, cross_attention_dim=8, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    # x (B,C,H,W), cond = text embeddings (B,L,D), uncond = null embeddings of batch 1
    return unet, (2, 4, 8, 8), torch.randn(2, 5, 8), torch.randn(1, 5, 8)


def _video3d():
    unet = UNet3DConditionModel(**TINY, in_channels=4, out_channels=4, cross_attention_dim=8, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
    return unet, (1, 4, 2, 8, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 8)  # x (B,C,F,H,W)


def _class2d():
    unet = UNet2DModel(**TINY, in_channels=3, out_channels=3, num_class_embeds=3,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    return unet, (2, 3, 8, 8), torch.tensor([0, 1]), torch.tensor(2)  # class 2 is the null label


MODELS = {"unet2d_text": _text2d, "unet3d_video": _video3d, "unet2d_class": _class2d}


@pytest.fixture(scope="module")
def schedule():
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return GaussianSchedule.from_diffusers(sched, T, eta=1.0)


@pytest.fixture(scope="module", params=list(MODELS))
def setup(request):
    torch.manual_seed(0)
    unet, shape, cond, uncond = MODELS[request.param]()
    # eval(): UNet3DConditionModel's temporal convs have a hard-coded dropout of 0.1, so in train()
    # mode its output (and gradient) is random.
    return unet_fn(unet).eval(), torch.randn(shape), cond, uncond


def _grads(out, params):
    return torch.autograd.grad(out.sum(), params, allow_unused=True)


@pytest.mark.parametrize("w", [1.0, W])
def test_mean_shape_and_protocol(setup, schedule, w):
    model, x, cond, uncond = setup
    chain = DenoiserChain(model, schedule, guidance_scale=w, uncond=uncond)
    assert isinstance(chain, Chain)
    for k in (T, 1):
        m = chain.mean(x, k, cond)
        assert m.shape == x.shape and torch.isfinite(m).all()


def test_cfg_matches_two_calls_and_grads_reach_weights(setup, schedule):
    # float64, so that batched-vs-separate kernel rounding stays far below the 1e-5 tolerance
    model, x, cond, uncond = setup
    model, x = copy.deepcopy(model).double(), x.double()
    if cond.is_floating_point():
        cond, uncond = cond.double(), uncond.double()
    chain = DenoiserChain(model, schedule, guidance_scale=W, uncond=uncond)
    params = chain.trainable_parameters()
    assert params == list(model.parameters())
    k = 2
    batched = chain.mean(x, k, cond)

    t = schedule.timesteps[k].expand(x.shape[0])
    uncond_b = uncond.expand(cond.shape[0], *uncond.shape[1:]) if uncond.dim() else uncond.expand(cond.shape[0])
    out_u, out_c = model(x, t, uncond_b), model(x, t, cond)
    assert not torch.allclose(out_u, out_c)  # the condition matters, so CFG is not a no-op
    manual = schedule.mean(x, out_u + W * (out_c - out_u), k)

    torch.testing.assert_close(batched, manual, atol=1e-5, rtol=1e-5)
    g_batched, g_manual = _grads(batched, params), _grads(manual, params)
    assert any(g is not None and g.abs().sum() > 0 for g in g_batched)
    for gb, gm in zip(g_batched, g_manual):
        assert (gb is None) == (gm is None)
        if gb is not None:
            torch.testing.assert_close(gb, gm, atol=1e-5, rtol=1e-5)


def test_ref_mean_frozen_copy(setup, schedule):
    model, x, cond, uncond = setup
    ref = copy.deepcopy(model).requires_grad_(False)
    chain = DenoiserChain(model, schedule, guidance_scale=W, uncond=uncond, ref_model=ref)
    x = x.clone().requires_grad_(True)
    for k in (T, 1):
        torch.testing.assert_close(chain.mean(x, k, cond), chain.ref_mean(x, k, cond), atol=1e-5, rtol=1e-5)
    chain.ref_mean(x, 1, cond).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in ref.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_ref_mean_with_shared_weights_leaves_model_grads_alone(setup, schedule):
    """A reference that shares (trainable) weights with the model still gives no parameter gradient."""
    model, x, cond, uncond = setup
    chain = DenoiserChain(model, schedule, guidance_scale=W, uncond=uncond, ref_model=model)
    x = x.clone().requires_grad_(True)
    chain.ref_mean(x, 2, cond).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_unconditional_unet2d(schedule):
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY, in_channels=3, out_channels=3,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    x = torch.randn(2, 3, 8, 8)
    assert DenoiserChain(unet_fn(unet).eval(), schedule).mean(x, T, None).shape == x.shape


def test_trainable_parameters_and_errors(schedule):
    lin = nn.Linear(2, 2)
    lin.bias.requires_grad_(False)
    assert DenoiserChain(lin, schedule).trainable_parameters() == [lin.weight]
    w = torch.zeros(1, requires_grad=True)

    def fn(x, t, cond):
        return x * w

    assert DenoiserChain(fn, schedule, params=[w]).trainable_parameters() == [w]
    with pytest.raises(ValueError, match="params="):
        DenoiserChain(fn, schedule).trainable_parameters()
    with pytest.raises(ValueError, match="ref_model"):
        DenoiserChain(fn, schedule).ref_mean(torch.zeros(1, 2), 1, None)
    with pytest.raises(ValueError, match="uncond"):
        DenoiserChain(fn, schedule, guidance_scale=W)
    with pytest.raises(ValueError, match="Linear"):
        unet_fn(lin)
