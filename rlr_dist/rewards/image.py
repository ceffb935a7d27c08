"""Pixel-statistics rewards: JPEG (in)compressibility as in DDPO, and two differentiable sanity rewards."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rlr_dist.registry import check_param
from rlr_dist.rewards.base import REWARDS, Reward, RewardError


def to_uint8(images: Tensor) -> np.ndarray:
    """``(B, C, H, W)`` floats in ``[0, 1]`` -> ``(B, H, W, C)`` uint8 (rounded, clamped)."""
    x = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def jpeg_sizes_kb(images: Tensor, quality: int, name: str = "jpeg") -> Tensor:
    """JPEG file size of each image at ``quality``, in kB (1000 bytes), as a float32 (B,) on ``images``' device."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise RewardError(f"reward {name!r}: JPEG needs (B, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
    sizes = []
    for arr in to_uint8(images):
        img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)  # uint8 H×W -> "L", H×W×3 -> "RGB"
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class _Jpeg(Reward):
    differentiable = False
    modality = "image"
    sign = 1.0

    def __init__(self, quality: int = 95):
        super().__init__()
        check_param("quality", isinstance(quality, int) and not isinstance(quality, bool)
                    and 1 <= quality <= 100, f"must be an int in [1, 100], got {quality!r}")
        self.quality = quality

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        return self.sign * jpeg_sizes_kb(images, self.quality, self.name)


@REWARDS.register("jpeg_compressibility")
class JpegCompressibility(_Jpeg):
    """``−`` JPEG size in kB at ``quality`` (higher = more compressible). Black-box."""

    sign = -1.0


@REWARDS.register("jpeg_incompressibility")
class JpegIncompressibility(_Jpeg):
    """``+`` JPEG size in kB at ``quality`` (higher = more detail/noise). Black-box."""

    sign = 1.0


@REWARDS.register("brightness")
class Brightness(Reward):
    """Mean pixel value over channels and pixels; ``∂R/∂x = 1/(C·H·W)``."""

    differentiable = True
    modality = "image"

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        return images.flatten(1).mean(dim=1)


@REWARDS.register("contrast")
class Contrast(Reward):
    """Standard deviation (population) of all pixel values of each image.

    ``eps`` under the square root keeps the gradient finite (zero) for a flat image.
    """

    differentiable = True
    modality = "image"

    def __init__(self, eps: float = 1e-12):
        super().__init__()
        check_param("eps", isinstance(eps, (int, float)) and eps > 0, f"must be > 0, got {eps!r}")
        self.eps = float(eps)

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        return (images.flatten(1).var(dim=1, correction=0) + self.eps).sqrt()
