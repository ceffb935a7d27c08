"""Reward zoo: values, gradients, per-frame video application, composition, configs and error cases,
and the aesthetic predictor loaded from local and S3 storage (tiny random CLIP)."""
import math

import pytest
import torch

from rlr_dist import storage
from rlr_dist.config import ConfigError
from rlr_dist.rewards import REWARDS, Reward, RewardError, RewardScorer, RewardSpec, apply_reward, build_scorer
from rlr_dist.rewards.aesthetic import AestheticHead
from rlr_dist.rewards.video import frame_indices, temporal_consistency

IDENT = lambda x: x  # noqa: E731  (decoder: samples already in [0, 1])


def build_reward(section):
    """The reward a config section describes (as the trainer builds it)."""
    return RewardSpec.parse(section, "reward").build()


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


class PromptLen(Reward):
    """Test reward: len(prompt) × mean pixel (checks the per-frame prompt order)."""

    differentiable = True

    def forward(self, images, prompts=None):
        return torch.tensor([float(len(p)) for p in prompts]) * images.flatten(1).mean(1)


@pytest.fixture
def test_rewards():
    """Registers two broken rewards for the duration of a test."""

    class NaNAt1(Reward):
        differentiable = True

        def forward(self, images, prompts=None):
            R = images.flatten(1).mean(1)
            return torch.where(torch.arange(len(R)) == 1, torch.full_like(R, float("nan")), R)

    class WrongShape(Reward):
        differentiable = True

        def forward(self, images, prompts=None):
            return images.flatten(1).mean(1, keepdim=True)

    REWARDS.register("_test_nan")(NaNAt1)
    REWARDS.register("_test_shape")(WrongShape)
    yield
    for n in ("_test_nan", "_test_shape"):
        REWARDS._items.pop(n)


# ------------------------------------------------------------------------------------------ image


@pytest.mark.parametrize("C", [1, 3])
def test_jpeg_flat_is_more_compressible_than_noise(C):
    flat = torch.full((1, C, 64, 64), 0.4)
    noise = _rand(1, C, 64, 64)
    x = torch.cat([flat, noise])
    comp = REWARDS.build("jpeg_compressibility", quality=90)
    inc = REWARDS.build("jpeg_incompressibility", quality=90)
    Rc, g = RewardScorer(comp, IDENT).score(x)
    assert g is None and Rc.shape == (2,) and Rc[0] > Rc[1]
    assert Rc[1] < -1.0  # 64×64 noise does not fit in 1 kB
    Ri, _ = RewardScorer(inc, IDENT).score(x)
    torch.testing.assert_close(Ri, -Rc)
    # lower quality -> smaller files
    assert REWARDS.build("jpeg_incompressibility", quality=10)(noise) < Ri[1]


def test_jpeg_errors_name_the_reward():
    comp = REWARDS.build("jpeg_compressibility")
    with pytest.raises(RewardError, match="'jpeg_compressibility' is not differentiable"):
        RewardScorer(comp, IDENT).score(_rand(2, 3, 8, 8), need_grad=True)
    with pytest.raises(RewardError, match="jpeg_compressibility.*1 or 3"):
        RewardScorer(comp, IDENT).score(_rand(2, 4, 8, 8))
    with pytest.raises(ConfigError, match="quality: must be an int in"):
        REWARDS.build("jpeg_compressibility", quality=0)


def test_brightness_gradient_is_uniform():
    B, C, H, W = 3, 3, 5, 7
    x = _rand(B, C, H, W)
    R, g = RewardScorer(REWARDS.build("brightness"), IDENT).score(x, need_grad=True)
    torch.testing.assert_close(R, x.flatten(1).mean(1))
    torch.testing.assert_close(g, torch.full_like(x, 1 / (C * H * W)))
    # through the default decoder (x/2 + 0.5, inside the clamp) the chain rule halves it
    _, g2 = RewardScorer(REWARDS.build("brightness")).score(x * 1.8 - 0.9, need_grad=True)
    torch.testing.assert_close(g2, torch.full_like(x, 0.5 / (C * H * W)))


def test_contrast_value_and_flat_image_gradient():
    x = torch.cat([_rand(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.3)])
    R, g = RewardScorer(REWARDS.build("contrast"), IDENT).score(x, need_grad=True)
    torch.testing.assert_close(R[0], x[0].std(correction=0))
    assert R[1] < 1e-5 and torch.isfinite(g).all() and g[1].abs().max() == 0
    assert g[0].abs().sum() > 0


# ------------------------------------------------------------------------------------------ video


def test_image_reward_on_video_is_frame_mean_with_prompts_repeated():
    B, C, F, H, W = 2, 3, 4, 6, 6
    v = _rand(B, C, F, H, W)
    R, g = RewardScorer(REWARDS.build("contrast"), IDENT).score(v, need_grad=True)
    manual = torch.stack([torch.stack([v[b, :, f].std(correction=0) for f in range(F)]).mean() for b in range(B)])
    torch.testing.assert_close(R, manual)
    assert g.shape == v.shape
    prompts = ["a", "abcd"]
    R2 = apply_reward(PromptLen(), v, prompts)
    torch.testing.assert_close(R2, torch.tensor([1.0, 4.0]) * v.flatten(1).mean(1))


def test_video_reward_on_images_raises_naming_it():
    with pytest.raises(RewardError, match="'temporal_consistency' scores video"):
        RewardScorer(REWARDS.build("temporal_consistency"), IDENT).score(_rand(2, 3, 8, 8))
    with pytest.raises(RewardError, match="'brightness'.*got shape \\(2, 8\\)"):
        apply_reward(REWARDS.build("brightness"), _rand(2, 8))


def test_temporal_consistency_static_flicker_and_gradient():
    frame = _rand(1, 3, 1, 8, 8)
    static = frame.expand(1, 3, 5, 8, 8)
    flicker = torch.cat([frame, 1 - frame] * 3, dim=2)[:, :, :5]
    drift = torch.cat([frame * (1 - 0.05 * f) for f in range(5)], dim=2)
    v = torch.cat([static, flicker, drift])
    R, g = RewardScorer(REWARDS.build("temporal_consistency"), IDENT).score(v, need_grad=True)
    assert R[0] == 0 and R[1] < R[2] < 0
    torch.testing.assert_close(R[1], -((1 - 2 * frame) ** 2).mean())
    assert g[0].abs().max() == 0 and g[1].abs().sum() > 0
    assert temporal_consistency(_rand(2, 3, 1, 4, 4)).eq(0).all()


def test_frame_indices():
    assert frame_indices(16, 4, None) == [0, 5, 10, 15]
    assert frame_indices(5, 1, None) == [0]
    assert frame_indices(3, 8, None) == [0, 1, 2]
    assert frame_indices(7, None, 3) == [0, 3, 6]
    assert frame_indices(4, None, None) == [0, 1, 2, 3]


def test_video_frames_subsampling_aggregation_and_temporal_term():
    v = _rand(2, 3, 7, 6, 6)
    bright = v.mean(dim=(1, 3, 4))  # (B, F)
    spec = {"name": "brightness"}
    r = REWARDS.build("video_frames", reward=spec, num_frames=3)
    assert r.differentiable and r.modality == "video"
    torch.testing.assert_close(apply_reward(r, v), bright[:, [0, 3, 6]].mean(1))
    r = REWARDS.build("video_frames", reward=spec, frame_stride=2, aggregate="min", temporal_weight=0.5)
    torch.testing.assert_close(apply_reward(r, v), bright[:, [0, 2, 4, 6]].min(1).values + 0.5 * temporal_consistency(v))
    R, g = RewardScorer(r, IDENT).score(v, need_grad=True)
    assert g[:, :, 1].abs().sum() > 0  # an unscored frame still gets gradient from the temporal term
    jpeg = REWARDS.build("video_frames", reward={"name": "jpeg_compressibility", "quality": 50})
    assert not jpeg.differentiable and apply_reward(jpeg, v).shape == (2,)
    with pytest.raises(ConfigError, match="^frame_stride: give num_frames or frame_stride, not both"):
        REWARDS.build("video_frames", reward=spec, num_frames=2, frame_stride=2)
    with pytest.raises(ConfigError, match="^reward: 'temporal_consistency' scores whole videos.*per-frame"):
        REWARDS.build("video_frames", reward={"name": "temporal_consistency"})
    with pytest.raises(ConfigError, match=r"^reward\.quality: must be an int in \[1, 100\], got 101"):
        REWARDS.build("video_frames", reward={"name": "jpeg_compressibility", "quality": 101})


def test_scorer_decodes_only_the_frames_a_video_reward_reads():
    decoded = []

    def decoder(x):  # frame-wise, like the VAE / pixel decoders; records how many frames it decoded
        decoded.append(x.shape[2])
        return torch.sigmoid(x)

    v = _rand(2, 3, 8, 5, 5) * 4 - 2
    sub = REWARDS.build("video_frames", reward={"name": "contrast"}, frame_stride=3)  # frames 0, 3, 6
    assert sub.frames(8) == [0, 3, 6]
    R, g = RewardScorer(sub, decoder).score(v, need_grad=True)
    assert decoded == [3]
    # the same values and gradient as decoding the whole clip
    x = v.clone().requires_grad_(True)
    R_full = apply_reward(sub, decoder(x))
    (g_full,) = torch.autograd.grad(R_full.sum(), x)
    torch.testing.assert_close(R, R_full.detach())
    torch.testing.assert_close(g, g_full)
    assert g[:, :, [1, 2, 4, 5, 7]].abs().sum() == 0 and g[:, :, [0, 3, 6]].abs().sum() > 0
    # a temporal term reads every frame; a weighted sum reads the union of its parts' frames
    decoded.clear()
    RewardScorer(REWARDS.build("video_frames", reward={"name": "contrast"}, num_frames=2, temporal_weight=0.1),
                 decoder).score(v)
    both = REWARDS.build("weighted_sum", parts=[
        {"name": "video_frames", "reward": {"name": "contrast"}, "num_frames": 2},
        {"name": "video_frames", "reward": {"name": "brightness"}, "frame_stride": 4}])
    assert both.frames(8) == [0, 4, 7]
    RewardScorer(both, decoder).score(v)
    assert decoded == [8, 3]


@pytest.mark.parametrize("spec", [{"name": "contrast"}, {"name": "temporal_consistency"},
                                  {"name": "video_frames", "reward": {"name": "brightness"}, "frame_stride": 2}])
def test_vae_slicing_takes_dR_dx0_one_image_at_a_time_with_the_same_gradient(spec):
    """model.vae_slicing under ∂R/∂x₀: the reward is differentiated on images decoded without a graph, then the
    VAE one image at a time — the same R and ∂R/∂x₀ (also for a temporal reward and for a frame subset), and
    the decoder's saved activations of one image instead of all of them."""
    from rlr_dist.memory import SavedTensorMeter
    from rlr_dist.models.layouts import LatentDecoder
    from rlr_dist.models.tiny import _vae

    torch.manual_seed(0)
    vae = _vae().eval().requires_grad_(False)
    z = torch.randn(2, 4, 4, 8, 8)  # 2 clips of 4 latent frames
    out = {}
    for slice_size in (None, 1):
        scorer = RewardScorer(REWARDS.build(spec["name"], **{k: v for k, v in spec.items() if k != "name"}),
                              LatentDecoder(vae, slice_size))
        assert scorer.sliced is (slice_size is not None)
        with SavedTensorMeter([*vae.parameters(), *vae.buffers(), z]) as meter:
            R, g = scorer.score(z, need_grad=True)
        out[slice_size] = (R, g, meter.peak)
    torch.testing.assert_close(out[1][0], out[None][0])
    torch.testing.assert_close(out[1][1], out[None][1], rtol=1e-4, atol=1e-7)
    assert out[None][1].abs().sum() > 0 and out[1][2] < out[None][2] / 3, (out[None][2], out[1][2])


# ------------------------------------------------------------------------------------------ combine


def test_weighted_sum_values_and_gradients():
    x = _rand(3, 3, 8, 8)
    parts = [{"name": "brightness", "weight": 2.0}, {"name": "contrast", "weight": -0.5, "eps": 1e-10}]
    ws = REWARDS.build("weighted_sum", parts=parts)
    assert ws.differentiable and ws.modality == "image"
    R, g = RewardScorer(ws, IDENT).score(x, need_grad=True)
    Rb, gb = RewardScorer(REWARDS.build("brightness"), IDENT).score(x, need_grad=True)
    Rc, gc = RewardScorer(REWARDS.build("contrast", eps=1e-10), IDENT).score(x, need_grad=True)
    torch.testing.assert_close(R, 2 * Rb - 0.5 * Rc)
    torch.testing.assert_close(g, 2 * gb - 0.5 * gc)
    # mixed with a black-box part: not differentiable; mixed with a video part: video
    mixed = REWARDS.build("weighted_sum", parts=parts + [{"name": "jpeg_compressibility", "weight": 0.1}])
    assert not mixed.differentiable
    with pytest.raises(RewardError, match="'weighted_sum' is not differentiable"):
        RewardScorer(mixed, IDENT).score(x, need_grad=True)
    vid = REWARDS.build("weighted_sum", parts=[{"name": "brightness"}, {"name": "temporal_consistency", "weight": 3}])
    assert vid.modality == "video"
    v = _rand(2, 3, 4, 6, 6)
    torch.testing.assert_close(apply_reward(vid, v), v.flatten(1).mean(1) + 3 * temporal_consistency(v))
    with pytest.raises(RewardError, match="'weighted_sum' scores video"):
        apply_reward(vid, x)


def test_part_errors_name_the_part(test_rewards):
    x = _rand(3, 3, 4, 4)
    bad = REWARDS.build("weighted_sum", parts=[{"name": "brightness"}, {"name": "_test_nan"}])
    with pytest.raises(RewardError, match=r"weighted_sum.parts\[1\] \(_test_nan\).*non-finite.*\[1\]"):
        RewardScorer(bad, IDENT).score(x)
    bad = REWARDS.build("weighted_sum", parts=[{"name": "_test_shape"}, {"name": "brightness"}])
    with pytest.raises(RewardError, match=r"weighted_sum.parts\[0\] \(_test_shape\).*shape \(3, 1\)"):
        RewardScorer(bad, IDENT).score(x)
    with pytest.raises(ConfigError, match=r"^parts\[0\].weight: expected a finite number"):
        REWARDS.build("weighted_sum", parts=[{"name": "brightness", "weight": float("nan")}])
    with pytest.raises(ConfigError, match=r"^parts\[0\].wieght: unknown parameter of reward 'brightness'"):
        REWARDS.build("weighted_sum", parts=[{"name": "brightness", "wieght": 1.0}])


def test_scorer_nonfinite_fail_and_drop(test_rewards):
    x = _rand(3, 3, 4, 4)
    with pytest.raises(RewardError, match="'_test_nan' returned non-finite.*\\[1\\]"):
        RewardScorer(REWARDS.build("_test_nan"), IDENT).score(x, need_grad=True)
    with pytest.raises(RewardError, match="'_test_shape' returned shape \\(3, 1\\)"):
        RewardScorer(REWARDS.build("_test_shape"), IDENT).score(x)
    scorer = build_scorer({"name": "_test_nan", "on_nonfinite": "drop"}, IDENT)
    R, g, keep = scorer.score_keep(x, need_grad=True)
    assert keep.tolist() == [True, False, True] and R[1] == 0 and g[1].abs().max() == 0
    torch.testing.assert_close(R[[0, 2]], x[[0, 2]].flatten(1).mean(1))
    torch.testing.assert_close(g[0], torch.full_like(x[0], 1 / 48))
    with pytest.raises(RewardError, match="'brightness'.*every sample"):
        build_scorer({"name": "brightness", "on_nonfinite": "drop"}, IDENT).score(torch.full_like(x, math.nan))


# ------------------------------------------------------------------------------------------ config


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^reward.name: unknown reward 'nope'.*brightness"):
        build_reward({"name": "nope"})
    with pytest.raises(ConfigError, match=r"^reward.name: required"):
        build_reward({"quality": 3})
    with pytest.raises(ConfigError, match=r"^reward.quality: expected int, got 'high'"):
        build_reward({"name": "jpeg_compressibility", "quality": "high"})
    with pytest.raises(ConfigError, match=r"^reward.qualty: unknown parameter of reward 'jpeg_compressibility'.*\['quality'\]"):
        build_reward({"name": "jpeg_compressibility", "qualty": 50})
    with pytest.raises(ConfigError, match=r"^reward.x: unknown parameter of reward 'brightness'; it takes \[\]"):
        build_reward({"name": "brightness", "x": 1})
    with pytest.raises(ConfigError, match=r"^reward.params: unknown parameter.*parameters go beside the name"):
        build_reward({"name": "jpeg_compressibility", "params": {"quality": 5}})  # the old nested shape
    with pytest.raises(ConfigError, match=r"^reward.parts\[1\].qualty: unknown parameter of reward 'jpeg_compressibility'"):
        build_reward({"name": "weighted_sum", "parts": [{"name": "brightness"}, {"name": "jpeg_compressibility", "qualty": 5}]})
    with pytest.raises(ConfigError, match=r"^reward.parts\[0\].name: unknown reward 'brightnes'"):
        build_reward({"name": "weighted_sum", "parts": [{"name": "brightnes"}]})
    with pytest.raises(ConfigError, match=r"^reward.clip: required parameter of reward 'aesthetic' is missing"):
        build_reward({"name": "aesthetic", "head": "x.pth"})
    with pytest.raises(ConfigError, match=r"^reward.on_nonfinite"):
        build_reward({"name": "brightness", "on_nonfinite": "ignore"})
    r = build_reward({"name": "jpeg_incompressibility", "quality": 80})
    assert r.quality == 80 and r.name == "jpeg_incompressibility"


# ------------------------------------------------------------------------------------------ aesthetic


@pytest.fixture(scope="module")
def tiny_aesthetic(tmp_path_factory):
    """A random tiny CLIP vision model (projection_dim 16) saved with save_pretrained, and random heads."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("aesthetic")
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=4, projection_dim=16)
    # the save_pretrained layout (config.json + model.safetensors), written directly: model.save_pretrained
    # would import deepspeed here (~6 s on this machine) for nothing
    from safetensors.torch import save_file

    cfg.save_pretrained(root / "clip")
    save_file(CLIPVisionModelWithProjection(cfg).state_dict(), str(root / "clip" / "model.safetensors"),
              metadata={"format": "pt"})
    head = AestheticHead(16)
    torch.save(head.state_dict(), root / "head.pth")
    save_file(head.state_dict(), str(root / "head.safetensors"))
    torch.save(AestheticHead(24).state_dict(), root / "head24.pth")
    return root


def _check_aesthetic(r, x):
    assert r.differentiable and not any(p.requires_grad for p in r.parameters())
    R1, g = RewardScorer(r, IDENT).score(x, need_grad=True)
    R2, _ = RewardScorer(r, IDENT).score(x)
    assert R1.shape == (x.shape[0],) and torch.isfinite(R1).all()
    torch.testing.assert_close(R1, R2, rtol=0, atol=0)  # deterministic: dropout stays off
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    return R1


def test_aesthetic_local(tiny_aesthetic):
    root = tiny_aesthetic
    r = REWARDS.build("aesthetic", clip=str(root / "clip"), head=str(root / "head.pth"))
    assert sorted(r.head.state_dict())[0] == "layers.0.bias" and "layers.7.weight" in r.head.state_dict()
    x = _rand(3, 3, 48, 40)
    R = _check_aesthetic(r, x)
    r.train()  # a parent switching to train mode must not turn dropout on
    torch.testing.assert_close(RewardScorer(r, IDENT).score(x)[0], R, rtol=0, atol=0)
    # safetensors head gives the same scores; grey images are scored like their RGB copy
    r2 = REWARDS.build("aesthetic", clip=str(root / "clip"), head=str(root / "head.safetensors"))
    torch.testing.assert_close(r2(x), R)
    grey = _rand(2, 1, 32, 32)
    torch.testing.assert_close(r(grey), r(grey.expand(-1, 3, -1, -1)))
    _check_aesthetic(r, grey)
    # per-frame on video
    v = _rand(2, 3, 3, 32, 32)
    torch.testing.assert_close(RewardScorer(r, IDENT).score(v)[0],
                               torch.stack([r(v[:, :, f]) for f in range(3)], 1).mean(1))


def test_aesthetic_errors_name_the_file(tiny_aesthetic, tmp_path):
    root = tiny_aesthetic
    clip = str(root / "clip")
    with pytest.raises(ConfigError, match="head24.pth.*24-dim.*projection_dim 16"):
        REWARDS.build("aesthetic", clip=clip, head=str(root / "head24.pth"))
    with pytest.raises(ConfigError, match="missing-head.pth"):
        REWARDS.build("aesthetic", clip=clip, head=str(tmp_path / "missing-head.pth"))
    with pytest.raises(ConfigError, match="no-clip-here"):
        REWARDS.build("aesthetic", clip=str(tmp_path / "no-clip-here"), head=str(root / "head.pth"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty.*config.json"):
        REWARDS.build("aesthetic", clip=str(tmp_path / "empty"), head=str(root / "head.pth"))
    torch.save({"w": torch.zeros(3)}, tmp_path / "odd.pth")
    with pytest.raises(ConfigError, match="odd.pth.*layers.0.weight"):
        REWARDS.build("aesthetic", clip=clip, head=str(tmp_path / "odd.pth"))


def test_aesthetic_s3_round_trip(tiny_aesthetic, s3_server):
    import boto3

    root = tiny_aesthetic
    storage.put(root / "clip", f"{s3_server}/rewards/clip")
    boto3.client("s3").upload_file(str(root / "head.pth"), "rlr-test", "rewards/heads/head.pth")
    x = _rand(2, 3, 32, 32)
    local = REWARDS.build("aesthetic", clip=str(root / "clip"), head=str(root / "head.pth"))
    remote = build_reward({"name": "aesthetic", "clip": f"{s3_server}/rewards/clip",
                           "head": f"{s3_server}/rewards/heads/head.pth"})
    torch.testing.assert_close(_check_aesthetic(remote, x), local(x))
    with pytest.raises(ConfigError, match="rewards/heads/nope.pth"):
        REWARDS.build("aesthetic", clip=f"{s3_server}/rewards/clip", head=f"{s3_server}/rewards/heads/nope.pth")
    # inside a weighted sum (trained as part of a bigger module) it stays frozen and deterministic
    ws = REWARDS.build("weighted_sum", parts=[{"name": "aesthetic", "weight": 2.0, "clip": f"{s3_server}/rewards/clip",
                                               "head": f"{s3_server}/rewards/heads/head.pth"}])
    ws.train()
    torch.testing.assert_close(ws(x), 2 * local(x))
    assert math.isfinite(float(ws(x).sum()))
