"""Video rewards that read time (rlr_dist/rewards/video.py, rlr_dist/toy_world/rewards.py): motion from the
centre of mass, identity consistency, and the held-out video evaluator — on real moving-digits clips."""
import pytest
import torch

from rlr_dist.config import ConfigError
from rlr_dist.rewards import REWARDS
from rlr_dist.rewards.video import centre_of_mass_x, frame_shifts
from rlr_dist.toy_world.data import moving_digits


@pytest.fixture(scope="module")
def clips():
    x, y, d = moving_digits("test", seed=0)
    return (x / 2 + 0.5), y, d


def test_motion_reward_reads_direction_and_flips_sign_when_played_backwards(clips):
    v, _, d = clips
    signed = REWARDS.build("motion", direction="right", speed=None)
    r, back = signed(v), signed(v.flip(2))
    torch.testing.assert_close(back, -r)
    assert r[d > 0].min() > 0.9 and r[d < 0].max() < -0.9  # the data move 1 px per frame
    speed = REWARDS.build("motion", direction="right")  # −mean (v_f − 1)²: 0 at the data's speed, −4 backwards
    assert speed(v[d > 0]).abs().max() < 1e-3 and speed(v[d < 0]).mean() < -3.5
    left = REWARDS.build("motion", direction="left")
    assert left(v[d < 0]).abs().max() < 1e-3
    g = v[:4].clone().requires_grad_(True)
    speed(g).sum().backward()
    assert g.grad.abs().sum() > 0  # differentiable
    with pytest.raises(ConfigError, match="direction"):
        REWARDS.build("motion", direction="up")
    with pytest.raises(ConfigError, match="speed"):
        REWARDS.build("motion", speed=-1.0)


def test_identity_consistency_is_zero_for_one_digit_and_negative_when_it_changes(clips):
    v, y, _ = clips
    ident = REWARDS.build("digit_identity")
    same = ident(v)
    other = v[torch.argsort(y)]  # another clip's frames in the second half
    swapped = torch.where(torch.arange(v.shape[2]).view(1, 1, -1, 1, 1) < 4, v, other)
    changed = (y != y[torch.argsort(y)])
    assert same.mean() > -0.1 and ident(swapped)[changed].mean() < same.mean() - 1.0
    g = v[:2].clone().requires_grad_(True)
    ident(g).sum().backward()
    assert g.grad.abs().sum() > 0


def test_held_out_video_evaluator_reads_digit_and_displacement_not_the_centre_of_mass(clips):
    v, y, d = clips
    shifts = frame_shifts(v)
    assert (shifts == d.view(-1, 1)).all()  # every data clip moves one pixel per frame its own way
    ev = REWARDS.build("video_evaluator_hit", target=3, direction="right")
    hit = ev(v)
    assert hit[(y == 3) & (d > 0)].mean() > 0.9 and hit[(y == 3) & (d < 0)].max() == 0
    assert hit[y != 3].mean() < 0.1
    m = ev.eval_metrics(v[y == 3])
    assert m["frac_digit_frames"] > 0.9 and abs(m["frac_direction"] - float((d[y == 3] > 0).float().mean())) < 1e-6
    # a static three whose right side brightens over time: the centre of mass (what the motion reward reads)
    # moves right, but nothing is displaced, so the held-out evaluator does not count it as moving
    still = v[(y == 3) & (d > 0)][:8, :, :1].expand(-1, -1, 8, -1, -1).clone()
    ramp = torch.linspace(0, 0.4, 8).view(1, 1, 8, 1, 1) * (torch.arange(24) >= 16).view(1, 1, 1, 1, 24)
    fake = (still + ramp).clamp(0, 1)
    assert REWARDS.build("motion", direction="right", speed=None)(fake).min() > 0
    assert ev(fake).max() == 0 and (frame_shifts(fake) == 0).all()
    assert centre_of_mass_x(fake).diff(dim=1).min() > 0


def test_held_out_video_evaluator_shares_no_weights_with_the_training_rewards():
    ev = REWARDS.build("video_evaluator_hit", target=3)
    train = [REWARDS.build("digit_logprob", target=3), REWARDS.build("digit_identity")]
    held = {p.data_ptr() for p in ev.parameters()} | {b.data_ptr() for b in ev.buffers()}
    assert held
    for r in train:
        assert not held & ({p.data_ptr() for p in r.parameters()} | {b.data_ptr() for b in r.buffers()})
        assert r.classifier.info["arch"] != ev.evaluator.info["arch"]
    assert not ev.differentiable and REWARDS.get("video_evaluator_hit").modality == "video"
