"""Typed config of the reward: which registered reward, its parameters, and what to do with NaN/inf."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rlr_dist.config import ConfigError, build, check
from rlr_dist.rewards.base import REWARDS, Decoder, Reward, RewardParamError, RewardScorer, make_reward


@dataclass
class RewardConfig:
    """The reward to optimise.

    name: a registered reward (``jpeg_compressibility``, ``aesthetic``, ``weighted_sum``, ...).
    params: its constructor arguments; nested rewards are ``{name, params}`` mappings.
    on_nonfinite: ``fail`` raises on a NaN/inf reward; ``drop`` drops those samples from the batch.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    on_nonfinite: Literal["fail", "drop"] = "fail"

    def __post_init__(self) -> None:
        check(self.name in REWARDS, "reward.name", f"unknown reward {self.name!r}; choose one of {REWARDS.names()}")


def _config(cfg: RewardConfig | dict) -> RewardConfig:
    if isinstance(cfg, RewardConfig):
        return cfg
    check(not isinstance(cfg, dict) or "name" in cfg, "reward.name",
          f"required; choose one of {REWARDS.names()}")
    return build(RewardConfig, cfg, "reward")


def build_reward(cfg: RewardConfig | dict) -> Reward:
    """The :class:`Reward` a config names; bad parameters raise :class:`ConfigError` naming the reward
    and the field (``reward.params.parts[0].params.quality: ...``)."""
    cfg = _config(cfg)
    try:
        return make_reward(cfg.name, **cfg.params)
    except RewardParamError as e:
        raise ConfigError(f"reward.params.{e.field}: reward {e.reward!r}: {e.msg}") from None


def build_scorer(cfg: RewardConfig | dict, decoder: Decoder | None = None) -> RewardScorer:
    """A :class:`RewardScorer` for the configured reward and ``on_nonfinite`` policy."""
    cfg = _config(cfg)
    return RewardScorer(build_reward(cfg), decoder, on_nonfinite=cfg.on_nonfinite)
