"""Typed config of a model: where it comes from, how it is fine-tuned, how it samples."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlr_dist.config import check


@dataclass
class LoraConfig:
    """LoRA through peft. ``alpha`` defaults to ``rank`` (scale 1). ``target_modules`` are module-name
    suffixes inside the UNet (attention projections by default; add ``conv1``/``conv2`` etc. for
    models without attention)."""

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        check(self.rank >= 1, "lora.rank", f"must be >= 1, got {self.rank}")
        check(self.alpha is None or self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.target_modules is None or len(self.target_modules) > 0, "lora.target_modules", "must name at least one module")


@dataclass
class ModelConfig:
    """A diffusion model to fine-tune.

    path: a diffusers folder (local), ``s3://bucket/prefix`` (downloaded into a cache and verified), a hub
      id (only when the machine is online), or ``toy:digits`` / ``toy:moving-digits`` for the shipped models.
    layout: one of the registered adapters (``pixel``, ``pixel_video``, ``sd``, ``t2v``); detected from
      the folder when omitted.
    finetune: ``lora`` (reference = adapters disabled, no second copy) or ``full`` (reference = frozen copy).
    sampler / num_inference_steps / eta: the chain the estimators see (DDIM with η > 0, or DDPM).
    last_step_eta: DDIM η of the last step (0 = deterministic decoder step, the usual setting).
    mixed_precision: ``bf16`` autocasts the UNet forward; likelihood ratios and KL stay in fp32.
    num_frames: frames of video layouts that do not fix them (``t2v``).
    resolution: image size in pixels of latent layouts (``sd``, ``t2v``): one int or ``[height, width]``, each a
      multiple of the VAE's downsampling factor; default the UNet's ``sample_size`` (zeroscope: ``[320, 576]``).
    vae_slicing: decode one image (video: one frame) at a time; lowers no-grad decode memory only (with
      ``∂R/∂x_0`` every slice stays in the graph until backward).
    """

    path: str = "toy:digits"
    layout: str | None = None
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    sampler: Literal["ddim", "ddpm"] = "ddim"
    num_inference_steps: int = 20
    eta: float = 1.0
    last_step_eta: float | None = 0.0
    guidance_scale: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    num_frames: int | None = None
    vae_slicing: bool = False
    resolution: int | list[int] | None = None

    def __post_init__(self) -> None:
        check(bool(self.path), "model.path", "must not be empty")
        check(self.num_inference_steps >= 1, "model.num_inference_steps", f"must be >= 1, got {self.num_inference_steps}")
        check(self.eta >= 0, "model.eta", f"must be >= 0, got {self.eta}")
        check(self.guidance_scale > 0, "model.guidance_scale", f"must be > 0, got {self.guidance_scale}")
        check(self.num_frames is None or self.num_frames >= 1, "model.num_frames", f"must be >= 1, got {self.num_frames}")
        res = [self.resolution] if isinstance(self.resolution, int) else self.resolution
        check(res is None or (len(res) in (1, 2) and all(isinstance(v, int) and v >= 8 for v in res)), "model.resolution",
              f"must be an int >= 8 or [height, width], got {self.resolution}")
        if self.sampler == "ddpm":
            check(self.eta == 1.0, "model.eta", "only DDIM takes eta; leave it at 1.0 with sampler: ddpm")
