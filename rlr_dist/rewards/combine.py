"""Combinations of rewards."""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

from rlr_dist.registry import check_param
from rlr_dist.rewards.base import REWARDS, Reward, apply_reward, nested_class, split_spec

PART = {"weight": 1.0}  # keys of a part that are not the part reward's parameters


def combined_modality(modalities: Sequence[str]) -> str:
    """``video`` if any part needs video; ``image`` if every part is per-image; otherwise ``any``.

    Each part is still called through :func:`apply_reward`, so an ``image`` part inside a ``video`` or
    ``any`` combination is applied frame by frame, exactly as it would be on its own.
    """
    if "video" in modalities:
        return "video"
    if all(m == "image" for m in modalities):
        return "image"
    return "any"


@REWARDS.register("weighted_sum")
class WeightedSum(Reward):
    """``Σ_i w_i R_i`` of nested rewards ``parts: [{name: ..., weight: 1.0, <its parameters>}, ...]``.

    Differentiable iff every part is; a part returning NaN/inf or the wrong shape raises naming it
    (``weighted_sum.parts[i] (name)``).
    """

    def __init__(self, parts: list):
        super().__init__()
        self.check_params(parts)
        rewards, weights = [], []
        for i, spec in enumerate(parts):
            name, params, extra = split_spec(spec, f"parts[{i}]", PART)
            rewards.append(REWARDS.build(name, params, f"parts[{i}]"))
            weights.append(float(extra["weight"]))
        self.parts = nn.ModuleList(rewards)
        self.weights = weights
        self.differentiable = all(r.differentiable for r in rewards)
        self.modality = combined_modality([r.modality for r in rewards])

    @classmethod
    def check_params(cls, parts: list) -> None:
        check_param("parts", isinstance(parts, (list, tuple)) and len(parts) > 0,
                    f"expected a non-empty list of {{name, weight, <parameters>}}, got {parts!r}")
        for i, spec in enumerate(parts):
            name, params, extra = split_spec(spec, f"parts[{i}]", PART)
            w = extra["weight"]
            check_param(f"parts[{i}].weight", isinstance(w, (int, float)) and not isinstance(w, bool)
                        and math.isfinite(w), f"expected a finite number, got {w!r}")
            REWARDS.check(name, params, f"parts[{i}]")

    @classmethod
    def _parts(cls, params: dict) -> list[tuple[type[Reward], dict]]:
        return [nested_class(spec, f"parts[{i}]", PART) for i, spec in enumerate(params.get("parts") or [])]

    @classmethod
    def is_differentiable(cls, params: dict) -> bool:
        return all(c.is_differentiable(p) for c, p in cls._parts(params))

    @classmethod
    def reads_frames(cls, params: dict, num: int) -> list[int] | None:
        return _union(c.reads_frames(p, num) for c, p in cls._parts(params))

    @classmethod
    def vision_tower(cls, params: dict) -> list[dict]:
        return [t for c, p in cls._parts(params) for t in c.vision_tower(p)]

    def part_name(self, i: int) -> str:
        return f"{self.name}.parts[{i}] ({self.parts[i].name})"

    def frames(self, num: int) -> list[int] | None:
        return _union(r.frames(num) for r in self.parts)

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        total = None
        for i, (w, r) in enumerate(zip(self.weights, self.parts)):
            R = w * apply_reward(r, images, prompts, name=self.part_name(i))
            total = R if total is None else total + R
        return total


def _union(frames) -> list[int] | None:
    """Frames read by several parts: ``None`` (all) if any part reads all."""
    frames = list(frames)
    return None if any(f is None for f in frames) else sorted(set().union(*frames))
