"""Video rewards: a per-frame reward with frame subsampling and aggregation, and temporal consistency."""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from rlr_dist.rewards.base import (REWARDS, Reward, RewardError, apply_reward, check_param, frames_to_batch,
                                   repeat_prompts, reward_from_spec)


def temporal_consistency(video: Tensor) -> Tensor:
    """``−`` mean squared difference of consecutive frames of ``(B, C, F, H, W)`` -> ``(B,)``; 0 for F = 1."""
    if video.shape[2] < 2:
        return video.new_zeros(video.shape[0])
    d = video[:, :, 1:] - video[:, :, :-1]
    return -d.pow(2).flatten(1).mean(dim=1)


@REWARDS.register("temporal_consistency")
class TemporalConsistency(Reward):
    """``−`` mean over channels, pixels and frame pairs of ``(x_{f+1} − x_f)²``: 0 for a static clip."""

    differentiable = True
    modality = "video"

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        return temporal_consistency(images)


def frame_indices(num: int, num_frames: int | None, frame_stride: int | None) -> list[int]:
    """Frames to score out of ``num``: ``num_frames`` evenly spaced (first and last included; all frames
    when ``num_frames >= num``), every ``frame_stride``-th from the first, or all."""
    if num_frames is not None:
        if num_frames >= num:
            return list(range(num))
        if num_frames == 1:
            return [0]
        return [round(i * (num - 1) / (num_frames - 1)) for i in range(num_frames)]
    if frame_stride is not None:
        return list(range(0, num, frame_stride))
    return list(range(num))


@REWARDS.register("video_frames")
class VideoFrames(Reward):
    """An image reward applied to (a subset of) the frames of a video, aggregated over frames, plus
    ``temporal_weight ×`` :func:`temporal_consistency` of the whole clip.

    reward: nested spec ``{"name": ..., "params": {...}}`` of an ``image`` (or ``any``) reward.
    num_frames / frame_stride: subsample frames (at most one of the two); default all frames.
    aggregate: ``mean`` or ``min`` over the scored frames (``min`` differentiates the worst frame).
    """

    modality = "video"

    def __init__(self, reward: dict, num_frames: int | None = None, frame_stride: int | None = None,
                 aggregate: Literal["mean", "min"] = "mean", temporal_weight: float = 0.0):
        super().__init__()
        name = self.name
        self.frame_reward, _ = reward_from_spec(reward, name, "reward")
        check_param(name, "reward", self.frame_reward.modality != "video",
                    f"{self.frame_reward.name!r} scores whole videos; video_frames needs a per-frame (image) reward")
        check_param(name, "num_frames", num_frames is None or (isinstance(num_frames, int) and num_frames >= 1),
                    f"must be an int >= 1, got {num_frames!r}")
        check_param(name, "frame_stride", frame_stride is None or (isinstance(frame_stride, int) and frame_stride >= 1),
                    f"must be an int >= 1, got {frame_stride!r}")
        check_param(name, "frame_stride", num_frames is None or frame_stride is None,
                    "give num_frames or frame_stride, not both")
        check_param(name, "aggregate", aggregate in ("mean", "min"), f"must be 'mean' or 'min', got {aggregate!r}")
        check_param(name, "temporal_weight", isinstance(temporal_weight, (int, float)) and not isinstance(temporal_weight, bool),
                    f"expected a number, got {temporal_weight!r}")
        self.num_frames, self.frame_stride, self.aggregate = num_frames, frame_stride, aggregate
        self.temporal_weight = float(temporal_weight)
        self.differentiable = self.frame_reward.differentiable

    def frames(self, num: int) -> list[int] | None:
        return None if self.temporal_weight != 0.0 else frame_indices(num, self.num_frames, self.frame_stride)

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        if images.dim() != 5:
            raise RewardError(f"reward {self.name!r} expects video (B, C, F, H, W), got shape {tuple(images.shape)}")
        B, F = images.shape[0], images.shape[2]
        idx = frame_indices(F, self.num_frames, self.frame_stride)
        frames = images[:, :, idx]
        n = len(idx)
        where = f"{self.name}/{self.frame_reward.name}"
        per_frame = apply_reward(self.frame_reward, frames_to_batch(frames), repeat_prompts(prompts, n), name=where)
        per_frame = per_frame.view(B, n)
        R = per_frame.mean(dim=1) if self.aggregate == "mean" else per_frame.min(dim=1).values
        if self.temporal_weight != 0.0:
            R = R + self.temporal_weight * temporal_consistency(images)
        return R
