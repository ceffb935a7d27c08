"""The reward section of a config: a registered reward written flat, plus what to do with NaN/inf."""
from __future__ import annotations

from typing import Any, Literal

from rlr_dist.config import Component
from rlr_dist.rewards.base import REWARDS, Decoder, RewardScorer


class RewardSpec(Component):
    """``{name: <registered reward or module:Class>, <its parameters>, on_nonfinite: fail|drop}``.

    on_nonfinite: ``fail`` raises on a NaN/inf reward; ``drop`` drops those samples from the batch.
    """

    reserved = {"on_nonfinite": (Literal["fail", "drop"], "fail")}

    @classmethod
    def registry(cls):
        return REWARDS

    @property
    def cls(self):
        return REWARDS.get(self.name, self.where)

    def differentiable(self) -> bool:
        return self.cls.is_differentiable(self.params)


def build_scorer(spec: RewardSpec | dict[str, Any], decoder: Decoder | None = None, where: str = "reward") -> RewardScorer:
    """A :class:`RewardScorer` for the configured reward and ``on_nonfinite`` policy."""
    spec = RewardSpec.parse(spec, where)
    return RewardScorer(spec.build(), decoder, on_nonfinite=spec.on_nonfinite)
