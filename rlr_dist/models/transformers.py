"""Flow-matching diffusion transformers as layouts (``model.sampler: flow``; ``docs/flow.md``).

* ``sd3``        — ``SD3Transformer2DModel`` (SD3 / SD3.5): CLIP-L + CLIP-G + T5 text encoders (penultimate CLIP
  states side by side, padded to T5's width, then the T5 tokens; pooled = both CLIP projections), CFG with the
  empty prompt, ``AutoencoderKL`` with a shift factor.
* ``flux``       — ``FluxTransformer2DModel`` (FLUX.1): 2×2-packed latents with positional ids, CLIP pooled
  vector + T5 tokens, the distilled guidance as an input (``model.distilled_guidance``, FLUX.1-dev: 3.5) and
  true CFG (``model.guidance_scale`` > 1, two branches) on top where wanted; the pipeline's ``linspace(1, 1/N)``
  flow grid with resolution-dependent shift.
* ``wan``        — ``WanTransformer3DModel`` (Wan 2.1 / 2.2 text-to-video): UMT5 tokens (trimmed to the
  prompt, zero-padded, as the pipeline does), ``AutoencoderKLWan`` video VAE (4× in time, causal), latents
  ``(B, 16, 1 + (F − 1)/4, H/8, W/8)``; Wan ships a UniPC scheduler: we sample its flow grid with Euler / SDE
  transitions (``FlowMatchEulerDiscreteScheduler`` with the same shift and times).
* ``pixel_flow`` — a class-conditional ``SD3Transformer2DModel`` on pixels (the toy world's ``digits-flow``):
  the class is a one-hot conditioning token and pooled vector; no VAE, no text encoder.
* ``pixel_video_flow`` — a class- and direction-conditional ``WanTransformer3DModel`` on pixel video (the toy
  world's ``moving-digits``): two one-hot context tokens; no VAE, no text encoder.

Common to all: the chain holds unpacked latents in fp32; text embeddings are computed once per prompt and
cached (:class:`~rlr_dist.models.text.PromptCache`); with ``mixed_precision: bf16`` and LoRA the frozen
transformer and text encoders are held in bf16 while the LoRA weights, the chain's means and every
log-density stay fp32; ``gradient_checkpointing`` checkpoints each transformer block (diffusers' hooks, with a
function that keeps the LoRA reference's adapters off in the recompute).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from rlr_dist.models.base import MODELS, DiffusionModel, ModelError
from rlr_dist.models.config import ModelConfig
from rlr_dist.models.layouts import LatentDecoder, PixelDecoder, _hw, prompt_class
from rlr_dist.models.text import PromptCache, load_text_parts, pack_cond, token_ids, unpack_cond

ATTENTION_LORA = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _config(folder: Path, sub: str) -> dict:
    path = Path(folder) / sub / "config.json"
    if not path.is_file():
        raise ModelError(f"{path}: missing")
    return json.loads(path.read_text())


def _vae_factor(vae_config: dict) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def _pixels(cfg: ModelConfig, default: tuple[int, int]) -> tuple[int, int]:
    res = cfg.resolution
    if res is None:
        return default
    return _hw(res if isinstance(res, int) or len(res) == 2 else res[0])


class FlowTransformerModel(DiffusionModel):
    """What the transformer layouts share: the ``transformer/`` folder, per-block checkpointing, bf16 weights,
    the prompt cache, inputs cast to the weights' dtype."""

    denoiser_folder = "transformer"
    checkpoints_blocks = True
    bf16_weights = True
    default_lora_targets = ATTENTION_LORA
    frozen_attributes = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    #: default T5 / UMT5 sequence length (``model.max_sequence_length`` overrides)
    text_length: int = 256

    def load_components(self) -> None:
        if self.cfg.sampler != "flow":
            raise ModelError(f"model.sampler: {self.cfg.sampler!r}, but {self.folder} is a flow-matching "
                             f"{self.unet_class}; use sampler: flow")
        self.prompts = PromptCache()
        self._null: Tensor | None = None
        try:
            self.load_parts()
        except ModelError:
            raise
        except (OSError, ValueError, EnvironmentError) as e:
            raise ModelError(f"{self.folder}: cannot load the {self.layout} components: {e}") from None

    def load_parts(self) -> None:
        """Load the frozen VAE, text encoders and tokenizers."""

    def text_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.mixed_precision == "bf16" else torch.float32

    def seq_len(self, tokenizer) -> int:
        return int(self.cfg.max_sequence_length or min(self.text_length, tokenizer.model_max_length))

    def encode_text(self, prompts: list[str]) -> Tensor:
        """The condition tensor of a batch of prompts (uncached)."""
        raise NotImplementedError

    def encode_prompts(self, prompts: Sequence[str] | None) -> Tensor:
        if prompts is None:
            raise ModelError(f"{self.folder}: a text-conditioned model needs prompts")
        return self.prompts.get(list(prompts), self.encode_text, self.device)

    def null_cond(self) -> Tensor:
        return self.encode_prompts([""])

    def to(self, device):
        out = super().to(device)
        self.prompts.clear()
        return out

    def _dt(self) -> torch.dtype:
        """Inputs are cast to the dtype the denoiser's weights are held in."""
        return self.weights_dtype()

    # ------------------------------------------------------------------ VAE / resolution
    def vae_factor(self) -> int:
        return _vae_factor(self.vae.config)

    @classmethod
    def _tokenizer_length(cls, folder: Path | None, sub: str, default: int) -> int:
        """``model_max_length`` of a folder's tokenizer (the planner sizes the text stream with it)."""
        path = None if folder is None else Path(folder) / sub / "tokenizer_config.json"
        if path is None or not path.is_file():
            return default
        return int(json.loads(path.read_text()).get("model_max_length", default))

    @classmethod
    def _t5_tokens(cls, cfg: ModelConfig, folder: Path | None, sub: str) -> int:
        return int(cfg.max_sequence_length or min(cls.text_length, cls._tokenizer_length(folder, sub, 10**6)))

    def decoder(self) -> nn.Module:
        return LatentDecoder(self.vae, slice_size=1 if self.cfg.vae_slicing else None)

    @classmethod
    def load_decoder(cls, folder, cfg) -> nn.Module:
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        except (OSError, ValueError, EnvironmentError) as e:
            raise ModelError(f"{Path(folder) / 'vae'}: cannot load the VAE: {e}") from None
        return LatentDecoder(vae, slice_size=1 if cfg.vae_slicing else None)


@MODELS.register("sd3")
class SD3Model(FlowTransformerModel):
    """SD3 / SD3.5: ``SD3Transformer2DModel`` + CLIP-L, CLIP-G, T5-XXL (frozen) + ``AutoencoderKL``."""

    unet_class = "SD3Transformer2DModel"
    text_length = 256

    def load_parts(self) -> None:
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(self.folder, subfolder="vae").requires_grad_(False).eval()
        parts = load_text_parts(self.folder, [
            ("text_encoder", "text_encoder", "CLIPTextModelWithProjection", True),
            ("text_encoder_2", "text_encoder_2", "CLIPTextModelWithProjection", True),
            ("text_encoder_3", "text_encoder_3", "T5EncoderModel", False),
            ("tokenizer", "tokenizer", "tokenizer", True), ("tokenizer_2", "tokenizer_2", "tokenizer", True),
            ("tokenizer_3", "tokenizer_3", "tokenizer", False)], self.text_dtype(), "sd3")
        for k, v in parts.items():
            setattr(self, k, v)
        self.latent_hw()  # a bad model.resolution fails at load

    @classmethod
    def _latent_hw(cls, folder: Path, cfg: ModelConfig) -> tuple[int, int]:
        tc, vc = _config(folder, "transformer"), _config(folder, "vae")
        f, p = _vae_factor(vc), tc.get("patch_size", 2)
        s = tc.get("sample_size", 128)
        h, w = _pixels(cfg, (s * f, s * f))
        if h % (f * p) or w % (f * p):
            raise ModelError(f"model.resolution: {cfg.resolution} is not a multiple of {f * p} (VAE factor {f} × "
                             f"patch {p}) for {folder}")
        return h // f, w // f

    def latent_hw(self) -> tuple[int, int]:
        return self._latent_hw(self.folder, self.cfg)

    @classmethod
    def image_seq_len(cls, folder: Path, cfg: ModelConfig) -> int:
        h, w = cls._latent_hw(folder, cfg)
        p = _config(folder, "transformer").get("patch_size", 2)
        return (h // p) * (w // p)

    @classmethod
    def planner_shape(cls, config, vae_config, pixels, cfg, meta, folder):
        f, s = _vae_factor(vae_config), config.get("sample_size", 128)
        h, w = pixels or (s * f, s * f)
        tokens = cls._tokenizer_length(folder, "tokenizer", 77) + cls._t5_tokens(cfg, folder, "tokenizer_3")
        return {"latent": (config.get("in_channels", 16), h // f, w // f), "frames": 1, "latent_hw": (h // f, w // f),
                "tokens": tokens}

    def latent_shape(self) -> tuple[int, ...]:
        return (self.unet.config.in_channels, *self.latent_hw())

    def _clip(self, tokenizer, encoder, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ids = token_ids(tokenizer, prompts, tokenizer.model_max_length).to(self.text_device)
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2].float(), out[0].float()

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        h1, p1 = self._clip(self.tokenizer, self.text_encoder, prompts)
        h2, p2 = self._clip(self.tokenizer_2, self.text_encoder_2, prompts)
        D = self.unet.config.joint_attention_dim
        if self.text_encoder_3 is None:  # SD3 without T5: zeros in its place, as the pipeline does
            t5 = torch.zeros(len(prompts), int(self.cfg.max_sequence_length or self.text_length), D, device=self.text_device)
        else:
            ids = token_ids(self.tokenizer_3, prompts, self.seq_len(self.tokenizer_3)).to(self.text_device)
            t5 = self.text_encoder_3(ids)[0].float()
        clip = nn.functional.pad(torch.cat([h1, h2], -1), (0, t5.shape[-1] - h1.shape[-1] - h2.shape[-1]))
        return pack_cond(torch.cat([clip, t5], dim=-2), torch.cat([p1, p2], -1))

    def unet_forward(self, unet: nn.Module, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        c = self.unet.config  # (``unet`` may be a DeepSpeed engine around it, or the frozen reference copy)
        seq, pooled = unpack_cond(cond, c.joint_attention_dim, c.pooled_projection_dim)
        dt = self._dt()
        return unet(hidden_states=x.to(dt), timestep=t, encoder_hidden_states=seq.to(dt),
                    pooled_projections=pooled.to(dt)).sample

    @classmethod
    def meta_inputs(cls, config, latent, tokens, class_conditional=False, device="meta"):
        kw = {"hidden_states": torch.empty(1, *latent, device=device), "timestep": torch.zeros(1, device=device),
              "encoder_hidden_states": torch.empty(1, tokens, config["joint_attention_dim"], device=device),
              "pooled_projections": torch.empty(1, config["pooled_projection_dim"], device=device)}
        return (), kw


@MODELS.register("flux")
class FluxModel(FlowTransformerModel):
    """FLUX.1: ``FluxTransformer2DModel`` on 2×2-packed latents + CLIP-L (pooled) + T5-XXL + ``AutoencoderKL``."""

    unet_class = "FluxTransformer2DModel"
    text_length = 512
    default_pixels = 1024

    def load_parts(self) -> None:
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(self.folder, subfolder="vae").requires_grad_(False).eval()
        parts = load_text_parts(self.folder, [
            ("text_encoder", "text_encoder", "CLIPTextModel", True),
            ("text_encoder_2", "text_encoder_2", "T5EncoderModel", True),
            ("tokenizer", "tokenizer", "tokenizer", True), ("tokenizer_2", "tokenizer_2", "tokenizer", True)],
            self.text_dtype(), "flux")
        for k, v in parts.items():
            setattr(self, k, v)
        has = bool(self.unet.config.guidance_embeds)
        if self.cfg.distilled_guidance is not None and not has:
            raise ModelError(f"model.distilled_guidance: {self.folder} has no guidance embedding (not a "
                             "guidance-distilled FLUX); leave it unset")
        self.guidance = (self.cfg.distilled_guidance or 3.5) if has else None
        if self.unet.config.in_channels != 4 * self.vae.config.latent_channels:
            raise ModelError(f"{self.folder}: transformer in_channels {self.unet.config.in_channels} != 4 × VAE "
                             f"latent channels {self.vae.config.latent_channels} (2×2 packing)")
        self.latent_hw()

    @classmethod
    def _latent_hw(cls, folder: Path, cfg: ModelConfig) -> tuple[int, int]:
        f = _vae_factor(_config(folder, "vae"))
        h, w = _pixels(cfg, (cls.default_pixels, cls.default_pixels))
        if h % (2 * f) or w % (2 * f):
            raise ModelError(f"model.resolution: {cfg.resolution} is not a multiple of {2 * f} (VAE factor {f} × "
                             f"2×2 packing) for {folder}")
        return h // f, w // f

    def latent_hw(self) -> tuple[int, int]:
        return self._latent_hw(self.folder, self.cfg)

    @classmethod
    def image_seq_len(cls, folder: Path, cfg: ModelConfig) -> int:
        h, w = cls._latent_hw(folder, cfg)
        return (h // 2) * (w // 2)

    @classmethod
    def planner_shape(cls, config, vae_config, pixels, cfg, meta, folder):
        f = _vae_factor(vae_config)
        h, w = pixels or (cls.default_pixels, cls.default_pixels)
        return {"latent": (config.get("in_channels", 64) // 4, h // f, w // f), "frames": 1,
                "latent_hw": (h // f, w // f), "tokens": cls._t5_tokens(cfg, folder, "tokenizer_2")}

    @classmethod
    def flow_grid(cls, scheduler_config: dict, steps: int):
        """FluxPipeline's grid: unshifted ``linspace(1, 1/N, N)`` (shifted by the scheduler, with ``mu``)."""
        import numpy as np

        return scheduler_config, [float(v) for v in np.linspace(1.0, 1 / steps, steps)]

    def latent_shape(self) -> tuple[int, ...]:
        return (self.unet.config.in_channels // 4, *self.latent_hw())

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        ids = token_ids(self.tokenizer, prompts, self.tokenizer.model_max_length).to(self.text_device)
        pooled = self.text_encoder(ids).pooler_output.float()
        ids2 = token_ids(self.tokenizer_2, prompts, self.seq_len(self.tokenizer_2)).to(self.text_device)
        return pack_cond(self.text_encoder_2(ids2)[0].float(), pooled)

    @staticmethod
    def pack(x: Tensor) -> Tensor:
        """``(B, C, h, w)`` -> ``(B, (h/2)(w/2), 4C)``: FluxPipeline's ``_pack_latents``."""
        B, C, h, w = x.shape
        return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)

    @staticmethod
    def unpack(z: Tensor, h: int, w: int) -> Tensor:
        B, _, D = z.shape
        return z.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, h, w)

    @staticmethod
    def image_ids(h2: int, w2: int, device, dtype=torch.float32) -> Tensor:
        """FluxPipeline's ``_prepare_latent_image_ids`` for an ``h2 × w2`` grid of packed tokens."""
        ids = torch.zeros(h2, w2, 3, device=device, dtype=dtype)
        ids[..., 1] += torch.arange(h2, device=device, dtype=dtype)[:, None]
        ids[..., 2] += torch.arange(w2, device=device, dtype=dtype)[None, :]
        return ids.reshape(h2 * w2, 3)

    def unet_forward(self, unet: nn.Module, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        c = self.unet.config  # (``unet`` may be a DeepSpeed engine around it, or the frozen reference copy)
        B, _, h, w = x.shape
        seq, pooled = unpack_cond(cond, c.joint_attention_dim, c.pooled_projection_dim)
        dt = self._dt()
        g = None if self.guidance is None else torch.full((B,), float(self.guidance), device=x.device)
        out = unet(hidden_states=self.pack(x).to(dt), encoder_hidden_states=seq.to(dt), pooled_projections=pooled.to(dt),
                   timestep=t / 1000, img_ids=self.image_ids(h // 2, w // 2, x.device),
                   txt_ids=torch.zeros(seq.shape[1], 3, device=x.device), guidance=g).sample
        return self.unpack(out, h, w)

    @classmethod
    def meta_inputs(cls, config, latent, tokens, class_conditional=False, device="meta"):
        C, h, w = latent
        kw = {"hidden_states": torch.empty(1, (h // 2) * (w // 2), 4 * C, device=device),
              "encoder_hidden_states": torch.empty(1, tokens, config["joint_attention_dim"], device=device),
              "pooled_projections": torch.empty(1, config["pooled_projection_dim"], device=device),
              "timestep": torch.zeros(1, device=device), "img_ids": torch.zeros((h // 2) * (w // 2), 3, device=device),
              "txt_ids": torch.zeros(tokens, 3, device=device),
              "guidance": torch.zeros(1, device=device) if config.get("guidance_embeds") else None}
        return (), kw


class WanDecoder(nn.Module):
    """``AutoencoderKLWan`` decode of ``(B, z, f, h, w)`` latents to ``(B, 3, 1 + 4(f − 1), H, W)`` frames in
    ``[0, 1]`` (latents de-normalised with the VAE's ``latents_mean`` / ``latents_std`` as the pipeline does).

    The VAE is causal in time: pixel frame ``j`` needs latent frames ``0 .. ⌈j/4⌉`` and nothing after, so
    :meth:`decode_frames` decodes the latent prefix up to the last frame asked for and returns only those
    frames (what a reward that reads a subsample of frames costs: the prefix, not the clip)."""

    def __init__(self, vae: nn.Module, slicing: bool = False):
        super().__init__()
        self.vae = vae
        self.slicing = slicing
        self.temporal = int(vae.config.scale_factor_temporal or 4)

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal * (latent_frames - 1)

    def latent_frames_for(self, frame: int) -> int:
        """Latent frames that pixel frame ``frame`` depends on (a prefix)."""
        return 1 + -(-frame // self.temporal)

    def forward(self, z: Tensor) -> Tensor:
        return self.decode_frames(z, list(range(self.pixel_frames(z.shape[2]))))

    def decode_frames(self, z: Tensor, frames: Sequence[int]) -> Tensor:
        c = self.vae.config
        m = self.latent_frames_for(max(frames))
        z = z[:, :, :m].to(next(self.vae.parameters()).dtype)
        mean = torch.tensor(c.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(c.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        z = z * std + mean
        parts = z.split(1) if self.slicing else (z,)
        video = torch.cat([self.vae.decode(p).sample for p in parts])
        return (video[:, :, list(frames)].float() / 2 + 0.5).clamp(0, 1)


@MODELS.register("wan")
class WanModel(FlowTransformerModel):
    """Wan 2.1 / 2.2 text-to-video: ``WanTransformer3DModel`` + UMT5 (frozen) + ``AutoencoderKLWan``."""

    unet_class = "WanTransformer3DModel"
    video = True
    text_length = 512
    default_pixels = (480, 832)
    default_frames = 81
    frozen_attributes = ("vae", "text_encoder")

    def load_parts(self) -> None:
        from diffusers import AutoencoderKLWan

        self.vae = AutoencoderKLWan.from_pretrained(self.folder, subfolder="vae").requires_grad_(False).eval()
        parts = load_text_parts(self.folder, [("text_encoder", "text_encoder", "UMT5EncoderModel", True),
                                              ("tokenizer", "tokenizer", "tokenizer", True)], self.text_dtype(), "wan")
        for k, v in parts.items():
            setattr(self, k, v)
        self.frames = self.num_frames(self.cfg, self.meta)
        self.latent_hw()

    @classmethod
    def num_frames(cls, cfg: ModelConfig, meta: dict | None = None) -> int:
        F = int(cfg.num_frames or (meta or {}).get("frames", cls.default_frames))
        if (F - 1) % 4:
            raise ModelError(f"model.num_frames: Wan's VAE makes 1 + 4k frames; {F} is not of that form "
                             f"(e.g. {(F - 1) // 4 * 4 + 1})")
        return F

    @classmethod
    def _latent_hw(cls, folder: Path, cfg: ModelConfig) -> tuple[int, int]:
        vc, tc = _config(folder, "vae"), _config(folder, "transformer")
        f = int(vc.get("scale_factor_spatial") or 8)
        p = tc.get("patch_size", [1, 2, 2])
        h, w = _pixels(cfg, cls.default_pixels)
        if h % (f * p[1]) or w % (f * p[2]):
            raise ModelError(f"model.resolution: {cfg.resolution} is not a multiple of {f * p[1]} (VAE factor {f} × "
                             f"patch {p[1]}) for {folder}")
        return h // f, w // f

    def latent_hw(self) -> tuple[int, int]:
        return self._latent_hw(self.folder, self.cfg)

    @classmethod
    def planner_shape(cls, config, vae_config, pixels, cfg, meta, folder):
        F = cls.num_frames(cfg, meta)
        s, tf = int(vae_config.get("scale_factor_spatial") or 8), int(vae_config.get("scale_factor_temporal") or 4)
        h, w = pixels or cls.default_pixels
        return {"latent": (config.get("in_channels", 16), 1 + (F - 1) // tf, h // s, w // s), "frames": F,
                "latent_hw": (h // s, w // s), "tokens": cls._t5_tokens(cfg, folder, "tokenizer"), "temporal": tf}

    def latent_shape(self) -> tuple[int, ...]:
        f = 1 + (self.frames - 1) // int(self.vae.config.scale_factor_temporal or 4)
        return (self.unet.config.in_channels, f, *self.latent_hw())

    @classmethod
    def flow_grid(cls, scheduler_config: dict, steps: int):
        """Wan's ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s)`` as flow times: unshifted
        ``linspace(1, 1/1000, N + 1)[:-1]`` shifted by ``s`` and ending at 0 — sampled here with Euler / SDE
        transitions (``FlowMatchEulerDiscreteScheduler``, same shift), not UniPC's multistep update."""
        import numpy as np

        name = scheduler_config.get("_class_name")
        if name == "FlowMatchEulerDiscreteScheduler":
            return scheduler_config, None
        if not (scheduler_config.get("use_flow_sigmas") and scheduler_config.get("prediction_type") == "flow_prediction"):
            raise ModelError(f"model.sampler: flow needs a flow-matching scheduler; this Wan folder's is {name} "
                             "without use_flow_sigmas")
        n = int(scheduler_config.get("num_train_timesteps", 1000))
        fm = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": n,
              "shift": float(scheduler_config.get("flow_shift", 1.0)),
              "use_dynamic_shifting": bool(scheduler_config.get("use_dynamic_shifting", False))}
        return fm, [float(v) for v in np.linspace(1, 1 / n, steps + 1)[:-1]]

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        L = self.seq_len(self.tokenizer)
        ids, mask = token_ids(self.tokenizer, [re.sub(r"\s+", " ", p).strip() for p in prompts], L, mask=True)
        dev = self.text_device
        out = self.text_encoder(ids.to(dev), mask.to(dev)).last_hidden_state.float()
        return out * mask.to(dev)[..., None]  # the pipeline trims to the prompt and pads with zeros

    def unet_forward(self, unet: nn.Module, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        dt = self._dt()
        return unet(hidden_states=x.to(dt), timestep=t, encoder_hidden_states=cond.to(dt)).sample

    def decoder(self) -> nn.Module:
        return WanDecoder(self.vae, slicing=self.cfg.vae_slicing)

    @classmethod
    def load_decoder(cls, folder, cfg) -> nn.Module:
        from diffusers import AutoencoderKLWan

        try:
            vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae")
        except (OSError, ValueError, EnvironmentError) as e:
            raise ModelError(f"{Path(folder) / 'vae'}: cannot load the VAE: {e}") from None
        return WanDecoder(vae, slicing=cfg.vae_slicing)

    @classmethod
    def meta_inputs(cls, config, latent, tokens, class_conditional=False, device="meta"):
        kw = {"hidden_states": torch.empty(1, *latent, device=device), "timestep": torch.zeros(1, device=device),
              "encoder_hidden_states": torch.empty(1, tokens, config.get("text_dim", 4096), device=device)}
        return (), kw


@MODELS.register("pixel_flow")
class PixelFlowModel(SD3Model):
    """A class-conditional ``SD3Transformer2DModel`` on pixels: the class is a one-hot conditioning token and
    the same one-hot as pooled projection (``rlr_model.json`` names the classes and the null class, used for
    CFG). Prompts name a class as in the ``pixel`` layout (``"three"``, ``"3"``; ``""`` = null)."""

    detects_unet_class = False
    frozen_attributes = ()

    def load_parts(self) -> None:
        if self.cfg.resolution is not None:
            raise ModelError(f"model.resolution: pixel layouts sample at the transformer's sample_size; {self.folder} "
                             f"is {self.unet.config.sample_size}")
        n = int(self.unet.config.joint_attention_dim)
        names = self.meta.get("class_names") or [str(i) for i in range(n - 1)]
        self.class_names = [str(x).lower() for x in names]
        self.null_class = int(self.meta.get("null_class", n - 1))

    def class_of(self, prompt: str) -> int:
        return prompt_class(prompt, self.class_names, self.null_class, self.folder)

    def latent_hw(self) -> tuple[int, int]:
        return _hw(self.unet.config.sample_size)

    @classmethod
    def image_seq_len(cls, folder: Path, cfg: ModelConfig) -> int:
        tc = _config(folder, "transformer")
        p, s = tc.get("patch_size", 2), tc.get("sample_size", 16)
        return (s // p) ** 2

    @classmethod
    def planner_shape(cls, config, vae_config, pixels, cfg, meta, folder):
        s = int(config.get("sample_size", 16))
        return {"latent": (config.get("in_channels", 1), s, s), "frames": 1, "latent_hw": (s, s), "tokens": 1}

    def encode_text(self, prompts: list[str]) -> Tensor:
        n = int(self.unet.config.joint_attention_dim)
        onehot = nn.functional.one_hot(torch.tensor([self.class_of(p) for p in prompts]), n).float()
        return pack_cond(onehot[:, None, :], onehot)

    def decoder(self) -> nn.Module:
        return PixelDecoder()

    @classmethod
    def load_decoder(cls, folder, cfg) -> nn.Module:
        return PixelDecoder()


DIRECTION_WORDS = {"left": ("left", "leftward", "leftwards"), "right": ("right", "rightward", "rightwards")}


def class_direction_tokens(labels: Tensor, directions: Tensor, dim: int, class_slots: int) -> Tensor:
    """``(B, 2, dim)`` context of ``pixel_video_flow``: a class token (one-hot of ``labels`` in dims
    ``0 .. class_slots − 1``, the null class included) and a direction token (one-hot of ``directions`` in the
    dims after them, the null direction included)."""
    cls = nn.functional.one_hot(labels, dim).float()
    dirs = nn.functional.one_hot(directions + class_slots, dim).float()
    return torch.stack([cls, dirs], dim=1)


COORDINATES = ("frame", "y", "x")


def with_cond_channels(x: Tensor, tokens: Tensor | None, coords: Sequence[str] = ()) -> Tensor:
    """``x (B, C, F, H, W)`` with conditioning channels concatenated: the context's summed one-hot vector
    ``tokens.sum(1)`` (B, D) as ``D`` constant channels (as Wan's image-to-video models take theirs), then one
    channel per name in ``coords`` (``frame``, ``y``, ``x``) holding that coordinate, from −1 to 1 across the
    clip. Wan's only positions are rotary, i.e. relative; the coordinate channels say where in the clip a
    token is, which a clip whose content moves to a place fixed by the frame index (and the direction) needs."""
    B, _, F, H, W = x.shape
    parts = [x]
    if tokens is not None:
        parts.append(tokens.sum(dim=1).to(x.dtype)[:, :, None, None, None].expand(B, tokens.shape[-1], F, H, W))
    for name in coords:
        n = {"frame": F, "y": H, "x": W}[name]
        shape = [1, 1, 1, 1, 1]
        shape[2 + COORDINATES.index(name)] = n
        parts.append(torch.linspace(-1, 1, n, dtype=x.dtype, device=x.device).view(shape).expand(B, 1, F, H, W))
    return torch.cat(parts, dim=1)


@MODELS.register("pixel_video_flow")
class PixelVideoFlowModel(WanModel):
    """A class- and direction-conditional ``WanTransformer3DModel`` on pixel video ``(B, C, F, H, W)`` (the toy
    world's ``moving-digits``): the context is two one-hot tokens, the class and the direction of motion
    (:func:`class_direction_tokens`), also given as constant input channels when ``rlr_model.json`` says
    ``cond_channels``, and coordinate channels (``coord_channels``: e.g. ``["frame", "x"]``) after them
    (:func:`with_cond_channels`); no VAE, no text encoder. Prompts name a class and / or a
    direction:
    ``"3 moving right"``, ``"three"`` (either direction), ``"moving left"`` (any digit), ``""`` (both null)."""

    detects_unet_class = False
    frozen_attributes = ()

    def load_parts(self) -> None:
        if self.cfg.resolution is not None:
            raise ModelError(f"model.resolution: pixel layouts sample at the model's size; {self.folder} is "
                             f"{self.meta.get('sample_size')}")
        m = self.meta
        need = [k for k in ("frames", "sample_size", "class_names", "directions") if k not in m]
        if need:
            raise ModelError(f"{self.folder / 'rlr_model.json'}: a pixel_video_flow model needs {need}")
        self.frames = int(m["frames"])
        if self.cfg.num_frames not in (None, self.frames):
            raise ModelError(f"model.num_frames: {self.cfg.num_frames} given, but {self.folder} is fixed at "
                             f"{self.frames} frames")
        self.class_names = [str(x).lower() for x in m["class_names"]]
        self.null_class = int(m.get("null_class", len(self.class_names)))
        self.directions = [str(x).lower() for x in m["directions"]]
        self.null_direction = int(m.get("null_direction", len(self.directions)))
        self.class_slots = self.null_class + 1
        dim = int(self.unet.config.text_dim)
        if self.class_slots + self.null_direction + 1 != dim:
            raise ModelError(f"{self.folder}: {self.class_slots} class and {self.null_direction + 1} direction slots "
                             f"do not fill the transformer's text_dim {dim}")
        self.cond_channels = int(m.get("cond_channels", 0))
        self.coords = tuple(m.get("coord_channels", ()))
        bad = [c for c in self.coords if c not in COORDINATES]
        if bad:
            raise ModelError(f"{self.folder / 'rlr_model.json'}: coord_channels {bad} unknown; choose from {COORDINATES}")
        c = self.unet.config
        if c.in_channels != c.out_channels + self.cond_channels + len(self.coords) or self.cond_channels not in (0, dim):
            raise ModelError(f"{self.folder}: in_channels {c.in_channels} ≠ out_channels {c.out_channels} + "
                             f"cond_channels {self.cond_channels} (0 or text_dim {dim}) + "
                             f"{len(self.coords)} coord_channels")

    def direction_of(self, prompt: str) -> int:
        words = set(re.findall(r"[a-z]+", prompt.lower()))
        hits = {i for i, d in enumerate(self.directions) if words & set(DIRECTION_WORDS.get(d, (d,)))}
        if len(hits) > 1:
            raise ModelError(f"prompt {prompt!r} names several directions; directions of {self.folder.name}: "
                             f"{self.directions}")
        return hits.pop() if hits else self.null_direction

    def class_of(self, prompt: str) -> int:
        """The class a prompt names; a prompt that names only a direction is the null class."""
        d = self.direction_of(prompt)
        rest = prompt if d == self.null_direction else re.sub(
            r"\b(" + "|".join(DIRECTION_WORDS.get(self.directions[d], (self.directions[d],))) + r"|moving|going)\b",
            " ", prompt.lower())
        return prompt_class(rest, self.class_names, self.null_class, self.folder)

    def latent_hw(self) -> tuple[int, int]:
        return _hw(self.meta["sample_size"])

    @classmethod
    def image_seq_len(cls, folder: Path, cfg: ModelConfig) -> int:
        return None

    @classmethod
    def planner_shape(cls, config, vae_config, pixels, cfg, meta, folder):
        h, w = _hw(meta.get("sample_size", 16))
        F = int(meta.get("frames", 8))
        return {"latent": (config.get("out_channels", 1), F, h, w), "frames": F, "latent_hw": (h, w), "tokens": 2}

    @classmethod
    def meta_inputs(cls, config, latent, tokens, class_conditional=False, device="meta"):
        (), kw = super().meta_inputs(config, latent, tokens, class_conditional, device)
        kw["hidden_states"] = torch.empty(1, config.get("in_channels", latent[0]), *latent[1:], device=device)
        return (), kw

    def latent_shape(self) -> tuple[int, ...]:
        return (self.unet.config.out_channels, self.frames, *self.latent_hw())

    def unet_forward(self, unet: nn.Module, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        x = with_cond_channels(x, cond if self.cond_channels else None, self.coords)
        return super().unet_forward(unet, x, t, cond)

    def encode_text(self, prompts: list[str]) -> Tensor:
        labels = torch.tensor([self.class_of(p) for p in prompts])
        dirs = torch.tensor([self.direction_of(p) for p in prompts])
        return class_direction_tokens(labels, dirs, int(self.unet.config.text_dim), self.class_slots)

    def decoder(self) -> nn.Module:
        return PixelDecoder()

    @classmethod
    def load_decoder(cls, folder, cfg) -> nn.Module:
        return PixelDecoder()
