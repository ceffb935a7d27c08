"""The training config: YAML + dotted overrides, errors naming the field, and every shipped job config valid."""
from pathlib import Path

import pytest

from rlr_dist.cli import main
from rlr_dist.config import ConfigError
from rlr_dist.train.config import load_config

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))
DIGITS = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "digits.yaml"
NOT_TRAIN = {"study-digits", "study-blackbox", "study-flow", "study-video", "sweep-digits"}  # study and sweep files, tested in their own files
JOBS = [p for p in JOBS if p.stem not in NOT_TRAIN]


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_every_job_config_validates(path):
    cfg = load_config(path)
    assert cfg.train.iterations >= 1 and cfg.make_estimator() is not None


def test_overrides_and_show(capsys):
    cfg = load_config(DIGITS, ["--estimator.h=3", "--optim.lr=1e-4", "--cluster.samplers.count=3"])
    assert cfg.estimator.params["h"] == 3 and cfg.optim.lr == 1e-4 and cfg.cluster.samplers.count == 3
    assert main(["config", "show", str(DIGITS), "--estimator.h=4"]) == 0
    assert "h: 4" in capsys.readouterr().out


@pytest.mark.parametrize("override, field", [
    ("--estimator.hh=2", "estimator.hh"),
    ("--estimator.name=nope", "estimator.name"),
    ("--regulariser.beta=-1", "regulariser.beta"),
    ("--model.lora.rank=0", "model.lora.rank"),
    ("--train.iterations=0", "train.iterations"),
    ("--deepspeed.zero_stage=5", "deepspeed.zero_stage"),
    ("--model.finetune=lora --deepspeed.zero_stage=3", "deepspeed.zero_stage"),
    ("--reward.name=jpeg_compressibility", "reward.target"),  # jpeg takes no target
    ("--reward=name:_jpeg", "reward"),  # not a mapping
    ("--reward.target=11", "reward.target"),  # a value the reward refuses, before any weights load
    ("--estimator.h=two", "estimator.h"),
    ("--regulariser.beta=abc", "regulariser.beta"),
    ("--bogus=1", "bogus"),
])
def test_bad_values_name_the_field(override, field, capsys):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(DIGITS, override.split())
    assert main(["config", "show", str(DIGITS), *override.split()]) == 2
    assert field in capsys.readouterr().err


def test_a_black_box_reward_is_refused_for_an_estimator_that_needs_its_gradient():
    with pytest.raises(ConfigError, match="^reward.name: 'jpeg_compressibility' is not differentiable"):
        load_config(DIGITS, ["--reward={name: jpeg_compressibility}"])  # rlr's FO term needs ∂R/∂x_0
    assert load_config(DIGITS, ["--reward={name: jpeg_compressibility}", "--estimator.fo=false"]).reward.name \
        == "jpeg_compressibility"
