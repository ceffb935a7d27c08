"""Tiny random models of every layout, saved in the exact folder format of the real ones.

Tests, config validation and the memory planner stand on these: they go through the same
``save_pretrained`` / ``from_pretrained`` path as a downloaded Stable Diffusion or text-to-video model.
``rlr-dist`` never downloads them; they are built from config in a second.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rlr_dist import storage

TINY_LAYOUTS = ("pixel", "pixel_video", "sd", "t2v")
TEXT_DIM = 32
MAX_TOKENS = 16


def _tokenizer():
    """A character-level CLIP tokenizer built here (byte-level alphabet, no merges): no download."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS), len(vocab)


def _text_parts(tmp: Path):
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab_size = _tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=vocab_size, max_position_embeddings=MAX_TOKENS, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    return tokenizer, text_encoder


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _write(layout: str, tmp: Path, frames: int) -> None:
    from diffusers import (DDPMPipeline, StableDiffusionPipeline, TextToVideoSDPipeline, UNet2DConditionModel,
                           UNet2DModel, UNet3DConditionModel)

    if layout in ("pixel", "pixel_video"):
        C = frames if layout == "pixel_video" else 1
        unet = UNet2DModel(sample_size=(8, 12) if layout == "pixel_video" else 8, in_channels=C, out_channels=C,
                           block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=3)
        DDPMPipeline(unet=unet, scheduler=_scheduler()).save_pretrained(tmp)
        meta = {"layout": layout, "conditioning": "class", "num_classes": 2, "null_class": 2,
                "class_names": ["zero", "one"], "channels": 1}
        if layout == "pixel_video":
            meta["frames"] = frames
        (tmp / "rlr_model.json").write_text(json.dumps(meta, indent=1))
        return
    tokenizer, text_encoder = _text_parts(tmp)
    common = dict(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=TEXT_DIM,
                  attention_head_dim=8, norm_num_groups=8, in_channels=4, out_channels=4, sample_size=8)
    if layout == "sd":
        unet = UNet2DConditionModel(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **common)
        pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif layout == "t2v":
        unet = UNet3DConditionModel(down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), **common)
        pipe = TextToVideoSDPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                     scheduler=_scheduler())
        (tmp / "rlr_model.json").write_text(json.dumps({"layout": "t2v", "frames": frames}, indent=1))
    else:
        raise ValueError(f"tiny model layout must be one of {TINY_LAYOUTS}, got {layout!r}")
    pipe.save_pretrained(tmp)


def build_tiny(layout: str, folder: str | Path, seed: int = 0, frames: int = 3) -> Path:
    """Save a tiny random model of ``layout`` as a diffusers folder (with manifest) at ``folder``."""
    if layout not in TINY_LAYOUTS:
        raise ValueError(f"tiny model layout must be one of {TINY_LAYOUTS}, got {layout!r}")
    torch.manual_seed(seed)
    storage.atomic_dir(folder, lambda tmp: _write(layout, Path(tmp), frames),
                       {"made_by": {"function": "rlr_dist.models.tiny.build_tiny", "layout": layout, "seed": seed}})
    return Path(folder)
