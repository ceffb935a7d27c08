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
TINY_FLOW_LAYOUTS = ("sd3", "flux", "wan", "pixel_flow", "pixel_video_flow")   # flow-matching transformers (model.sampler: flow)
TEXT_DIM = 32
MAX_TOKENS = 16
T5_TOKENS = 8


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


def _t5_tokenizer():
    """A character-level T5-style tokenizer (Unigram over single characters, ``</s>`` appended, ``<pad>`` = 0)
    built with ``tokenizers``: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,'-▁"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=T5_TOKENS)
    return fast, len(vocab)


def _t5(cls_name: str, d_model: int):
    import transformers

    _, vocab = _t5_tokenizer()
    cfg_cls = transformers.UMT5Config if cls_name == "UMT5EncoderModel" else transformers.T5Config
    return getattr(transformers, cls_name)(cfg_cls(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
                                                   num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0))


def _clip_with_projection(hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer, vocab_size = _tokenizer()
    return CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=hidden,
        vocab_size=vocab_size, max_position_embeddings=MAX_TOKENS, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))


def _flow_vae(latent: int, shift: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent, norm_num_groups=4, sample_size=16, scaling_factor=1.5,
                         shift_factor=shift)


def _write_flow(layout: str, tmp: Path, frames: int) -> None:
    """Tiny SD3 / FLUX / Wan pipelines (random weights, real classes and folder formats), or the toy
    ``pixel_flow`` / ``pixel_video_flow`` layouts."""
    import diffusers

    if layout == "pixel_video_flow":  # 2 classes + null, 2 directions + null: context dim 6, also as 6 channels,
        transformer = diffusers.WanTransformer3DModel(  # then 2 coordinate channels (frame, x)
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=9, out_channels=1,
            text_dim=6, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            rope_max_seq_len=max(32, frames))
        transformer.save_pretrained(tmp / "transformer")
        diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps({"_class_name": "PixelVideoFlow",
                                                          "transformer": ["diffusers", "WanTransformer3DModel"],
                                                          "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
        (tmp / "rlr_model.json").write_text(json.dumps({
            "layout": "pixel_video_flow", "conditioning": "class+direction", "num_classes": 2, "null_class": 2,
            "class_names": ["zero", "one"], "directions": ["left", "right"], "null_direction": 2, "cond_channels": 6,
            "coord_channels": ["frame", "x"],
            "channels": 1, "frames": frames, "sample_size": [8, 8]}, indent=1))
        return

    if layout == "pixel_flow":
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=3, caption_projection_dim=16, pooled_projection_dim=3,
            pos_embed_max_size=4)
        transformer.save_pretrained(tmp / "transformer")
        diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps({"_class_name": "PixelFlow",
                                                          "transformer": ["diffusers", "SD3Transformer2DModel"],
                                                          "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
        (tmp / "rlr_model.json").write_text(json.dumps({"layout": "pixel_flow", "conditioning": "class",
                                                        "num_classes": 2, "null_class": 2,
                                                        "class_names": ["zero", "one"], "channels": 1}, indent=1))
        return
    clip_tok, _ = _tokenizer()
    t5_tok, _ = _t5_tokenizer()
    if layout == "sd3":
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
            pooled_projection_dim=TEXT_DIM, pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_flow_vae(4, 0.1), text_encoder=_clip_with_projection(TEXT_DIM // 2), tokenizer=clip_tok,
            text_encoder_2=_clip_with_projection(TEXT_DIM // 2), tokenizer_2=clip_tok,
            text_encoder_3=_t5("T5EncoderModel", TEXT_DIM), tokenizer_3=t5_tok)
    elif layout == "flux":
        from transformers import CLIPTextConfig, CLIPTextModel

        _, vocab_size = _tokenizer()
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=37, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=vocab_size, max_position_embeddings=MAX_TOKENS,
                                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                                            pad_token_id=vocab_size - 1))
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15, base_image_seq_len=4, max_image_seq_len=64)
        pipe = diffusers.FluxPipeline(transformer=transformer, scheduler=sched, vae=_flow_vae(4, 0.1),
                                      text_encoder=clip, tokenizer=clip_tok,
                                      text_encoder_2=_t5("T5EncoderModel", TEXT_DIM), tokenizer_2=t5_tok)
    elif layout == "wan":
        transformer = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                         temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                         latents_std=[1.5, 2.0, 1.0, 0.5])
        sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0, num_train_timesteps=1000)
        pipe = diffusers.WanPipeline(transformer=transformer, scheduler=sched, vae=vae,
                                     text_encoder=_t5("UMT5EncoderModel", TEXT_DIM), tokenizer=t5_tok)
        (tmp / "rlr_model.json").write_text(json.dumps({"layout": "wan", "frames": frames}, indent=1))
    else:
        raise ValueError(f"tiny flow layout must be one of {TINY_FLOW_LAYOUTS}, got {layout!r}")
    pipe.save_pretrained(tmp)


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
    if layout in TINY_FLOW_LAYOUTS:
        return _write_flow(layout, tmp, frames)
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
    """Save a tiny random model of ``layout`` as a diffusers folder (with manifest) at ``folder``
    (``frames``: video layouts; Wan takes ``1 + 4k`` frames and defaults to 5)."""
    if layout not in TINY_LAYOUTS + TINY_FLOW_LAYOUTS:
        raise ValueError(f"tiny model layout must be one of {TINY_LAYOUTS + TINY_FLOW_LAYOUTS}, got {layout!r}")
    if layout == "wan" and (frames - 1) % 4:
        frames = 5
    torch.manual_seed(seed)
    storage.atomic_dir(folder, lambda tmp: _write(layout, Path(tmp), frames),
                       {"made_by": {"function": "rlr_dist.models.tiny.build_tiny", "layout": layout, "seed": seed}})
    return Path(folder)
