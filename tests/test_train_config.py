"""The training config: YAML + dotted overrides, errors naming the field, and every shipped job config valid."""
from pathlib import Path

import pytest

from rlr_dist.cli import main
from rlr_dist.config import ConfigError
from rlr_dist.train.config import load_config

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_every_job_config_validates(path):
    cfg = load_config(path)
    assert cfg.train.iterations >= 1 and cfg.make_estimator() is not None


def test_overrides_and_show(capsys):
    cfg = load_config(JOBS[0], ["--estimator.h=3", "--optim.lr=1e-4", "--cluster.samplers.count=3"])
    assert cfg.estimator["h"] == 3 and cfg.optim.lr == 1e-4 and cfg.cluster.samplers.count == 3
    assert main(["config", "show", str(JOBS[0]), "--estimator.h=4"]) == 0
    assert "h: 4" in capsys.readouterr().out


@pytest.mark.parametrize("override, field", [
    ("--estimator.hh=2", "estimator.hh"),
    ("--estimator.name=nope", "estimator.name"),
    ("--regulariser.beta=-1", "regulariser.beta"),
    ("--model.lora.rank=0", "model.lora.rank"),
    ("--train.iterations=0", "train.iterations"),
    ("--deepspeed.zero_stage=5", "deepspeed.zero_stage"),
    ("--deepspeed.zero_stage=3", "deepspeed.zero_stage"),  # with LoRA
    ("--reward.name=jpeg_compressibility", "reward.name"),  # rlr's FO term needs a differentiable reward
    ("--bogus=1", "bogus"),
])
def test_bad_values_name_the_field(override, field, capsys):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(JOBS[0], [override])
    assert main(["config", "show", str(JOBS[0]), override]) == 2
    assert field in capsys.readouterr().err
