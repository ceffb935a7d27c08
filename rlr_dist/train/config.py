"""The training config: one YAML, one dataclass per component, dotted command-line overrides.

Registered components (``estimator``, ``regulariser``, ``reward``, ``eval_reward``) are written flat,
``{name: rlr, h: 2}``, so ``--estimator.h=4`` works; their parameters are checked against the class when
the config is read, and errors name the field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlr_dist.config import Component, ConfigError, apply_overrides, build, check, load_yaml, resolve_path, to_dict
from rlr_dist.models.config import ModelConfig
from rlr_dist.rewards.config import RewardSpec


class EstimatorSpec(Component):
    """``estimator: {name: rlr, h: 2, ...}`` (``--estimator.h=4`` on the command line)."""

    @classmethod
    def registry(cls):
        from rlr_dist.estimators import ESTIMATORS

        return ESTIMATORS


class RegulariserSpec(Component):
    """``regulariser: {name: kl_exact, beta: 0.01}``."""

    @classmethod
    def registry(cls):
        from rlr_dist.regularisers import REGULARISERS

        return REGULARISERS


@dataclass
class DataConfig:
    """Prompts to train on: a list, or a text file with one prompt per line. Each iteration draws
    ``prompts_per_iteration`` of them and samples ``samples_per_prompt`` trajectories of each."""

    prompts: list[str] = field(default_factory=lambda: ["three"])
    prompt_file: str | None = None
    eval_prompts: list[str] | None = None

    def load_prompts(self) -> list[str]:
        if self.prompt_file is None:
            return list(self.prompts)
        p = Path(self.prompt_file)
        check(p.is_file(), "data.prompt_file", f"{self.prompt_file!r} does not exist")
        lines = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        check(bool(lines), "data.prompt_file", f"{self.prompt_file!r} holds no prompts")
        return lines

    def __post_init__(self) -> None:
        check(self.prompt_file is not None or len(self.prompts) > 0, "data.prompts", "give at least one prompt")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", f"need two values in [0, 1), got {self.betas}")
        check(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", f"must be > 0 or null, got {self.grad_clip}")


@dataclass
class LoopConfig:
    """iterations: optimiser steps; each uses prompts_per_iteration × samples_per_prompt trajectories.
    overlap: sample iteration i+1 while the learners step on i (one-step-stale samples; see docs)."""

    iterations: int = 20
    prompts_per_iteration: int = 2
    samples_per_prompt: int = 8
    seed: int = 0
    eval_every: int = 5
    eval_samples: int = 32
    overlap: bool = False
    advantage_baseline: Literal["loo", "running", "none"] = "loo"
    advantage_scale: Literal["none", "running_std", "batch_std"] = "batch_std"

    def __post_init__(self) -> None:
        for name in ("iterations", "prompts_per_iteration", "samples_per_prompt", "eval_samples"):
            check(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 = never), got {self.eval_every}")

    @property
    def batch_size(self) -> int:
        return self.prompts_per_iteration * self.samples_per_prompt


@dataclass
class RoleResources:
    """One role's actors: how many, what each takes (``resources``: custom Ray resources, e.g. a node type's
    label ``{sampler_node: 1}``), and how often Ray restarts one that dies."""

    count: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_restarts: int = 2
    resources: dict[str, float] = field(default_factory=dict)

    def check(self, role: str) -> None:
        check(self.count >= 1, f"cluster.{role}.count", f"must be >= 1, got {self.count}")
        check(self.num_cpus >= 0, f"cluster.{role}.num_cpus", f"must be >= 0, got {self.num_cpus}")
        check(self.num_gpus >= 0, f"cluster.{role}.num_gpus", f"must be >= 0, got {self.num_gpus}")
        for k, v in self.resources.items():
            check(v >= 0, f"cluster.{role}.resources.{k}", f"must be >= 0, got {v}")


@dataclass
class ClusterConfig:
    """Ray placement. ``address``: ``None`` starts a local cluster of the run's own (also beside a running
    ``ray start`` one), ``auto`` joins the one this machine
    belongs to (``ray job submit`` sets it), or ``ray://host:port``. Before any actor is created the run's
    bundles are checked against the cluster's nodes: a run that cannot fit fails at once naming what is
    missing, unless ``autoscale_timeout_s`` > 0 (an autoscaling cluster: the autoscaler is asked, and awaited)."""

    address: str | None = None
    num_cpus: int | None = None
    autoscale_timeout_s: float = 0.0   # > 0: a run that does not fit asks the autoscaler and waits this long
    wait_for_free_s: float = 120.0     # a run that fits but finds its resources taken waits this long
    samplers: RoleResources = field(default_factory=lambda: RoleResources(count=2))
    rewards: RoleResources = field(default_factory=RoleResources)
    learners: RoleResources = field(default_factory=lambda: RoleResources(count=2))

    def __post_init__(self) -> None:
        for role in ("samplers", "rewards", "learners"):
            getattr(self, role).check(role)
        check(self.autoscale_timeout_s >= 0, "cluster.autoscale_timeout_s", f"must be >= 0, got {self.autoscale_timeout_s}")
        check(self.wait_for_free_s >= 0, "cluster.wait_for_free_s", f"must be >= 0, got {self.wait_for_free_s}")


@dataclass
class DeepSpeedConfig:
    """The parts of a DeepSpeed config users choose; ``extra`` is merged in verbatim."""

    zero_stage: int = 0
    bf16: bool = False
    offload_optimizer: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0-3, got {self.zero_stage}")
        check(not self.offload_optimizer or self.zero_stage >= 1, "deepspeed.offload_optimizer",
              "needs zero_stage >= 1")


@dataclass
class TrackingConfig:
    """MLflow. ``uri`` defaults to ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<output_dir>/mlflow.db``."""

    uri: str | None = None
    experiment: str = "rlr-dist"
    run_name: str | None = None


@dataclass
class CheckpointConfig:
    """``dir``: local path or ``s3://bucket/prefix`` (default ``<output_dir>/checkpoints``). ``on_corrupt``: a
    checkpoint whose files do not match its manifest is never loaded; ``fallback`` resumes from the newest
    older one of the run that verifies (saying which), ``fail`` stops."""

    dir: str | None = None
    every: int = 10
    keep: int = 2
    on_corrupt: Literal["fallback", "fail"] = "fallback"

    def __post_init__(self) -> None:
        check(self.every >= 0, "checkpoint.every", f"must be >= 0 (0 = only at the end), got {self.every}")
        check(self.keep >= 1, "checkpoint.keep", f"must be >= 1, got {self.keep}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    estimator: EstimatorSpec = field(default_factory=lambda: EstimatorSpec("rlr", {"h": 2}, "estimator"))
    regulariser: RegulariserSpec = field(default_factory=lambda: RegulariserSpec("kl_exact", {"beta": 0.01}, "regulariser"))
    reward: RewardSpec = field(default_factory=lambda: RewardSpec("digit_logprob", {"target": 3}, "reward"))
    eval_reward: RewardSpec | None = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: str = "runs/default"
    export: str | None = None

    def __post_init__(self) -> None:
        check(not (self.deepspeed.zero_stage == 3 and self.model.finetune == "lora"), "deepspeed.zero_stage",
              "ZeRO-3 with LoRA is not supported yet (DeepSpeed leaves peft's adapter tensors unpartitioned); "
              "use zero_stage <= 2 with LoRA (its state is small), or finetune: full")
        est = self.make_estimator()
        reg = self.make_regulariser()
        check(est.takes_regulariser or not reg.active, "regulariser.name",
              f"estimator {self.estimator.name!r} takes no regulariser, got {self.regulariser.name!r} "
              "(use regulariser: {name: none})")
        check(not est.needs_reward_grad or self.reward.differentiable(), "reward.name",
              f"{self.reward.name!r} is not differentiable (a black-box reward), but estimator "
              f"{self.estimator.name!r} needs ∂R/∂x_0: {est.reward_grad_reason()}. Use an estimator that needs "
              "reward values only (lr, or rlr with fo: false) or a differentiable reward")

    def resolved(self, base: str | Path) -> "TrainConfig":
        """A copy with every relative local path made absolute against ``base`` (the directory the run is
        started from): outputs (``output_dir``, ``export``, ``checkpoint.dir``) always, inputs
        (``model.path``, ``data.prompt_file``, a sqlite ``tracking.uri``, reward parameters that are paths)
        when they exist there. Actors and Ray Train workers run in other directories and see these."""
        import copy

        base = Path(base).resolve()
        c = copy.deepcopy(self)
        c.output_dir = resolve_path(c.output_dir, base, output=True)
        c.export = resolve_path(c.export, base, output=True)
        c.checkpoint.dir = resolve_path(c.checkpoint.dir, base, output=True)
        c.model.path = resolve_path(c.model.path, base)
        c.data.prompt_file = resolve_path(c.data.prompt_file, base)
        uri = c.tracking.uri
        if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            c.tracking.uri = "sqlite:///" + resolve_path(uri[len("sqlite:///"):], base, output=True)
        c.reward = c.reward.resolved(base)
        c.eval_reward = None if c.eval_reward is None else c.eval_reward.resolved(base)
        return c

    def windows(self, schedule) -> list:
        """The stochastic windows the run can sample with (``[None]``: the schedule as configured)."""
        m = self.model
        if m.sampler != "flow" or not m.flow.window.varies:
            return [None]
        return m.flow.window.windows(schedule.T)

    def check_schedule(self, schedule) -> dict:
        """The estimator's demands on the sampler's chain (e.g. σ_k > 0 for likelihood-ratio steps), for every
        window a flow run can draw, as a config error naming the estimator. Returns the run's coverage
        statement (:meth:`coverage`)."""
        est = self.make_estimator()
        fixed: set[int] = set()
        for w in self.windows(schedule):
            try:
                est.check(schedule if w is None else schedule.with_window(w))
            except ValueError as e:
                msg = str(e).removeprefix("estimator: ")
                m = self.model
                where = (f"model: {m.sampler}, eta {m.eta}, last_step_eta {m.last_step_eta}, "
                         f"{m.num_inference_steps} steps" if m.sampler != "flow" else
                         f"model: flow {m.flow.transition}, eta {m.eta}, {m.num_inference_steps} steps, window "
                         f"{m.flow.window.kind}" + ("" if w is None else f" {sorted(w)}"))
                raise ConfigError(f"estimator: {msg} ({where})") from None
            fixed |= set(est.describe().get("fixed_steps") or ())
        return self.coverage(schedule, sorted(fixed), est)

    def coverage(self, schedule, fixed: list[int], est=None) -> dict:
        """What the estimator covers on this chain, for the run's logged params and tags: the steps no term
        covers (``fixed_steps``, over every window the run can draw) and a one-line bias statement."""
        est = est or self.make_estimator()
        stoch = [k for k in range(1, schedule.T + 1) if schedule.stochastic(k)]
        if est.describe().get("bias"):  # an estimator biased by design says how
            bias = est.describe()["bias"]
        elif "fixed_steps" not in est.describe():
            bias = f"not stated: estimator {self.estimator.name!r} reports no fixed steps"
        elif fixed:
            bias = (f"biased: steps {fixed} are fixed (no term covers them; their gradient is dropped). Use "
                    "deterministic: absorb, or an estimator that back-propagates them, for an unbiased gradient")
        else:
            bias = "none: every step is covered (likelihood ratio on stochastic steps, pathwise elsewhere)"
        return {"fixed_steps": fixed, "bias": bias, "stochastic_steps": stoch,
                "deterministic": est.describe().get("deterministic", "-"), "windows": len(self.windows(schedule))}

    def make_estimator(self):
        return self.estimator.build()

    def make_regulariser(self):
        return self.regulariser.build()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The resolved :class:`TrainConfig` of a YAML file plus ``--dotted.key=value`` overrides."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return build(TrainConfig, data)


def dump(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
