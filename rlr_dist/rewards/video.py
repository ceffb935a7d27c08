"""Video rewards: a per-frame reward with frame subsampling and aggregation, temporal consistency, and motion
read from the centre of mass over frames; :func:`frame_shifts` measures motion without it (evaluators)."""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from rlr_dist.registry import check_param
from rlr_dist.rewards.base import (REWARDS, Reward, RewardError, apply_reward, frames_to_batch, nested_class,
                                   repeat_prompts, split_spec)


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
        self.check_params(reward, num_frames, frame_stride, aggregate, temporal_weight)
        name, params, _ = split_spec(reward, "reward")
        self.frame_reward = REWARDS.build(name, params, "reward")
        self.num_frames, self.frame_stride, self.aggregate = num_frames, frame_stride, aggregate
        self.temporal_weight = float(temporal_weight)
        self.differentiable = self.frame_reward.differentiable

    @classmethod
    def check_params(cls, reward: dict, num_frames: int | None = None, frame_stride: int | None = None,
                     aggregate: str = "mean", temporal_weight: float = 0.0) -> None:
        inner, params = nested_class(reward, "reward")
        REWARDS.check(reward["name"], params, "reward")
        check_param("reward", inner.modality != "video",
                    f"{reward['name']!r} scores whole videos; video_frames needs a per-frame (image) reward")
        check_param("num_frames", num_frames is None or num_frames >= 1, f"must be >= 1, got {num_frames!r}")
        check_param("frame_stride", frame_stride is None or frame_stride >= 1, f"must be >= 1, got {frame_stride!r}")
        check_param("frame_stride", num_frames is None or frame_stride is None, "give num_frames or frame_stride, not both")

    @classmethod
    def is_differentiable(cls, params: dict) -> bool:
        inner, p = nested_class(params["reward"], "reward")
        return inner.is_differentiable(p)

    @classmethod
    def reads_frames(cls, params: dict, num: int) -> list[int] | None:
        if params.get("temporal_weight"):
            return None
        return frame_indices(num, params.get("num_frames"), params.get("frame_stride"))

    @classmethod
    def vision_tower(cls, params: dict) -> list[dict]:
        inner, p = nested_class(params["reward"], "reward")
        return inner.vision_tower(p)

    def frames(self, num: int) -> list[int] | None:
        return self.reads_frames({"num_frames": self.num_frames, "frame_stride": self.frame_stride,
                                  "temporal_weight": self.temporal_weight}, num)

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


DIRECTION_SIGN = {"right": 1.0, "left": -1.0}


def centre_of_mass_x(video: Tensor, ink: str = "bright") -> Tensor:
    """Horizontal centre of mass (pixels from the left edge) of each frame of ``(B, C, F, H, W)`` in ``[0, 1]``
    -> ``(B, F)``, weighting pixels by their grey value (``ink: dark``: by 1 − grey). Differentiable."""
    grey = video.float().mean(dim=1)  # (B, F, H, W)
    w = grey if ink == "bright" else 1 - grey
    col = w.sum(dim=2)  # (B, F, W)
    x = torch.arange(col.shape[-1], device=col.device, dtype=col.dtype)
    return (col * x).sum(-1) / col.sum(-1).clamp_min(1e-6)


@REWARDS.register("motion")
class Motion(Reward):
    """Motion of the content along ``direction``, from the centre of mass over frames (:func:`centre_of_mass_x`).

    With ``speed`` (pixels per frame): ``−mean_f (s·v_f − speed)²`` where ``v_f`` is the centre's step from frame
    ``f`` to ``f + 1`` and ``s = ±1`` the direction — 0 for motion at that speed every frame (consistent speed),
    −4·speed² for the same motion the other way. ``speed: null``: the signed mean velocity ``s·mean_f v_f``,
    which changes sign when the clip is played backwards. Differentiable."""

    differentiable = True
    modality = "video"

    def __init__(self, direction: Literal["right", "left"] = "right", speed: float | None = 1.0,
                 ink: Literal["bright", "dark"] = "bright"):
        super().__init__()
        self.check_params(direction, speed, ink)
        self.sign, self.speed, self.ink = DIRECTION_SIGN[direction], speed, ink

    @classmethod
    def check_params(cls, direction: str = "right", speed: float | None = 1.0, ink: str = "bright") -> None:
        check_param("direction", direction in DIRECTION_SIGN, f"must be 'right' or 'left', got {direction!r}")
        check_param("speed", speed is None or speed > 0, f"must be > 0 pixels per frame (or null), got {speed!r}")
        check_param("ink", ink in ("bright", "dark"), f"must be 'bright' or 'dark', got {ink!r}")

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        if images.dim() != 5 or images.shape[2] < 2:
            raise RewardError(f"reward {self.name!r} needs video (B, C, F >= 2, H, W), got {tuple(images.shape)}")
        v = self.sign * centre_of_mass_x(images, self.ink).diff(dim=1)  # (B, F − 1), along the direction
        if self.speed is None:
            return v.mean(dim=1)
        return -(v - self.speed).pow(2).mean(dim=1)


@torch.no_grad()
def frame_shifts(video: Tensor, max_shift: int = 3) -> Tensor:
    """The horizontal shift (pixels, right positive) that best maps each frame onto the next, by least
    squares over shifts ``−max_shift .. max_shift`` of ``(B, C, F, H, W)`` -> ``(B, F − 1)`` integers. Reads
    motion as displacement of the whole picture, not of its centre of mass (so brightening one side does not
    count as motion)."""
    a, b = video[:, :, :-1].float(), video[:, :, 1:].float()
    W = video.shape[-1]
    errs = []
    for s in range(-max_shift, max_shift + 1):
        if s >= 0:
            d = b[..., s:] - a[..., :W - s]
        else:
            d = b[..., :W + s] - a[..., -s:]
        errs.append(d.pow(2).mean(dim=(1, 3, 4)))  # (B, F − 1)
    return torch.stack(errs, -1).argmin(-1) - max_shift
