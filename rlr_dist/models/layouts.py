"""The registered model layouts: how each kind of diffusers model is conditioned, shaped and decoded.

* ``pixel``       — ``UNet2DModel`` on pixels, unconditional or class-conditional (``rlr_model.json``
  names the classes and the null class used for classifier-free guidance).
* ``pixel_video`` — a ``UNet2DModel`` whose channels are the F frames stacked frame-major; latents are
  ``(B, C, F, H, W)`` like every video layout.
* ``sd``          — Stable Diffusion 1.x/2.x: latent ``UNet2DConditionModel`` + ``AutoencoderKL`` + CLIP text
  encoder; CFG with the empty prompt as null condition (both branches through the trained UNet).
* ``t2v``         — text-to-video (ModelScope / zeroscope): ``UNet3DConditionModel`` on ``(B, C, F, h, w)``
  latents, decoded frame by frame by the image VAE.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from rlr_dist.models.base import MODELS, DiffusionModel, ModelError
from rlr_dist.rewards.base import batch_to_frames, frames_to_batch


def _hw(sample_size: Any) -> tuple[int, int]:
    if isinstance(sample_size, int):
        return sample_size, sample_size
    h, w = sample_size
    return int(h), int(w)


class PixelDecoder(nn.Module):
    """``x_0`` in ``[-1, 1]`` -> images in ``[0, 1]`` (any number of leading / frame dims)."""

    def forward(self, x0: Tensor) -> Tensor:
        return (x0 / 2 + 0.5).clamp(0, 1)


class LatentDecoder(nn.Module):
    """VAE decode of image latents ``(B, c, h, w)`` or video latents ``(B, c, F, h, w)`` (frame by frame)
    to images in ``[0, 1]``: ``vae.decode(z / scaling_factor + shift_factor)`` (SD3 / FLUX VAEs have a shift).
    ``slice_size`` decodes that many images at a time (VAE slicing); :meth:`vjp` brings a gradient on the
    images back to the latents one slice at a time."""

    def __init__(self, vae: nn.Module, slice_size: int | None = None):
        super().__init__()
        self.vae = vae
        self.slice_size = slice_size

    def _decode(self, z: Tensor) -> Tensor:
        """Images of a batch of image latents ``(N, c, h, w)``."""
        z = z / self.vae.config.scaling_factor + (getattr(self.vae.config, "shift_factor", None) or 0.0)
        return (self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)

    def _slices(self, n: int) -> list[slice]:
        step = self.slice_size or n
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def forward(self, z: Tensor) -> Tensor:
        video = z.dim() == 5
        flat = frames_to_batch(z) if video else z
        img = torch.cat([self._decode(flat[s]) for s in self._slices(flat.shape[0])])
        return batch_to_frames(img, z.shape[2]) if video else img

    def vjp(self, z: Tensor, grad: Tensor) -> Tensor:
        """``∂⟨grad, decode(z)⟩ / ∂z``, decoding each slice again with a graph and back-propagating its part of
        ``grad`` before the next: the decoder's activations of one slice at a time instead of all images."""
        video = z.dim() == 5
        flat, g = (frames_to_batch(z), frames_to_batch(grad)) if video else (z, grad)
        out = torch.empty_like(flat)
        with torch.enable_grad():
            for s in self._slices(flat.shape[0]):
                part = flat[s].detach().requires_grad_(True)
                (out[s],) = torch.autograd.grad(self._decode(part), part, g[s])
        return batch_to_frames(out, z.shape[2]) if video else out


def prompt_class(prompt: str, class_names: list[str], null_class: int | None, folder) -> int:
    """The class a prompt names: a class name (``"a handwritten three"``) or its index (``"3"``); the empty
    prompt is the null class. Errors name the prompt and the classes."""
    text = prompt.strip().lower()
    if not text:
        if null_class is None:
            raise ModelError(f"{folder}: the empty prompt needs a null class, and this model has none")
        return int(null_class)
    words = re.findall(r"[a-z0-9]+", text)
    hits = {i for i, name in enumerate(class_names) if name in words or str(i) in words}
    if len(hits) != 1:
        why = "names no class" if not hits else f"names several classes {sorted(hits)}"
        raise ModelError(f"prompt {prompt!r} {why}; classes of {getattr(folder, 'name', folder)}: {class_names} "
                         "(or their indices)")
    return hits.pop()


@MODELS.register("pixel")
class PixelModel(DiffusionModel):
    """Pixel-space ``UNet2DModel``; class-conditional when the UNet has class embeddings.

    Prompts name a class: a class name from ``rlr_model.json`` (``"a handwritten three"``), or its index
    (``"3"``); the empty prompt is the null class.
    """

    unet_class = "UNet2DModel"
    # Pixel UNets may have no attention: adapt the ResNet convolutions too.
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]

    def load_components(self) -> None:
        if self.cfg.resolution is not None:
            raise ModelError(f"model.resolution: pixel layouts sample at the UNet's sample_size; {self.folder} "
                             f"is {self.unet.config.sample_size}")
        num = self.unet.config.num_class_embeds
        self.conditional = num is not None
        names = self.meta.get("class_names") or [str(i) for i in range((num or 1) - 1)]
        self.class_names = [str(n).lower() for n in names]
        self.null_class = self.meta.get("null_class", (num - 1) if num else None)
        if self.conditional and not (0 <= int(self.null_class) < num):
            raise ModelError(f"{self.folder}: null_class {self.null_class} outside the UNet's {num} class embeddings")

    def latent_shape(self) -> tuple[int, ...]:
        return (self.unet.config.in_channels, *_hw(self.unet.config.sample_size))

    def class_of(self, prompt: str) -> int:
        return prompt_class(prompt, self.class_names, self.null_class, self.folder)

    def encode_prompts(self, prompts: Sequence[str] | None) -> Any:
        if not self.conditional:
            return None
        if prompts is None:
            raise ModelError(f"{self.folder}: class-conditional model needs prompts naming one of {self.class_names}")
        return torch.tensor([self.class_of(p) for p in prompts], dtype=torch.long, device=self.device)

    def null_cond(self) -> Any:
        return None if not self.conditional else torch.tensor(int(self.null_class), device=self.device)

    def unet_forward(self, unet: nn.Module, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        if cond is None:
            return unet(x, t).sample
        return unet(x, t, class_labels=cond).sample

    def decoder(self) -> nn.Module:
        return PixelDecoder()

    @classmethod
    def load_decoder(cls, folder, cfg) -> nn.Module:
        return PixelDecoder()


@MODELS.register("pixel_video")
class PixelVideoModel(PixelModel):
    """Video as a ``UNet2DModel`` over frames stacked in channels: ``(B, C, F, H, W)`` <-> ``(B, F·C, H, W)``."""

    video = True
    detects_unet_class = False  # a UNet2DModel folder is "pixel" unless rlr_model.json says pixel_video

    def load_components(self) -> None:
        super().load_components()
        self.frames = int(self.meta.get("frames", 0))
        self.channels = int(self.meta.get("channels", 1))
        if self.frames < 1 or self.unet.config.in_channels != self.frames * self.channels:
            raise ModelError(f"{self.folder}: rlr_model.json frames={self.frames}, channels={self.channels} do not "
                             f"match the UNet's in_channels={self.unet.config.in_channels}")
        if self.cfg.num_frames not in (None, self.frames):
            raise ModelError(f"model.num_frames: {self.cfg.num_frames} given, but {self.folder} is fixed at "
                             f"{self.frames} frames")

    def latent_shape(self) -> tuple[int, ...]:
        return (self.channels, self.frames, *_hw(self.unet.config.sample_size))

    def unet_forward(self, unet: nn.Module, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        B, C, F, H, W = x.shape
        flat = x.permute(0, 2, 1, 3, 4).reshape(B, F * C, H, W)
        out = super().unet_forward(unet, flat, t, cond)
        return out.reshape(B, F, C, H, W).permute(0, 2, 1, 3, 4)


@MODELS.register("sd")
class StableDiffusionModel(DiffusionModel):
    """Latent text-to-image: ``UNet2DConditionModel`` + ``AutoencoderKL`` + ``CLIPTextModel`` (frozen)."""

    unet_class = "UNet2DConditionModel"

    def load_components(self) -> None:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            self.vae = AutoencoderKL.from_pretrained(self.folder, subfolder="vae")
            self.text_encoder = CLIPTextModel.from_pretrained(self.folder, subfolder="text_encoder")
            self.tokenizer = CLIPTokenizer.from_pretrained(self.folder, subfolder="tokenizer")
        except (OSError, ValueError, EnvironmentError) as e:
            raise ModelError(f"{self.folder}: cannot load the {self.layout} components (vae, text_encoder, "
                             f"tokenizer): {e}") from None
        for m in (self.vae, self.text_encoder):
            m.requires_grad_(False).eval()
        self._null: Tensor | None = None
        self.latent_hw()  # a bad model.resolution fails at load

    def latent_hw(self) -> tuple[int, int]:
        """``model.resolution`` over the VAE's downsampling factor, else the UNet's sample size, else the
        VAE's image size over that factor."""
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        res = self.cfg.resolution
        if res is not None:
            h, w = _hw(res if isinstance(res, int) or len(res) == 2 else res[0])
            if h % f or w % f:
                raise ModelError(f"model.resolution: {res} is not a multiple of the VAE factor {f} of {self.folder}")
            return h // f, w // f
        if self.unet.config.get("sample_size") is not None:
            return _hw(self.unet.config.sample_size)
        h, w = _hw(self.vae.config.sample_size)
        return h // f, w // f

    def latent_shape(self) -> tuple[int, ...]:
        return (self.unet.config.in_channels, *self.latent_hw())

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str] | None) -> Tensor:
        if prompts is None:
            raise ModelError(f"{self.folder}: a text-conditioned model needs prompts")
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return self.text_encoder(tok.input_ids.to(self.text_device))[0].to(self.device)

    def null_cond(self) -> Tensor:
        if self._null is None or self._null.device != self.device:
            self._null = self.encode_prompts([""])
        return self._null

    def unet_forward(self, unet: nn.Module, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        return unet(x, t, encoder_hidden_states=cond).sample

    def decoder(self) -> nn.Module:
        return LatentDecoder(self.vae, slice_size=1 if self.cfg.vae_slicing else None)

    @classmethod
    def load_decoder(cls, folder, cfg) -> nn.Module:
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        except (OSError, ValueError, EnvironmentError) as e:
            raise ModelError(f"{folder / 'vae'}: cannot load the VAE: {e}") from None
        return LatentDecoder(vae, slice_size=1 if cfg.vae_slicing else None)


@MODELS.register("t2v")
class TextToVideoModel(StableDiffusionModel):
    """Text-to-video with a ``UNet3DConditionModel`` on ``(B, C, F, h, w)`` latents."""

    unet_class = "UNet3DConditionModel"
    video = True

    def load_components(self) -> None:
        super().load_components()
        self.frames = int(self.cfg.num_frames or self.meta.get("frames", 16))

    def latent_shape(self) -> tuple[int, ...]:
        return (self.unet.config.in_channels, self.frames, *self.latent_hw())
