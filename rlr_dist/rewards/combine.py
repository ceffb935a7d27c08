"""Combinations of rewards."""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

from rlr_dist.rewards.base import REWARDS, Reward, apply_reward, check_param, reward_from_spec


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
    """``Σ_i w_i R_i`` of nested rewards ``parts: [{"name": ..., "weight": 1.0, "params": {...}}, ...]``.

    Differentiable iff every part is; a part returning NaN/inf or the wrong shape raises naming it
    (``weighted_sum.parts[i] (name)``).
    """

    def __init__(self, parts: list):
        super().__init__()
        name = self.name
        check_param(name, "parts", isinstance(parts, (list, tuple)) and len(parts) > 0,
                    f"expected a non-empty list of {{name, weight, params}}, got {parts!r}")
        rewards, weights = [], []
        for i, spec in enumerate(parts):
            r, extra = reward_from_spec(spec, name, f"parts[{i}]", {"weight": 1.0})
            w = extra["weight"]
            check_param(name, f"parts[{i}].weight", isinstance(w, (int, float)) and not isinstance(w, bool)
                        and math.isfinite(w), f"expected a finite number, got {w!r}")
            rewards.append(r)
            weights.append(float(w))
        self.parts = nn.ModuleList(rewards)
        self.weights = weights
        self.differentiable = all(r.differentiable for r in rewards)
        self.modality = combined_modality([r.modality for r in rewards])

    def part_name(self, i: int) -> str:
        return f"{self.name}.parts[{i}] ({self.parts[i].name})"

    def frames(self, num: int) -> list[int] | None:
        parts = [r.frames(num) for r in self.parts]
        return None if any(f is None for f in parts) else sorted(set().union(*parts))

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        total = None
        for i, (w, r) in enumerate(zip(self.weights, self.parts)):
            R = w * apply_reward(r, images, prompts, name=self.part_name(i))
            total = R if total is None else total + R
        return total
