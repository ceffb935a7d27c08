"""`rlr-dist plan`: per-GPU memory and a rough time per iteration for the sampler, reward and learner roles.

The architecture comes from the model folder (``unet/`` or ``transformer/``, ``vae/``, ``text_encoder*/`` configs)
or a named preset (``--arch sd15``, ``sd35-medium``, ``flux1-dev``, ``wan21-t2v-1.3b``, ...); the denoiser, VAE,
text encoders and reward CLIP are instantiated on PyTorch's ``meta`` device (no memory, no weights) and the
denoiser and VAE run once at the planned resolution / frames, with the call inputs the model's adapter gives
(:meth:`DiffusionModel.meta_inputs`). That pass gives exact parameter counts, LoRA sizes, FLOPs
(``torch.utils.flop_counter``) and the input shape of every *unit* (ResNet block, spatial / temporal
transformer, temporal conv, down/up sampler, VAE attention, CLIP layer, output head; for flow transformers the
joint / single / Wan transformer blocks, whose input is counted over image *and* text tokens, and the Wan video
VAE's residual, attention and resample blocks).

Activation bytes of one model call = Σ_units ``COEF[precision][mode][kind] × elements(unit)``, where the
coefficients are bytes that autograd saves per input element of a unit, measured once on tiny instances with
:class:`~rlr_dist.memory.SavedTensorMeter` (``rlr-dist bench plan`` re-measures them and checks whole
models against this sum; ``docs/results/plan.md``). Memory per role:

* learner: denoiser weights (bf16 when ``deepspeed.bf16``, or when the adapter holds frozen weights in bf16)
  + frozen VAE (fp32) / text encoders (fp32, or bf16 likewise) + the frozen reference copy (full fine-tuning)
  + trainable parameters' gradients (fp32; ÷ world at ZeRO ≥ 2) and AdamW state (m, v and, with bf16, an
  fp32 master copy; ÷ world at ZeRO ≥ 1; 0 with CPU offload; ZeRO-3 also partitions the weights) +
  activations of the longest back-propagated segment at the chunk size, × 2 with CFG. The estimator says how
  long that segment is (:meth:`Estimator.backprop`: model calls, calls per step, checkpointed or not);
  checkpointed (or ``model.gradient_checkpointing``): one call + the segment's inputs. Adapters that
  checkpoint per transformer block (:attr:`DiffusionModel.checkpoints_blocks`) keep every block's input of
  every call in the segment plus one block's activations (the one being recomputed).
* sampler: fp32 UNet (+ reference copy), text encoder, VAE; a no-grad working set (3 × the largest unit input).
* reward: VAE and vision-tower weights (the reward says which towers it runs, :meth:`Reward.vision_tower`);
  with ∂R/∂x₀ the saved activations of decoding the frames the reward reads (:meth:`Reward.reads_frames`; only
  those are decoded — a causal video VAE decodes the latent prefix up to the last frame read) and of the towers
  on them (VAE slicing does not lower these); without, a no-grad working set.

Nothing here names an estimator, reward or layout: each class answers for itself, so a plug-in plans unchanged.

The chunk (samples per sampler call, reward call and learner backward) is ``batch / max(samplers, learners)``.
Time: FLOPs / (peak × ``EFFICIENCY``) per role, roles in sequence — a rough estimate, not a benchmark.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field

import torch
from torch import nn

GB = 1e9
EFFICIENCY = 0.35        # achieved / peak dense tensor FLOPs assumed for every role
RESERVE_GB = 2.0         # CUDA context, cuBLAS workspaces, allocator fragmentation
INFER_FACTOR = 3         # no-grad working set: this many copies of the largest unit input


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float
    bf16_tflops: float   # dense; fp32 work is taken at half (TF32)


GPUS = {g.name: g for g in (
    GPU("a10g-24gb", 24, 70), GPU("l4-24gb", 24, 121), GPU("a100-40gb", 40, 312), GPU("a100-80gb", 80, 312),
    GPU("h100-80gb", 80, 989), GPU("h200-141gb", 141, 989))}

# Bytes autograd saves per input element of each unit kind: COEF[precision][mode][kind]. Modes: ``full`` (all
# weights trained), ``lora`` (frozen weights + LoRA on the attention projections), ``frozen`` (no trained weight;
# the VAE and CLIP under ∂R/∂x₀). Measured on CPU by rlr_dist.bench.planner.measure_coefficients() (diffusers
# 0.42.1, torch 2.13, SDPA attention); tests/test_plan.py checks that a fresh measurement still gives them.
_KINDS = ("ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D", "TemporalConvLayer",
          "TransformerTemporalModel", "Attention", "CLIPEncoderLayer",
          # flow-matching transformers (per image + text token element) and Wan's video VAE
          "JointTransformerBlock", "JointTransformerBlockDual", "FluxTransformerBlock", "FluxSingleTransformerBlock",
          "WanTransformerBlock", "WanResidualBlock", "WanAttentionBlock", "WanResample", "head")
_MEASURED = {
    "fp32": {
             "full": (24.19, 128.78, 4.0, 16.0, 48.03, 133.76, 32.16, 81.0,
                      98.55, 131.9, 99.55, 82.7, 120.24, 39.0, 24.12, 16.0, 12.03),
             "lora": (24.06, 112.03, 4.0, 16.0, 48.03, 109.76, 34.16, 57.0,
                      58.8, 84.2, 59.8, 52.45, 79.32, 35.25, 24.38, 16.0, 12.03),
             "frozen": (24.06, 99.78, 4.0, 16.0, 48.03, 97.76, 20.16, 57.0,
                      50.8, 71.4, 51.8, 46.95, 67.75, 35.25, 24.38, 16.0, 12.03),
    },
    "bf16": {
             "full": (18.38, 70.28, 3.12, 9.12, 29.53, 72.51, 18.66, 56.68,
                      81.75, 115.03, 78.75, 63.4, 89.74, 34.38, 14.62, 8.56, 10.17),
             "lora": (18.31, 70.12, 3.12, 9.12, 29.53, 72.76, 21.78, 40.68,
                      55.6, 82.1, 52.6, 42.7, 63.51, 32.62, 14.88, 8.56, 10.17),
             "frozen": (18.31, 55.28, 3.12, 9.12, 29.53, 54.51, 12.66, 40.68,
                      48.0, 66.9, 45.0, 35.65, 49.25, 32.62, 14.88, 8.56, 10.17),
    },
}
COEF = {p: {m: dict(zip(_KINDS, v)) for m, v in modes.items()} for p, modes in _MEASURED.items()}
UNIT_KINDS = _KINDS[:-1]
# units whose input is the image stream *and* the text stream (``encoder_hidden_states``): both are counted
JOINT_KINDS = ("JointTransformerBlock", "JointTransformerBlockDual", "FluxTransformerBlock", "FluxSingleTransformerBlock")
# Wan blocks are calibrated at ffn_dim = 4·dim; the published models have 5.83 (1.3B) and 2.70 (14B): profile()
# scales a block's count by its ffn ratio (measured on tiny blocks: the saved bytes are linear in it)


def unit_kind(module: nn.Module) -> str:
    """The coefficient kind of a module: its class name (SD3.5's dual-attention joint blocks apart)."""
    name = type(module).__name__
    return name + "Dual" if name == "JointTransformerBlock" and getattr(module, "use_dual_attention", False) else name

# ------------------------------------------------------------------------------------------- architectures
_SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
_CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    max_position_embeddings=77, vocab_size=49408)
_OPENCLIP_H_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                        max_position_embeddings=77, vocab_size=49408, projection_dim=1024)
_SD_UNET = dict(in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, norm_num_groups=32)
_T2V_UNET = dict(in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                 down_block_types=["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"],
                 up_block_types=["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3, norm_num_groups=32,
                 cross_attention_dim=1024, attention_head_dim=64, sample_size=32)
# The published configs of these models (only the keys that differ from diffusers' defaults).
PRESETS = {
    "sd15": dict(unet_class="UNet2DConditionModel", text=_CLIP_L_TEXT, vae=_SD_VAE, frames=1,
                 unet={**_SD_UNET, "cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64}),
    "sd21": dict(unet_class="UNet2DConditionModel", text=_OPENCLIP_H_TEXT, vae=_SD_VAE, frames=1,
                 unet={**_SD_UNET, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
                       "use_linear_projection": True, "sample_size": 96}),
    "modelscope": dict(unet_class="UNet3DConditionModel", text=_OPENCLIP_H_TEXT, vae=_SD_VAE, frames=16,
                       unet=_T2V_UNET),
    "zeroscope": dict(unet_class="UNet3DConditionModel", text=_OPENCLIP_H_TEXT, vae=_SD_VAE, frames=24,
                      unet=_T2V_UNET, resolution=[320, 576]),
}
# Flow-matching transformers. Configs as published in the models' diffusers folders (transformer/, vae/,
# text_encoder*/config.json) — only the keys that differ from the library defaults:
#   stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev, Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers.
_CLIP_L_PROJ = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    max_position_embeddings=77, vocab_size=49408, projection_dim=768)
_CLIP_G_PROJ = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu")
_T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
_UMT5_XXL = {**_T5_XXL, "vocab_size": 256384}
_FLOW_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                 layers_per_block=2, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
                 use_post_quant_conv=False)
_WAN_13B = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
_WAN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True], scale_factor_temporal=4, scale_factor_spatial=8)
PRESETS.update({
    "sd35-medium": dict(unet_class="SD3Transformer2DModel", vae=_FLOW_VAE, frames=1,
                        text=[("CLIPTextModelWithProjection", _CLIP_L_PROJ), ("CLIPTextModelWithProjection", _CLIP_G_PROJ),
                              ("T5EncoderModel", _T5_XXL)],
                        unet=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                                  dual_attention_layers=list(range(13)), qk_norm="rms_norm")),
    "flux1-dev": dict(unet_class="FluxTransformer2DModel", vae=_FLOW_VAE, frames=1,
                      text=[("CLIPTextModel", _CLIP_L_TEXT), ("T5EncoderModel", _T5_XXL)],
                      unet=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                guidance_embeds=True, axes_dims_rope=[16, 56, 56])),
    "wan21-t2v-1.3b": dict(unet_class="WanTransformer3DModel", vae=_WAN_VAE, vae_class="AutoencoderKLWan", frames=81,
                           text=[("UMT5EncoderModel", _UMT5_XXL)], unet=_WAN_13B),
    "wan21-t2v-14b": dict(unet_class="WanTransformer3DModel", vae=_WAN_VAE, vae_class="AutoencoderKLWan", frames=81,
                          text=[("UMT5EncoderModel", _UMT5_XXL)],
                          unet={**_WAN_13B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}),
})
TEXT_TOKENS = 77


class PlanError(ValueError):
    """The plan cannot be made (unknown GPU / preset, unreadable architecture); the message says what to pass."""


@dataclass
class Arch:
    """What the planner needs of a model: component configs, the latent shape of one sample, the text length."""

    unet_class: str                     # the denoiser's diffusers class (a UNet or a transformer)
    unet: dict                          # its config
    layout: str = ""                    # the model adapter (registered layout) that runs it
    vae: dict | None = None
    text: list | None = None            # [(transformers class, config)] of the frozen text encoders
    frames: int = 1                     # decoded video frames (1 for images)
    latent_hw: tuple[int, int] = (64, 64)
    tokens: int = TEXT_TOKENS
    class_conditional: bool = False
    vae_class: str = "AutoencoderKL"
    latent: tuple[int, ...] = ()        # the latent of one sample (no batch dim)
    temporal: int = 1                   # a causal video VAE's frames per latent frame (1: frame-wise decoding)


def _hw(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _vae_factor(vae: dict | None) -> int:
    return 2 ** (len(vae["block_out_channels"]) - 1) if vae else 1


def _text_list(text) -> list | None:
    """Text encoders as ``[(class, config)]`` (a bare dict is a CLIP text encoder, as the UNet presets write it)."""
    if text is None:
        return None
    return [("CLIPTextModel", text)] if isinstance(text, dict) else [tuple(t) for t in text]


def _folder_text(folder, read) -> list | None:
    """``[(class, config)]`` of every ``text_encoder*`` the folder's ``model_index.json`` names."""
    index = folder / "model_index.json"
    entries = json.loads(index.read_text()) if index.is_file() else {}
    out = []
    for key in sorted(k for k in entries if k.startswith("text_encoder")):
        spec, conf = entries[key], read(key)
        if isinstance(spec, list) and len(spec) == 2 and spec[1] and conf is not None:
            out.append((spec[1], conf))
    if not out and read("text_encoder") is not None:
        out = [("CLIPTextModel", read("text_encoder"))]
    return out or None


def arch_of(model_cfg, preset: str | None = None) -> Arch:
    """The architecture of ``model_cfg.path`` (a local / toy folder), or of ``preset``; resolution and frames
    from the model config when it sets them. The latent of one sample, the decoded frames and the text length
    come from the model's adapter where it defines them (:meth:`DiffusionModel.planner_shape`)."""
    from rlr_dist.models import MODELS

    folder = None
    if preset is not None:
        if preset not in PRESETS:
            raise PlanError(f"--arch: unknown preset {preset!r}; one of {sorted(PRESETS)}")
        from rlr_dist.models.base import layout_of_unet_class

        p = copy.deepcopy(PRESETS[preset])
        res = model_cfg.resolution or p.pop("resolution", None)
        a = Arch(p["unet_class"], p["unet"], layout_of_unet_class(p["unet_class"]), p["vae"], _text_list(p["text"]),
                 p["frames"], vae_class=p.get("vae_class", "AutoencoderKL"))
        meta: dict = {}
    else:
        from rlr_dist.models import ModelError, detect_layout, resolve_model_folder

        try:
            folder = resolve_model_folder(model_cfg.path) if not str(model_cfg.path).startswith("s3://") else None
        except ModelError:
            folder = None
        if folder is None:
            raise PlanError(f"model.path {model_cfg.path!r} is not a local folder: pass --arch "
                            f"{{{','.join(sorted(PRESETS))}}} (or --model.path=LOCAL_COPY)")
        read = lambda sub: json.loads((folder / sub / "config.json").read_text()) if (folder / sub / "config.json").is_file() else None  # noqa: E731
        layout = detect_layout(folder)[0]
        cls = MODELS.get(layout, "model.layout")
        unet = read(cls.denoiser_folder)
        vae = read("vae")
        meta = json.loads((folder / "rlr_model.json").read_text()) if (folder / "rlr_model.json").is_file() else {}
        a = Arch(unet["_class_name"], unet, layout, vae, _folder_text(folder, read), int(meta.get("frames", 16)),
                 vae_class=(vae or {}).get("_class_name", "AutoencoderKL"))
        res = model_cfg.resolution
        a.class_conditional = unet.get("num_class_embeds") is not None
        if a.text is not None:
            a.tokens = int(a.text[0][1].get("max_position_embeddings", TEXT_TOKENS))
    cls = MODELS.get(a.layout, "model.layout")
    shape = cls.planner_shape(a.unet, a.vae, None if res is None else _hw(res), model_cfg, meta, folder)
    if shape is not None:  # the adapter's own shapes (flow transformers)
        a.latent, a.frames, a.latent_hw, a.tokens, a.temporal = (shape["latent"], shape["frames"], shape["latent_hw"],
                                                                 shape["tokens"], shape.get("temporal", 1))
        return a
    if a.unet_class != "UNet3DConditionModel":
        a.frames = 1
    elif model_cfg.num_frames:
        a.frames = int(model_cfg.num_frames)
    f = _vae_factor(a.vae)
    if res is not None:
        h, w = _hw(res)
        a.latent_hw = (h // f, w // f)
    elif a.unet.get("sample_size") is not None:
        a.latent_hw = _hw(a.unet["sample_size"])
    else:
        a.latent_hw = tuple(s // f for s in _hw(a.vae["sample_size"]))
    c = a.unet.get("in_channels", 4)
    a.latent = (c, a.frames, *a.latent_hw) if a.unet_class == "UNet3DConditionModel" else (c, *a.latent_hw)
    return a


# ------------------------------------------------------------------------------------- the meta-device pass
@dataclass
class Profile:
    """One call of a network for a batch of 1 (frames folded in): parameters, FLOPs, unit input elements."""

    params: int
    flops: float
    units: list[tuple[str, int]] = field(default_factory=list)   # (kind, input elements)

    def saved_bytes(self, precision: str, mode: str) -> float:
        return sum(COEF[precision][mode][k] * n for k, n in self.units)

    def largest_input(self) -> int:
        return max((n for _, n in self.units), default=0)

    def unit_inputs(self) -> int:
        """Elements of every block's input: what per-block checkpointing keeps of one call."""
        return sum(n for k, n in self.units if k != "head")

    def head_saved(self, precision: str, mode: str) -> float:
        """Saved bytes of the output head, which per-block checkpointing does not recompute."""
        return sum(COEF[precision][mode][k] * n for k, n in self.units if k == "head")

    def largest_saved(self, precision: str, mode: str) -> float:
        """Saved bytes of the largest unit: one block recomputed in backward under per-block checkpointing."""
        return max((COEF[precision][mode][k] * n for k, n in self.units), default=0.0)


def _build(cls_name: str, config: dict) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, cls_name)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return cls.from_config(cfg)


def profile(module: nn.Module, call) -> Profile:
    """Run ``call(module)`` on meta tensors, recording FLOPs and the input size of every outermost unit."""
    from torch.utils.flop_counter import FlopCounterMode

    units: list[tuple[str, int]] = []
    names = {n: unit_kind(m) for n, m in module.named_modules()}
    unit_names = [n for n, k in names.items() if k in UNIT_KINDS]
    outer = [n for n in unit_names if not any(n.startswith(u + ".") for u in unit_names if u != n)]
    # output heads outside every unit: GroupNorm -> activation -> conv (UNet conv_norm_out, VAE decoder's), and
    # Wan's norm -> modulation -> proj_out, which saves about as much per element (measured 12.4 B in fp32)
    heads = [n for n, k in names.items() if not any(n.startswith(u + ".") for u in unit_names) and (
             (k == "GroupNorm" and n.split(".")[-1] in ("conv_norm_out", "norm_out"))
             or (k == "FP32LayerNorm" and n == "norm_out"))]

    def hook(kind):
        def pre(mod, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            n = x.numel()
            if kind == "ResnetBlock2D":  # saves ~3 tensors of the input width and ~3 of the output width
                n = n * (mod.in_channels + mod.out_channels) // (2 * mod.in_channels)
            if kind == "TransformerTemporalModel":  # saves in proportion to its inner width (heads × head dim),
                n = n * mod.proj_in.out_features // mod.proj_in.in_features  # which UNet3D's transformer_in widens
            if kind == "WanTransformerBlock":  # calibrated at ffn_dim = 4·dim; each further ffn width saves 8/120
                proj = mod.ffn.net[0].proj  # of the block's bytes (measured: linear in the ratio, 88 + 8·r B/elem);
                ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)  # cross-attention
                n = int(n * (11 + proj.out_features / proj.in_features) / 15  # keys and values over the text:
                        + (0 if ctx is None else ctx.numel() / 6))             # ~20 B per text element (measured)
            if kind in JOINT_KINDS:  # the text stream goes through the block beside the image tokens
                ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                n += 0 if ctx is None else ctx.numel()
            units.append((kind, int(n)))
        return pre

    mods = dict(module.named_modules())
    handles = [mods[n].register_forward_pre_hook(hook(names[n]), with_kwargs=True) for n in outer]
    handles += [mods[n].register_forward_pre_hook(hook("head"), with_kwargs=True) for n in heads]
    try:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            call(module)
    finally:
        for h in handles:
            h.remove()
    return Profile(sum(p.numel() for p in module.parameters()), float(fc.get_total_flops()), units)


def unet_profile(a: Arch) -> tuple[Profile, nn.Module]:
    """One denoiser call for a batch of 1, with the inputs the model's adapter gives (:meth:`meta_inputs`)."""
    from rlr_dist.models import MODELS

    unet = _build(a.unet_class, a.unet)
    args, kw = MODELS.get(a.layout, "model.layout").meta_inputs(a.unet, a.latent, a.tokens, a.class_conditional)
    return profile(unet, lambda m: m(*args, **kw)), unet


def vae_decoder_profile(a: Arch, latent_frames: int | None = None) -> tuple[Profile, int]:
    """Decoding one image (a frame-wise VAE) or one clip of ``latent_frames`` latent frames (a causal video VAE);
    and the VAE's whole parameter count (the reward actor loads encoder + decoder)."""
    vae = _build(a.vae_class, a.vae)
    if a.temporal > 1:
        z = torch.empty(1, a.latent[0], latent_frames or a.latent[1], *a.latent_hw, device="meta")
    else:
        z = torch.empty(1, a.vae.get("latent_channels", 4), *a.latent_hw, device="meta")
    return profile(vae, lambda m: m.decode(z)), sum(p.numel() for p in vae.parameters())


def clip_profile(config: dict) -> Profile:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**{k: v for k, v in config.items()
                                                                 if not k.startswith("_")}))
    s = int(config.get("image_size", 224))
    px = torch.empty(1, 3, s, s, device="meta")
    return profile(clip, lambda m: m(pixel_values=px))


def text_params(text: list | dict | None) -> int:
    """Parameters of the frozen text encoders (``[(transformers class, config)]``), counted on the meta device."""
    import transformers

    total = 0
    for cls_name, config in _text_list(text) or []:
        cls = getattr(transformers, cls_name)
        with torch.device("meta"):
            m = cls(cls.config_class(**{k: v for k, v in config.items() if not k.startswith("_")}))
        total += sum(p.numel() for p in m.parameters())
    return total


def lora_params(unet: nn.Module, rank: int, targets: list[str]) -> int:
    """peft's LoRA size: ``r × (in + out)`` per adapted Linear, ``r × (in·k² + out)`` per Conv2d."""
    total = 0
    for name, m in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(m, nn.Linear):
            total += rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            total += rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups + m.out_channels)
    return total


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Role:
    name: str
    memory: dict[str, float]        # component -> bytes
    seconds: float
    gpus: float                     # GPUs per actor (Ray num_gpus)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.memory.values())


_CACHE: dict = {}


def _profiles(arch: Arch):
    """UNet profile and meta module, text-encoder size, VAE decoder profile and size (cached per architecture)."""
    key = repr(arch)
    if key not in _CACHE:
        vae = vae_decoder_profile(arch) if arch.vae else (None, 0)
        _CACHE[key] = (*unet_profile(arch), text_params(arch.text), *vae)
    return _CACHE[key]


def estimator_backprop(cfg):
    """``(estimator, Backprop)`` of ``cfg``: what one optimiser step back-propagates. The estimator first sees
    the chain (``check``): for flow samplers on every stochastic window the run can draw — deterministic steps
    it absorbs lengthen its pathwise segments — and the largest of those is taken; for DDIM / DDPM once (a
    deterministic last step carries no KL call). The chain's σ > 0 pattern is all that matters here, so a
    uniform grid with the configured transition (or η and last-step η) stands in for the scheduler's."""
    from rlr_dist.chain.flow import FlowSchedule

    est, reg, m = cfg.make_estimator(), cfg.make_regulariser(), cfg.model
    T = m.num_inference_steps
    if m.sampler != "flow":  # a DDIM / DDPM chain with the config's σ > 0 pattern (a deterministic last step)
        from rlr_dist.chain.schedule import GaussianSchedule

        stand_in = GaussianSchedule.from_alpha_bars(torch.linspace(0.999, 0.01, T + 1),
                                                    eta=m.eta if m.sampler == "ddim" else 1.0,
                                                    last_step_eta=m.last_step_eta)
        try:
            est.check(stand_in)
        except ValueError as e:
            raise PlanError(f"estimator: {str(e).removeprefix('estimator: ')}") from None
        return est, est.backprop(T, reg)
    base = FlowSchedule.from_flow_times(torch.linspace(1, 0, T + 1), m.flow.transition, m.eta)
    worst = None
    for w in m.flow.window.windows(T):
        try:
            est.check(base.with_window(w))
        except ValueError as e:
            raise PlanError(f"estimator: {str(e).removeprefix('estimator: ')} (window {sorted(w) if w else 'all'})") from None
        b = est.backprop(T, reg)
        worst = b if worst is None else type(b)(max(worst.segment, b.segment), max(worst.steps, b.steps),
                                                 max(worst.calls, b.calls), b.checkpointed,
                                                 max(worst.forward_calls, b.forward_calls),
                                                 max(worst.reference, b.reference))
    return est, worst


def segment_bytes(bp, call: float, reference_call: float) -> float:
    """Activations of an un-checkpointed pathwise segment: its trained-model calls hold ``call`` each, its
    reference-model calls (the exact KL's, differentiated in their input only) ``reference_call`` each."""
    return (bp.segment - bp.reference) * call + bp.reference * reference_call


def plan(cfg, gpu: str, arch: Arch) -> list[Role]:
    """The three roles of ``cfg`` (a TrainConfig) on ``gpu``. Nothing is loaded: the reward is asked what it
    reads from its parameters alone, so planning works before its weights are staged."""
    from rlr_dist.models import MODELS

    if gpu not in GPUS:
        raise PlanError(f"--gpu: unknown GPU {gpu!r}; one of {sorted(GPUS)}")
    g = GPUS[gpu]
    m, ds, c, t = cfg.model, cfg.deepspeed, cfg.cluster, cfg.train
    bf16 = m.mixed_precision == "bf16" or ds.bf16
    prec = "bf16" if bf16 else "fp32"
    flops_per_s = g.bf16_tflops * 1e12 * EFFICIENCY * (1.0 if bf16 else 0.5)
    T = m.num_inference_steps
    cfg_mult = 2 if m.guidance_scale != 1.0 else 1
    chunks = max(c.samplers.count, c.learners.count)
    chunk = math.ceil(t.batch_size / chunks)
    world = c.learners.count

    up, unet, n_text, vae_p, n_vae = _profiles(arch)
    n_unet = up.params
    layout = MODELS.get(arch.layout, "model.layout")
    targets = m.lora.target_modules or layout.default_lora_targets
    n_train = lora_params(unet, m.lora.rank, targets) if m.finetune == "lora" else n_unet
    latent = math.prod(arch.latent) * 4
    mode = "full" if m.finetune == "full" else "lora"
    call = up.saved_bytes(prec, mode) * chunk * cfg_mult      # one (CFG) model call at the chunk size
    # adapters that hold frozen weights (and text encoders) in bf16 under bf16 + LoRA (transformer layouts)
    bf16_weights = layout.bf16_weights and m.mixed_precision == "bf16" and m.finetune == "lora"
    text_gpu = 0 if m.text_encoder_device == "cpu" else n_text * (2 if bf16_weights else 4)
    frozen = text_gpu + n_vae * 4
    per_block = m.gradient_checkpointing and layout.checkpoints_blocks

    # learner
    est, bp = estimator_backprop(cfg)
    seg, bp_calls, ckpt = bp.segment, bp.calls, bp.checkpointed
    if per_block:  # every block input of the segment's calls kept, one block's activations at a time
        kept = (up.unit_inputs() * (2 if bf16_weights else 4) + up.head_saved(prec, mode)) * chunk * cfg_mult
        block = up.largest_saved(prec, mode) * chunk * cfg_mult
        act = (kept + bp.steps * latent * chunk * cfg_mult if ckpt else seg * kept) + block
        recompute = 4 / 3
    elif m.gradient_checkpointing or ckpt:  # one call's activations + the inputs kept per checkpoint
        act = call + (bp.steps if ckpt else seg) * latent * chunk * cfg_mult
        recompute = 4 / 3
    else:
        act, recompute = segment_bytes(bp, call, up.saved_bytes(prec, "frozen") * chunk * cfg_mult), 1.0
    zero3 = ds.zero_stage == 3
    weights = n_unet * (2 if ds.bf16 or bf16_weights else 4) / (world if zero3 else 1)
    grads = n_train * 4 / (world if ds.zero_stage >= 2 else 1)
    optim = 0.0 if ds.offload_optimizer else n_train * (12 if ds.bf16 else 8) / (world if ds.zero_stage >= 1 else 1)
    learner_mem = {"unet weights": weights, "frozen vae + text encoder": frozen,
                   "reference unet (full fine-tuning)": n_unet * 4 if m.finetune == "full" else 0.0,
                   "gradients": grads, "optimizer state": optim, "activations": act,
                   "trajectory": 3 * T * latent * chunk}
    per_learner = math.ceil(chunks / world)
    learner_s = per_learner * (bp_calls * 3 * recompute + bp.forward_calls) * cfg_mult * chunk * up.flops / flops_per_s
    how = " (checkpointed per block)" if per_block else " (checkpointed)" if m.gradient_checkpointing or ckpt else ""
    learner = Role("learner", learner_mem, learner_s, c.learners.num_gpus,
                   [f"{n_train / 1e6:.2f} M trainable of {n_unet / 1e6:.0f} M; chunk {chunk}; longest segment "
                    f"{seg} call(s){how}; {bp_calls} calls back-propagated"])

    # sampler
    work = INFER_FACTOR * up.largest_input() * chunk * cfg_mult * (2 if bf16 else 4)
    wb = 2 if bf16_weights else 4
    sampler_mem = {f"unet weights ({'bf16' if bf16_weights else 'fp32'})": n_unet * wb * (2 if m.finetune == "full" else 1) + n_train * 4 * (m.finetune == "lora"),
                   "frozen vae + text encoder": frozen, "working set": work, "trajectory": 3 * T * latent * chunk}
    sampler_s = math.ceil(chunks / c.samplers.count) * T * 2 * cfg_mult * chunk * up.flops / flops_per_s
    sampler = Role("sampler", sampler_mem, sampler_s, c.samplers.num_gpus, ["with the reference model each step (KL)"])

    # reward
    rspec = cfg.reward
    reward_cls = rspec.cls
    need_grad = est.needs_reward_grad
    read = reward_cls.reads_frames(rspec.params, arch.frames) if arch.frames > 1 else None
    frames = arch.frames if read is None else len(read)
    towers = []
    for conf in reward_cls.vision_tower(rspec.params):
        key = repr(conf)
        towers.append(_CACHE.get(key) or _CACHE.setdefault(key, clip_profile(conf)))
    scored = chunk * frames
    if arch.temporal > 1:  # a causal video VAE decodes the latent prefix up to the last frame read, per clip
        last = arch.frames - 1 if read is None else max(read)
        prefix = 1 + -(-last // arch.temporal)
        key = (repr(arch), "prefix", prefix)
        vae_p = _CACHE.get(key) or _CACHE.setdefault(key, vae_decoder_profile(arch, prefix)[0])
        images = chunk
        notes = [f"{images} clip(s) decoded per chunk (latent frames 0..{prefix - 1} of {arch.latent[1]}: the "
                 f"prefix up to frame {last}), {scored} frames scored"]
    else:
        images = scored
        notes = [f"{images} image(s) decoded per chunk, {scored} scored"]
    reward_mem = {"vae weights": n_vae * 4, "vision tower weights": sum(t.params for t in towers) * 4}
    fl = images * (vae_p.flops if vae_p else 0) + scored * sum(t.flops for t in towers)
    if need_grad:
        # vae_slicing with a frame-wise VAE: ∂R/∂images first, then the decoder one image at a time (a 2nd decode)
        sliced = m.vae_slicing and arch.temporal == 1
        reward_mem["vae decode activations"] = ((1 if sliced else images) * vae_p.saved_bytes("fp32", "frozen")
                                                if vae_p else 0.0)
        reward_mem["vision tower activations"] = scored * sum(t.saved_bytes("fp32", "frozen") for t in towers)
        fl *= 4 if sliced else 3
        if sliced:
            note = "∂R/∂x₀: the decoder differentiated one image at a time (vae_slicing: a second decode)"
        else:
            note = "∂R/∂x₀: every decoded frame stays in the graph" + ("" if arch.temporal > 1 else
                                                                        " (vae_slicing: one image at a time)")
        notes.append(note + "; only the frames the reward reads are decoded")
    else:
        per = 1 if m.vae_slicing else images
        reward_mem["working set"] = INFER_FACTOR * 4 * max(per * (vae_p.largest_input() if vae_p else 0),
                                                            scored * max((t.largest_input() for t in towers), default=0))
    reward_s = math.ceil(chunks / c.rewards.count) * fl / (g.bf16_tflops * 1e12 * EFFICIENCY * 0.5)
    reward = Role("reward", reward_mem, reward_s, c.rewards.num_gpus, notes)
    return [sampler, reward, learner]


def usable_bytes(gpu: str, share: float) -> float:
    """Memory a role may use: its share of the GPU (fractional GPUs share one card) minus the reserve."""
    return min(share, 1.0) * GPUS[gpu].memory_gb * GB - RESERVE_GB * GB


# Candidate changes per role, as config overrides, in the order they are tried (cheapest to the recipe first).
def _candidates(cfg, role: str) -> list[list[str]]:
    m, ds, c = cfg.model, cfg.deepspeed, cfg.cluster
    out: list[list[str]] = []
    if role == "learner":
        if not m.gradient_checkpointing:
            out.append(["--model.gradient_checkpointing=true"])
        if not ds.bf16:
            out.append(["--model.mixed_precision=bf16", "--deepspeed.bf16=true"])
        for stage in range(ds.zero_stage + 1, 4 if m.finetune == "full" else 3):
            out.append([f"--deepspeed.zero_stage={stage}"])
        if ds.zero_stage >= 1 and not ds.offload_optimizer:
            out.append(["--deepspeed.offload_optimizer=true"])
        if m.finetune == "full":
            out.append(["--model.finetune=lora", "--deepspeed.zero_stage=2"])
        elif m.lora.rank > 4:
            out.append([f"--model.lora.rank={m.lora.rank // 2}"])
        out += cfg.make_estimator().memory_overrides()
        if m.text_encoder_device != "cpu":
            out.append(["--model.text_encoder_device=cpu"])
        out.append([f"--cluster.learners.count={2 * c.learners.count}"])
    else:
        out.append([f"--cluster.samplers.count={2 * c.samplers.count}"])
        if role == "reward" and c.rewards.num_gpus < 1:
            out.append(["--cluster.rewards.num_gpus=1"])
        if role == "sampler" and m.mixed_precision != "bf16":
            out.append(["--model.mixed_precision=bf16"])
        if role == "sampler" and m.text_encoder_device != "cpu":
            out.append(["--model.text_encoder_device=cpu"])
        if role == "reward" and not m.vae_slicing:
            out.append(["--model.vae_slicing=true"])
    return out


@dataclass
class Verdict:
    role: Role
    fits: bool                                        # as planned, or after ``fix``
    usable: float
    fix: list[str] = field(default_factory=list)      # overrides (greedy) after which it fits; [] when it fits
    fixed_total: float | None = None


def verdicts(cfg, gpu: str, arch: Arch) -> list[Verdict]:
    """Each role's plan, whether it fits, and (when not) a greedy set of overrides after which it does."""
    from rlr_dist.config import ConfigError, apply_overrides, build, to_dict
    from rlr_dist.train.config import TrainConfig

    out = []
    for role in plan(cfg, gpu, arch):
        v = Verdict(role, False, usable_bytes(gpu, role.gpus or 1.0))
        v.fits = role.total <= v.usable
        cur, over = cfg, role.total - v.usable
        while over > 0:  # greedy: apply the change that lowers the overshoot most, until it fits
            best = None
            for ov in _candidates(cur, role.name):
                try:
                    nxt = build(TrainConfig, apply_overrides(to_dict(cur), ov))
                except ConfigError:
                    continue
                r = next(x for x in plan(nxt, gpu, arch) if x.name == role.name)
                o = r.total - usable_bytes(gpu, r.gpus or 1.0)
                if best is None or o < best[0]:
                    best = (o, ov, nxt, r.total)
            if best is None or best[0] >= over - 1e6:  # stop unless a change saves at least 1 MB
                break
            over, ov, cur, v.fixed_total = best
            keys = {o.split("=")[0] for o in ov}
            v.fix = [o for o in v.fix if o.split("=")[0] not in keys] + ov
        v.fits = over <= 0
        out.append(v)
    return out


def report(path: str, gpu: str, overrides: list[str] | None = None, preset: str | None = None) -> tuple[str, bool]:
    """The text `rlr-dist plan` prints, and whether every GPU role fits."""
    from rlr_dist.train.config import load_config

    cfg = load_config(path, overrides)
    arch = arch_of(cfg.model, preset)
    vs = verdicts(cfg, gpu, arch)
    g = GPUS[gpu]
    lines = [f"plan for {path} on {gpu} ({g.memory_gb:g} GB, {g.bf16_tflops:g} bf16 TFLOPS dense); "
             f"latent {'x'.join(str(v) for v in arch.latent)}" + (f", {arch.frames} frames" if arch.frames > 1 else "")
             + f", T={cfg.model.num_inference_steps}, batch {cfg.train.batch_size}"]
    ok = True
    for v in vs:
        r = v.role
        where = f"{r.gpus:g} GPU" if r.gpus else "CPU (num_gpus 0: no GPU verdict)"
        fits_now = r.total <= v.usable
        status = ("fits" if fits_now else "DOES NOT FIT") if r.gpus else "-"
        ok &= fits_now or not r.gpus
        lines.append(f"\n{r.name}  [{where}]  {r.total / GB:.2f} GB of {v.usable / GB:.1f} GB usable: {status}; "
                     f"~{r.seconds:.1f} s / iteration")
        for k, b in r.memory.items():
            if b:
                lines.append(f"    {k:<34} {b / GB:9.3f} GB")
        lines += [f"    note: {n}" for n in r.notes]
        if r.gpus and r.total > v.usable:
            if v.fix and v.fits:
                lines.append(f"    to fit ({v.fixed_total / GB:.2f} GB): {' '.join(v.fix)}")
            else:
                lines.append(f"    no tried change fits it (tried: {' '.join(v.fix) or 'nothing applicable'}); "
                             "use a larger GPU or a smaller batch / resolution / frames")
    lines.append(f"\nTimes assume {EFFICIENCY:.0%} of peak tensor FLOPs (fp32 at TF32 = half of bf16) and roles in "
                 "sequence: a rough estimate. Memory adds a "
                 f"{RESERVE_GB:g} GB reserve per GPU; activations calibrated on CPU (docs/results/plan.md).")
    return "\n".join(lines), ok
