"""Black-box (non-differentiable) rewards in the toy world: ``digit_hit`` (the training classifier's argmax is the
target) and ``jpeg_compressibility`` (−kB of the JPEG); estimators that need ∂R/∂x_0 refuse them when the config
is read, the black-box estimators (lr, rlr with fo: false) take them and train."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rlr_dist.toy_world.rewards as toy_rewards  # registers the toy rewards even where entry points are stale
from rlr_dist.cli import main
from rlr_dist.config import ConfigError
from rlr_dist.rewards import REWARDS, RewardError
from rlr_dist.rewards.base import RewardScorer, apply_reward
from rlr_dist.toy_world import asset_path
from rlr_dist.toy_world.classifiers import load_classifier
from rlr_dist.toy_world.data import digits_16, place
from rlr_dist.toy_world.report import to01
from rlr_dist.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "jobs" / "configs" / "digits.yaml"


@pytest.fixture(scope="module")
def digits():
    """Test-split sklearn digits in [0, 1] that the training classifier reads correctly, and their labels."""
    x, y = digits_16("test")
    x = to01(x)
    with torch.no_grad():
        pred = load_classifier(asset_path("classifier"))(x).argmax(1)
    ok = pred == y
    return x[ok], y[ok]


def _params(module: torch.nn.Module) -> set[int]:
    return {p.data_ptr() for p in module.parameters()} | {b.data_ptr() for b in module.buffers()}


# ---------------------------------------------------------------------------------------------- digit_hit
def test_digit_hit_is_one_for_the_target_class_and_zero_otherwise(digits):
    x, y = digits
    threes, sevens = x[y == 3][:8], x[y == 7][:8]
    assert len(threes) == 8 and len(sevens) == 8
    hit3 = REWARDS.build("digit_hit", target=3)
    assert not hit3.differentiable and hit3.modality == "image" and hit3.name == "digit_hit"
    R = apply_reward(hit3, torch.cat([threes, sevens]))
    assert R.shape == (16,) and R.dtype == torch.float32
    assert R.tolist() == [1.0] * 8 + [0.0] * 8
    assert apply_reward(REWARDS.build("digit_hit", target=7), torch.cat([threes, sevens])).tolist() == [0.0] * 8 + [1.0] * 8
    # every class: the reward is exactly "argmax of the training classifier == target"
    sample = torch.cat([x[y == c][:2] for c in range(10)])
    for t in (0, 5, 9):
        R = apply_reward(REWARDS.build("digit_hit", target=t), sample)
        assert R.tolist() == [float(c == t) for c in range(10) for _ in range(2)]


def test_digit_hit_uses_the_training_classifier_never_the_held_out_evaluator(monkeypatch):
    loaded = []
    real = toy_rewards._load
    monkeypatch.setattr(toy_rewards, "_load", lambda path, default: loaded.append(default) or real(path, default))
    hit = REWARDS.build("digit_hit", target=3)
    assert loaded == ["classifier"]
    ev = REWARDS.build("digit_evaluator_hit", target=3)
    assert loaded == ["classifier", "evaluator"]
    assert not _params(hit) & _params(ev)
    assert hit.classifier.info["arch"] == REWARDS.build("digit_logprob", target=3).classifier.info["arch"]
    assert hit.classifier.info["arch"] != ev.classifier.info["arch"]


def test_digit_hit_on_video_is_the_fraction_of_frames_read_as_the_target(digits):
    x, y = digits
    three, seven = x[y == 3][0], x[y == 7][0]
    # clip 0: four frames of a three then four of a seven, moving right; clip 1: a seven throughout
    frames0 = torch.stack([three] * 4 + [seven] * 4)                       # (8, 1, 16, 16)
    clip0 = place(frames0, torch.arange(8), background=0.0)                # (8, 1, 16, 24)
    clip1 = place(torch.stack([seven] * 8), torch.zeros(8, dtype=torch.long), background=0.0)
    video = torch.stack([clip0, clip1]).permute(0, 2, 1, 3, 4).contiguous()  # (2, 1, 8, 16, 24)
    hit = REWARDS.build("digit_hit", target=3)
    R = apply_reward(hit, video)
    assert R.shape == (2,) and R.dtype == torch.float32
    assert R.tolist() == [0.5, 0.0]
    assert hit(video).tolist() == [0.5, 0.0]  # called directly on 5-D input: the same per-frame mean
    # through a scorer (decoder [-1, 1] -> [0, 1]): values only; asking for ∂R/∂x_0 is refused, naming the reward
    scorer = RewardScorer(hit)
    R2, g = scorer.score(video * 2 - 1)
    assert g is None and R2.tolist() == [0.5, 0.0]
    with pytest.raises(RewardError, match="'digit_hit' is not differentiable"):
        scorer.score(video * 2 - 1, need_grad=True)


def test_digit_hit_bad_inputs_and_parameters_are_named():
    with pytest.raises(ConfigError, match="target: must be a digit 0..9"):
        REWARDS.build("digit_hit", target=10)
    with pytest.raises(ConfigError, match=r"^reward\.target: must be a digit"):
        load_config(DIGITS, ["--reward={name: digit_hit, target: 12}", "--estimator.fo=false"])
    hit = REWARDS.build("digit_hit", target=3)
    with pytest.raises(RewardError, match="1 or 3 channels; got 2"):
        apply_reward(hit, torch.zeros(2, 2, 16, 16))
    with pytest.raises(RewardError, match="at least 16 pixels wide"):
        apply_reward(hit, torch.zeros(2, 1, 16, 8))


# ------------------------------------------------------------------------------------- jpeg_compressibility
def _jpeg_kb(img: torch.Tensor, quality: int) -> float:
    """Independent reading: an (1, H, W) image in [0, 1] saved as a greyscale JPEG by PIL, in kB."""
    arr = (img[0].numpy() * 255).round().clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000.0


def test_jpeg_compressibility_on_toy_images(digits):
    x, _ = digits
    g = torch.Generator().manual_seed(0)
    blank = torch.zeros(1, 1, 16, 16)
    noise = torch.rand(1, 1, 16, 16, generator=g)
    batch = torch.cat([blank, x[:2], noise])
    r = REWARDS.build("jpeg_compressibility", quality=75)
    assert not r.differentiable and not REWARDS.get("jpeg_compressibility").is_differentiable({"quality": 75})
    R = apply_reward(r, batch)
    assert R.shape == (4,) and R.dtype == torch.float32 and (R < 0).all()
    expected = torch.tensor([-_jpeg_kb(im, 75) for im in batch])
    assert torch.equal(R, expected)
    # a constant image compresses smaller than a digit, a digit smaller than noise
    assert R[0] > R[1] and R[0] > R[2] and min(R[1], R[2]) > R[3]


def test_jpeg_compressibility_on_a_batch_of_clips_is_the_mean_over_frames(digits):
    x, _ = digits
    g = torch.Generator().manual_seed(1)
    still = place(x[:1].expand(8, -1, -1, -1), torch.zeros(8, dtype=torch.long), background=0.0)
    noisy = torch.rand(8, 1, 16, 24, generator=g)
    video = torch.stack([still, noisy]).permute(0, 2, 1, 3, 4).contiguous()  # (2, 1, 8, 16, 24)
    r = REWARDS.build("jpeg_compressibility", quality=90)
    R = apply_reward(r, video)
    assert R.shape == (2,) and R.dtype == torch.float32
    for b, clip in enumerate((still, noisy)):
        assert float(R[b]) == pytest.approx(-sum(_jpeg_kb(f, 90) for f in clip) / 8, rel=1e-6)
    assert R[0] > R[1]


# ------------------------------------------------------------------------------ refused before Ray starts
REFUSING = [
    ("{name: rlr, h: 2}", "rlr", r"estimator\.fo: true"),
    ("{name: full_bp}", "full_bp", "through every step"),
    ("{name: truncated_bp, K: 2}", "truncated_bp", r"estimator\.K: 2"),
    ("{name: truncated_bp, k_min: 1, k_max: 3}", "truncated_bp", r"estimator\.k_min: 1, estimator\.k_max: 3"),
]
BLACK_BOX = ["{name: digit_hit, target: 3}", "{name: jpeg_compressibility, quality: 80}",
             "{name: weighted_sum, parts: [{name: digit_logprob, target: 3}, {name: digit_hit, target: 3}]}"]


@pytest.mark.parametrize("reward", BLACK_BOX, ids=["digit_hit", "jpeg", "weighted_sum"])
@pytest.mark.parametrize("estimator, name, why", REFUSING, ids=["rlr_fo", "full_bp", "truncated_bp", "truncated_bp_random"])
def test_estimators_that_need_the_reward_gradient_refuse_a_black_box_reward(estimator, name, why, reward):
    rname = reward.split(",")[0].removeprefix("{name: ")
    with pytest.raises(ConfigError) as e:
        load_config(DIGITS, [f"--estimator={estimator}", f"--reward={reward}"])
    msg = str(e.value)
    assert msg.startswith(f"reward.name: '{rname}' is not differentiable")
    assert f"estimator '{name}' needs ∂R/∂x_0" in msg
    assert re.search(why, msg), msg


def test_the_refusal_comes_from_rlr_dist_train_before_ray(monkeypatch, capsys):
    from rlr_dist.pipeline import run

    monkeypatch.setattr(run, "init_ray", lambda cfg: pytest.fail("Ray was started"))
    assert main(["train", str(DIGITS), "--reward={name: digit_hit, target: 3}"]) == 2
    err = capsys.readouterr().err
    assert "config error: reward.name: 'digit_hit' is not differentiable" in err and "estimator.fo: true" in err


@pytest.mark.parametrize("estimator", ["{name: lr}", "{name: lr, clip_range: 0.2}", "{name: rlr, h: 2, fo: false}",
                                       "{name: rlr, h: 1, fo: false, zo: lr_sampled, K: 2}"])
@pytest.mark.parametrize("reward", BLACK_BOX[:2], ids=["digit_hit", "jpeg"])
def test_black_box_estimators_accept_a_black_box_reward(estimator, reward):
    cfg = load_config(DIGITS, [f"--estimator={estimator}", f"--reward={reward}"])
    assert not cfg.make_estimator().needs_reward_grad and not cfg.reward.differentiable()


def test_a_black_box_evaluation_reward_never_blocks_a_gradient_estimator():
    cfg = load_config(DIGITS, ["--eval_reward={name: digit_hit, target: 3}"])  # rlr with fo: true
    assert cfg.make_estimator().needs_reward_grad and cfg.eval_reward.name == "digit_hit"


def test_every_toy_world_reward_is_an_entry_point_of_the_package():
    """A fresh process finds a toy reward by name only through ``[project.entry-points."rlr_dist.rewards"]``."""
    import tomllib

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["rlr_dist.rewards"]
    toy = {n: c for n, c in REWARDS.items() if c.__module__ == toy_rewards.__name__}
    assert "digit_hit" in toy
    assert {n: f"{c.__module__}:{c.__name__}" for n, c in toy.items()} == {n: eps[n] for n in toy}


# ------------------------------------------------------------------------------------ one training step
@pytest.mark.parametrize("estimator, reward", [
    ("{name: lr, deterministic: skip}", "{name: digit_hit, target: 3}"),
    ("{name: rlr, h: 1, fo: false, deterministic: skip}", "{name: jpeg_compressibility, quality: 80}"),
], ids=["lr-digit_hit", "rlr_fo_false-jpeg"])
def test_one_single_process_step_trains_on_a_black_box_reward(tmp_path, estimator, reward):
    from rlr_dist.models import load_model
    from rlr_dist.train.local import train_local

    # the shipped DDIM's last step is deterministic (σ_1 = 0): a black-box estimator cannot cover it; 'skip'
    # leaves it fixed and the run says so (plan/fixed_steps)
    cfg = load_config(DIGITS, [f"--estimator={estimator}", f"--reward={reward}", "--model.num_inference_steps=8",
                               "--train.iterations=1", "--train.samples_per_prompt=16", "--train.eval_every=0",
                               f"--output_dir={tmp_path}", "--export=null"])
    before = {k: v.clone() for k, v in load_model(cfg.model).trained_state().items()}
    model, hist = train_local(cfg)
    (h,) = hist
    assert h["samples"] == 16 and h["plan/fixed_steps"] == 1
    if "digit_hit" in reward:  # a hit rate: a multiple of 1/16; seed 0 draws some threes and some not
        assert 0 < h["reward/mean"] < 1 and (h["reward/mean"] * 16) == pytest.approx(round(h["reward/mean"] * 16))
    else:
        assert h["reward/mean"] < 0
    assert h["reward/std"] > 0 and np.isfinite(h["loss/total"]) and h["grad_norm"] > 0
    after = model.trained_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
