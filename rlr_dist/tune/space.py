"""The sweep file: search space over dotted training-config keys, search, scheduler, metric.

Every key of ``space`` is a dotted key of the training config (``estimator.h``, ``optim.lr``) or a whole
section (``regulariser``); its value is one search form::

    estimator.h: {grid: [1, 2, 4]}                      # crossed with the other grid keys
    optim.lr: {choice: [1.0e-5, 3.0e-5]}                # sampled
    regulariser.beta: {loguniform: [1.0e-3, 1.0e-1]}    # also uniform: [low, high], randint: [low, high)
    regulariser: {choice: [{name: none}, {name: kl_exact, beta: 0.01}]}

Everything is checked before Ray starts: each key is resolved with :func:`load_config` at every value of a
grid / choice and at both ends of a range, and all keys together at their first values.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlr_dist.config import ConfigError, build, check, load_yaml
from rlr_dist.train.config import TrainConfig, load_config

FORMS = ("grid", "choice", "uniform", "loguniform", "randint")
NUMERIC = (int, float)
# what every trial reports to Tune (diversity and memory: local runner; eval/reward: pipeline runner)
# what every trial reports; ``eval/<name>`` numbers of the configured evaluation reward come on top
METRICS = ("eval/heldout", "eval/reward", "eval/pairwise_l2", "kl/sampled", "reward/mean", "time/trial",
           "memory/peak_rss_mb", "memory/peak_activation_mb")


@dataclass
class SchedulerConfig:
    """asha: stop trials whose metric trails at iterations grace_period × reduction_factor^k (up to max_t,
    default the config's train.iterations). pbt: every perturbation_interval iterations the bottom
    quantile_fraction of trials copy a top trial's checkpoint and perturb its numeric keys. fifo: none."""

    name: Literal["fifo", "asha", "pbt"] = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    max_t: int | None = None
    perturbation_interval: int = 2
    quantile_fraction: float = 0.25

    def __post_init__(self) -> None:
        check(self.grace_period >= 1, "sweep.scheduler.grace_period", f"must be >= 1, got {self.grace_period}")
        check(self.reduction_factor >= 2, "sweep.scheduler.reduction_factor",
              f"must be >= 2, got {self.reduction_factor}")
        check(self.max_t is None or self.max_t >= self.grace_period, "sweep.scheduler.max_t",
              f"must be >= grace_period ({self.grace_period}), got {self.max_t}")
        check(self.perturbation_interval >= 1, "sweep.scheduler.perturbation_interval",
              f"must be >= 1, got {self.perturbation_interval}")
        check(0 < self.quantile_fraction <= 0.5, "sweep.scheduler.quantile_fraction",
              f"must be in (0, 0.5], got {self.quantile_fraction}")


@dataclass
class SweepConfig:
    """trial_runner: ``local`` (one process per trial, the single-process loop) or ``pipeline`` (each
    trial a full ``rlr-dist train`` on Ray: actor pools and DeepSpeed learners nested in the trial).
    search: ``basic`` (grid forms crossed, the others sampled ``num_samples`` times) or ``optuna``
    (model-based; needs optuna installed). output_dir: default ``<config's output_dir>-tune``."""

    space: dict[str, Any]
    metric: str = "eval/heldout"
    mode: Literal["max", "min"] = "max"
    search: Literal["basic", "optuna"] = "basic"
    num_samples: int = 1
    seed: int = 0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trial_runner: Literal["local", "pipeline"] = "local"
    cpus_per_trial: float = 1.0
    max_concurrent: int = 0
    checkpoint_every: int = 1
    num_cpus: int | None = None
    output_dir: str | None = None

    def __post_init__(self) -> None:
        check(len(self.space) > 0, "sweep.space", "must name at least one config key")
        check(self.num_samples >= 1, "sweep.num_samples", f"must be >= 1, got {self.num_samples}")
        check(self.cpus_per_trial > 0, "sweep.cpus_per_trial", f"must be > 0, got {self.cpus_per_trial}")
        check(self.max_concurrent >= 0, "sweep.max_concurrent", f"must be >= 0 (0 = as CPUs allow), got {self.max_concurrent}")
        check(self.checkpoint_every >= 1, "sweep.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")

    def n_trials(self) -> int:
        return self.num_samples * math.prod(len(v["grid"]) for v in self.space.values() if "grid" in v)


def _check_form(key: str, spec: Any) -> tuple[str, Any]:
    where = f"sweep.space.{key}"
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in FORMS):
        raise ConfigError(f"{where}: expected one search form {{grid|choice: [values]}} or "
                          f"{{uniform|loguniform|randint: [low, high]}}, got {spec!r}")
    form, arg = next(iter(spec.items()))
    if form in ("grid", "choice"):
        check(isinstance(arg, list) and len(arg) > 0, where, f"{form} needs a non-empty list, got {arg!r}")
        return form, arg
    check(isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, NUMERIC) and not isinstance(v, bool)
                                                          for v in arg),
          where, f"{form} needs [low, high] numbers, got {arg!r}")
    low, high = arg
    check(low < high, where, f"{form} low must be < high, got [{low}, {high}]")
    if form == "loguniform":
        check(low > 0, where, f"loguniform low must be > 0, got {low}")
    if form == "randint":
        check(all(isinstance(v, int) for v in arg), where, f"randint needs integers, got {arg!r}")
        return form, [low, high - 1]  # randint's high is exclusive
    return form, arg


def point_overrides(point: dict[str, Any]) -> list[str]:
    """Dotted overrides of a point of the space (whole sections first, so their keys can be set after)."""
    return [f"--{k}={json.dumps(point[k])}" for k in sorted(point, key=lambda k: k.count("."))]


def _resolve(config: str, overrides: list[str], point: dict, where: str) -> TrainConfig:
    try:
        return load_config(config, overrides + point_overrides(point))
    except ConfigError as e:
        msg = str(e)
        key = where.removeprefix("sweep.space.")
        raise ConfigError(f"{where}: {msg.removeprefix(key + ': ')}") from None


def load_sweep(config: str | Path, sweep_path: str | Path, overrides: list[str]) -> tuple[SweepConfig, TrainConfig]:
    """The validated sweep and the resolved base training config; errors name the sweep key."""
    config = str(config)
    base = load_config(config, overrides)
    sweep = build(SweepConfig, load_yaml(sweep_path), "sweep")
    values = {}
    for key, spec in sweep.space.items():
        form, vals = _check_form(key, spec)
        check(not (sweep.search == "optuna" and form == "grid"), f"sweep.space.{key}",
              "optuna search takes no grid (use choice)")
        for v in vals:
            _resolve(config, overrides, {key: v}, f"sweep.space.{key}")
        values[key] = vals[0]
    _resolve(config, overrides, values, "sweep.space (all keys at their first values)")
    s = sweep.scheduler
    if s.name == "pbt":
        check(sweep.trial_runner == "local", "sweep.scheduler.name", "pbt needs trial_runner: local "
              "(it restores trials from their checkpoints)")
        check(bool(mutations(sweep)), "sweep.scheduler.name", "pbt needs a numeric key in space to perturb")
    if sweep.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("sweep.search: optuna is not installed (pip install optuna, or search: basic)") from None
    extra = [] if base.eval_reward is None else [f"eval/{n}" for n in base.eval_reward.cls.eval_metric_names()]
    check(sweep.metric in METRICS + tuple(extra), "sweep.metric",
          f"{sweep.metric!r} is not reported; one of {list(METRICS) + extra}")
    return sweep, base


def tune_space(sweep: SweepConfig) -> dict[str, Any]:
    """Ray Tune's param_space of the sweep."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    return {k: make[f](a) for k, spec in sweep.space.items() for f, a in spec.items()}


def mutations(sweep: SweepConfig) -> dict[str, Any]:
    """PBT's hyperparam_mutations: the numeric keys (ranges, and grids / choices of numbers)."""
    space = tune_space(sweep)
    out = {}
    for key, spec in sweep.space.items():
        (form, arg), = spec.items()
        if form in ("grid", "choice"):
            if all(isinstance(v, NUMERIC) and not isinstance(v, bool) for v in arg):
                out[key] = list(arg)
        else:
            out[key] = space[key]
    return out
