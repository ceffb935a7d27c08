"""The LAION aesthetic predictor: an MLP head on L2-normalised CLIP image embeddings (differentiable).

The head has the layout of the public ``sac+logos+ava1-l14-linearMSE.pth`` (state-dict keys
``layers.0.weight`` … ``layers.7.bias``), its input size the CLIP model's ``projection_dim`` (768 for
ViT-L/14). Both parts come from a local path or an ``s3://`` URI (downloaded and verified by
:mod:`rlr_dist.storage`) and are frozen; the preprocessing (grey -> RGB, bilinear resize, CLIP
normalisation) is a torch function of the images, so ``∂R/∂images`` flows through it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlr_dist import storage
from rlr_dist.config import PathArg
from rlr_dist.registry import check_param
from rlr_dist.rewards.base import REWARDS, Reward, RewardError

# The CLIP ViT-L/14 vision tower the public head was trained on (what the planner assumes when the
# configured CLIP folder is not on this machine)
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, projection_dim=768)
# OpenAI CLIP preprocessing constants, used when the folder has no preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class AestheticHead(nn.Module):
    """``d -> 1024 -> 128 -> 64 -> 16 -> 1`` linear layers with dropout (no activations, as published)."""

    def __init__(self, d: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(d, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: Tensor) -> Tensor:
        return self.layers(emb)


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a torch pickle (``weights_only=True``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise RewardError(f"{str(path)!r} does not hold a state dict of tensors")
    return sd


def _resolve(uri: str, what: str, name: str) -> Path:
    try:
        return storage.resolve(uri)
    except storage.StorageError as e:
        raise RewardError(f"reward {name!r}: {what} {uri!r} cannot be found or read: {e}") from None


def _norm_constants(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = folder / "preprocessor_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        mean, std = data.get("image_mean"), data.get("image_std")
        if mean and std and len(mean) == 3 and len(std) == 3:
            return tuple(map(float, mean)), tuple(map(float, std))
    return CLIP_MEAN, CLIP_STD


@REWARDS.register("aesthetic")
class AestheticScore(Reward):
    """LAION aesthetic score of images in ``[0, 1]`` (roughly 1–10 with the public weights).

    clip: folder (or ``s3://`` URI) of a ``CLIPVisionModelWithProjection`` / ``CLIPModel`` checkpoint
      (``save_pretrained`` layout), e.g. a copy of ``openai/clip-vit-large-patch14``.
    head: ``.pth`` / ``.pt`` / ``.safetensors`` file (or ``s3://`` URI) with the head's state dict.
    antialias: anti-aliased bilinear resize (recommended when downsampling large images).
    """

    differentiable = True
    modality = "image"

    def __init__(self, clip: PathArg, head: PathArg, antialias: bool = True):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        check_param("clip", isinstance(clip, str) and bool(clip), f"must be a path or s3:// URI, got {clip!r}")
        check_param("head", isinstance(head, str) and bool(head), f"must be a path or s3:// URI, got {head!r}")
        check_param("antialias", isinstance(antialias, bool), f"expected true/false, got {antialias!r}")
        folder = _resolve(clip, "CLIP model folder", self.name)
        if not (folder / "config.json").is_file():
            raise RewardError(f"reward {self.name!r}: CLIP model {clip!r} has no config.json (resolved to {str(folder)!r})")
        try:
            self.clip = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise RewardError(f"reward {self.name!r}: cannot load CLIP model {clip!r}: {e}") from None
        d = self.clip.visual_projection.out_features
        self.image_size = int(self.clip.config.image_size)

        head_path = _resolve(head, "aesthetic head", self.name)
        if not head_path.is_file():
            raise RewardError(f"reward {self.name!r}: aesthetic head {head!r} is not a file")
        try:
            sd = load_state_dict_file(head_path)
        except Exception as e:  # unpickling / safetensors header errors
            raise RewardError(f"reward {self.name!r}: cannot read aesthetic head {head!r}: {e}") from None
        w0 = sd.get("layers.0.weight")
        if w0 is None or w0.dim() != 2:
            raise RewardError(f"reward {self.name!r}: aesthetic head {head!r} has no 2-D 'layers.0.weight' "
                              f"(keys: {sorted(sd)[:10]})")
        if w0.shape[1] != d:
            raise RewardError(f"reward {self.name!r}: aesthetic head {head!r} takes {w0.shape[1]}-dim embeddings "
                              f"but CLIP model {clip!r} has projection_dim {d}")
        self.head = AestheticHead(d)
        try:
            self.head.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise RewardError(f"reward {self.name!r}: aesthetic head {head!r} does not match the LAION layout: {e}") from None

        mean, std = _norm_constants(folder)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.antialias = antialias
        self.requires_grad_(False)
        self.train(False)

    @classmethod
    def vision_tower(cls, params: dict) -> list[dict]:
        local = Path(str(params.get("clip", ""))) / "config.json"
        if not local.is_file():
            return [CLIP_L14_VISION]
        conf = json.loads(local.read_text())
        return [conf.get("vision_config", conf)]

    def train(self, mode: bool = True) -> "AestheticScore":
        super().train(mode)
        self.clip.eval()  # frozen: dropout stays off whatever the parent module's mode
        self.head.eval()
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """``(B, 1|3, H, W)`` in ``[0, 1]`` -> CLIP pixel values ``(B, 3, S, S)``; differentiable."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise RewardError(f"reward {self.name!r}: expected (B, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
        x = images.to(self.mean.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=self.antialias)
        return (x - self.mean) / self.std

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        x = self.preprocess(images).to(self.clip.dtype)
        emb = self.clip(pixel_values=x).image_embeds
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.head(emb.to(next(self.head.parameters()).dtype)).squeeze(-1).float()
