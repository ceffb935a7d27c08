"""`rlr-dist bench plan`: calibrate the planner's activation coefficients and check its estimates.

1. :func:`measure_coefficients` — bytes autograd saves per input element of each unit kind, measured with
   :class:`SavedTensorMeter` on tiny diffusers / transformers units (fp32 and bf16 autocast; all weights
   trained, or frozen weights with LoRA on the attention projections). ``rlr_dist.planner.COEF`` holds them.
2. :func:`validate` — whole tiny models built by :func:`rlr_dist.models.tiny.build_tiny` (and the shipped toy
   models): the planner's estimate of one CFG model call and of one ``rlr`` learner step's peak, against the
   measured saved-tensor peak of the project's own code path (``DiffusionModel.chain()`` and
   :func:`rlr_dist.train.step.learn`). Both on CPU.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from rlr_dist.memory import SavedTensorMeter

MB = 2**20
from rlr_dist.models.base import DiffusionModel

LORA_TARGETS = tuple(DiffusionModel.default_lora_targets)  # the attention projections every adapter adapts
C, HW, F, B = 32, 8, 4, 2        # unit width, spatial size, frames, batch of the calibration units
# Wan's feed-forward widths are 8960 / 1536 (1.3B) and 13824 / 5120 (14B); the unit is measured at 4x and the
# planner scales each block by its own ratio (rlr_dist.planner.profile: saved bytes are linear in it)
WAN_FFN_RATIO = 4


def _clip_call(m, x):
    out = m(x, None)
    return out[0] if isinstance(out, tuple) else out


def _units() -> dict:
    """kind -> (module, input, call(module, x)). The transformer-block units of the flow layouts take one
    input holding image and text tokens side by side (split inside ``call``): their coefficient is per token
    element of both streams, as the planner counts them."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResample, WanResidualBlock
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D, TemporalConvLayer
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.transformers.transformer_flux import (FluxPosEmbed, FluxSingleTransformerBlock,
                                                                FluxTransformerBlock)
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock
    from diffusers.models.upsampling import Upsample2D
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    img = (B * F, C, HW, HW)
    temb = torch.randn(B * F, 64)
    ctx = torch.randn(B * F, 16, C)
    clip_cfg = CLIPVisionConfig(hidden_size=C, intermediate_size=4 * C, num_attention_heads=4)
    clip_cfg._attn_implementation = "sdpa"
    n_img, n_txt = HW * HW, 16                       # image and text tokens of the joint blocks
    joint = (B, n_img + n_txt, C)
    temb_c = torch.randn(B, C)
    ids = torch.cat([torch.zeros(n_txt, 3), torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(HW * 1.0),
                                                                        torch.arange(HW * 1.0), indexing="ij"), -1).reshape(-1, 3)])
    rope = FluxPosEmbed(theta=10000, axes_dim=(2, 2, 4))(ids)
    wan_x = torch.randn(B, C, F, HW, HW)
    wan_rope = WanRotaryPosEmbed(8, (1, 2, 2), 32)(wan_x[:, :, :, ::1, ::1].repeat(1, 1, 1, 2, 2))
    wan_ctx, wan_temb = torch.randn(B, 16, C), torch.randn(B, 6, C)

    def split(m, x):
        return m(hidden_states=x[:, :n_img], encoder_hidden_states=x[:, n_img:], temb=temb_c)

    def split_rope(m, x):  # FLUX: text tokens first (its rotary ids are [text; image])
        return m(hidden_states=x[:, n_txt:], encoder_hidden_states=x[:, :n_txt], temb=temb_c, image_rotary_emb=rope)

    return {
        "ResnetBlock2D": (ResnetBlock2D(in_channels=C, out_channels=C, temb_channels=64, groups=8), img,
                          lambda m, x: m(x, temb)),
        "Transformer2DModel": (Transformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=C,
                                                  norm_num_groups=8, cross_attention_dim=C), img,
                               lambda m, x: m(x, encoder_hidden_states=ctx).sample),
        "Downsample2D": (Downsample2D(C, use_conv=True, padding=1), img, lambda m, x: m(x)),
        "Upsample2D": (Upsample2D(C, use_conv=True), img, lambda m, x: m(x)),
        "TemporalConvLayer": (TemporalConvLayer(C, C, norm_num_groups=8), img, lambda m, x: m(x, num_frames=F)),
        "TransformerTemporalModel": (TransformerTemporalModel(num_attention_heads=4, attention_head_dim=8,
                                                              in_channels=C, norm_num_groups=8), img,
                                     lambda m, x: m(x, num_frames=F).sample),
        "Attention": (Attention(C, heads=1, dim_head=C, rescale_output_factor=1.0, eps=1e-6, norm_num_groups=8,
                                residual_connection=True, bias=True, upcast_softmax=True,
                                _from_deprecated_attn_block=True), img, lambda m, x: m(x)),
        "CLIPEncoderLayer": (CLIPEncoderLayer(clip_cfg), (B, 50, C), _clip_call),
        "head": (nn.Sequential(nn.GroupNorm(8, C), nn.SiLU(), nn.Conv2d(C, 4, 3, padding=1)), img,
                 lambda m, x: m(x)),
        # flow-matching transformers (SD3 / SD3.5, FLUX, Wan) and Wan's video VAE
        "JointTransformerBlock": (JointTransformerBlock(C, 4, 8, qk_norm="rms_norm"), joint, split),
        "JointTransformerBlockDual": (JointTransformerBlock(C, 4, 8, qk_norm="rms_norm", use_dual_attention=True),
                                      joint, split),
        "FluxTransformerBlock": (FluxTransformerBlock(C, 4, 8), joint, split_rope),
        "FluxSingleTransformerBlock": (FluxSingleTransformerBlock(C, 4, 8), joint, split_rope),
        "WanTransformerBlock": (WanTransformerBlock(C, WAN_FFN_RATIO * C, 4, "rms_norm_across_heads", True, 1e-6),
                                (B, F * HW * HW, C), lambda m, x: m(x, wan_ctx, wan_temb, wan_rope)),
        "WanResidualBlock": (WanResidualBlock(C, C), (B, C, F, HW, HW), lambda m, x: m(x)),
        "WanAttentionBlock": (WanAttentionBlock(C), (B, C, F, HW, HW), lambda m, x: m(x)),
        "WanResample": (WanResample(C, "upsample2d"), (B, C, F, HW, HW), lambda m, x: m(x)),
    }


def _saved_per_element(module: nn.Module, shape, call, precision: str, mode: str) -> float:
    from rlr_dist.models.config import LoraConfig
    from rlr_dist.models.lora import add_lora

    module = module.eval()
    if mode != "full":
        module.requires_grad_(False)
        names = [n for n, _ in module.named_modules()]
        if mode == "lora" and any(n.endswith(t) for n in names for t in LORA_TARGETS):
            add_lora(module, LoraConfig(rank=4), list(LORA_TARGETS))
    # the input counts: inside a model it is an activation that the unit's first ops save
    x = torch.randn(*shape, requires_grad=(mode != "full"))
    static = [*module.parameters(), *module.buffers()]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    with SavedTensorMeter(static) as meter, ctx:
        out = call(module, x)
    del out
    return meter.peak / x.numel()


def measure_coefficients() -> dict:
    """``{precision: {mode: {kind: bytes per input element}}}``. Modes: ``full`` (every weight trained),
    ``lora`` (frozen weights, LoRA on the attention projections, input needs grad), ``frozen`` (no trained
    weight, input needs grad: the VAE and CLIP under ∂R/∂x₀)."""
    torch.manual_seed(0)
    out: dict = {}
    for precision in ("fp32", "bf16"):
        for mode in ("full", "lora", "frozen"):
            row = out.setdefault(precision, {}).setdefault(mode, {})
            for kind, (m, shape, call) in _units().items():
                row[kind] = round(_saved_per_element(m, shape, call, precision, mode), 2)
    return out


# ------------------------------------------------------------------------------------------- validation
def _cases(root: Path) -> list[tuple[str, dict]]:
    """(label, model config) of the tiny models the estimate is checked on."""
    from rlr_dist.models.tiny import build_tiny

    sd, t2v = build_tiny("sd", root / "sd"), build_tiny("t2v", root / "t2v", frames=4)
    pv = build_tiny("pixel_video", root / "pixel_video", frames=8)
    return [
        ("image: toy:digits (UNet2DModel 16x16, class CFG)", {"path": "toy:digits", "guidance_scale": 3.0}),
        ("video: tiny pixel_video (8 frames as channels)", {"path": str(pv)}),
        ("text-to-image: tiny sd, LoRA, CFG", {"path": str(sd), "guidance_scale": 5.0}),
        ("text-to-image: tiny sd, LoRA, CFG, bf16 autocast", {"path": str(sd), "guidance_scale": 5.0,
                                                              "mixed_precision": "bf16"}),
        ("text-to-image: tiny sd at 128x128, full fine-tuning", {"path": str(sd), "finetune": "full",
                                                                 "resolution": 128}),
        ("text-to-video: tiny t2v (UNet3D), 4 frames, LoRA, CFG", {"path": str(t2v), "guidance_scale": 5.0}),
        ("text-to-video: tiny t2v, 8 frames at 64x96", {"path": str(t2v), "num_frames": 8, "resolution": [64, 96]}),
    ]


def _tensors(traj) -> list:
    out = [v for v in vars(traj).values() if isinstance(v, torch.Tensor)]
    for v in (traj.x, traj.eps):
        out += list(v.values())
    return out


def measure_case(model_cfg: dict, batch: int = 2, h: int = 2, T: int = 6) -> dict:
    """Measured vs estimated saved bytes of one model call and of one ``rlr`` learner step (LoRA or full)."""
    from rlr_dist import planner as P
    from rlr_dist.estimators import ESTIMATORS, Advantages
    from rlr_dist.models import load_model
    from rlr_dist.models.config import ModelConfig
    from rlr_dist.config import build
    from rlr_dist.regularisers import REGULARISERS
    from rlr_dist.rewards import build_scorer
    from rlr_dist.train import step

    cfg = build(ModelConfig, {**model_cfg, "num_inference_steps": T}, "model")
    model = load_model(cfg)
    prompts = ["one"] * batch if model.layout.startswith("pixel") else ["a red cube"] * batch
    cond = model.encode_prompts(prompts)
    chain = model.chain()
    static = [*model.unet.parameters(), *model.unet.buffers()]
    for m in model.frozen_modules().values():
        static += [*m.parameters(), *m.buffers()]
    x = model.initial_noise(batch, torch.Generator().manual_seed(0))
    uncond = chain.uncond if isinstance(getattr(chain, "uncond", None), torch.Tensor) else None
    with SavedTensorMeter(static + [x, cond] + ([uncond] if uncond is not None else [])) as meter:
        mu = chain.mean(x, T, cond)
    call_measured = meter.peak
    del mu

    est = ESTIMATORS.build("rlr", h=h, zo="lr_sampled", K=2)
    work = step.with_plan(step.Work(prompts, list(range(batch)), seed=0), est, model.schedule())
    chunk = step.rollout(model, work, version=0)
    reward = "temporal_consistency" if model.video else "brightness"
    chunk = step.score(build_scorer({"name": reward}, model.decoder()), chunk, need_grad=True)
    reg = REGULARISERS.build("kl_exact", beta=0.01)
    exclude = static + _tensors(chunk.traj) + [chunk.reward, chunk.reward_grad]
    t0 = time.perf_counter()
    with SavedTensorMeter(exclude) as meter:
        step.learn(model, est, reg, Advantages("loo"), [chunk], chunk.reward)
    step_measured, seconds = meter.peak, time.perf_counter() - t0

    arch = P.arch_of(cfg)
    prof, _ = P.unet_profile(arch)
    prec = "bf16" if cfg.mixed_precision == "bf16" else "fp32"
    mult = batch * (2 if cfg.guidance_scale != 1.0 else 1)
    call_est = prof.saved_bytes(prec, "full" if cfg.finetune == "full" else "lora") * mult
    step_est = P.segment_bytes(est.backprop(T, reg), call_est, prof.saved_bytes(prec, "frozen") * mult)
    return {"call_measured": call_measured, "call_estimated": call_est, "step_measured": step_measured,
            "step_estimated": step_est, "latent": f"{arch.latent_hw[0]}x{arch.latent_hw[1]}"
            + (f"x{arch.frames}f" if arch.frames > 1 else ""), "seconds": seconds}


def validate(progress=print) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for label, mc in _cases(Path(d)):
            r = {"case": label, **measure_case(mc)}
            r["call_error"] = r["call_estimated"] / r["call_measured"] - 1
            r["step_error"] = r["step_estimated"] / r["step_measured"] - 1
            rows.append(r)
            if progress:
                progress(f"  {label}: call {r['call_measured'] / MB:.2f} MB measured, {r['call_estimated'] / MB:.2f} "
                         f"estimated ({r['call_error']:+.1%}); rlr h=2 step {r['step_measured'] / MB:.2f} / "
                         f"{r['step_estimated'] / MB:.2f} MB ({r['step_error']:+.1%})")
    return rows


NOTES = """
## What this does and does not validate

- **Validated on CPU**: the activation model (saved tensors of one model call and of one `rlr` learner step)
  on the tiny models above, image, text-to-image and text-to-video. The former ~20 % video gap was UNet3D's
  `transformer_in`, a `TransformerTemporalModel` whose inner width is 8 heads × `attention_head_dim` (4× its
  input channels in the tiny t2v, 1.6× in ModelScope): the planner now scales that unit by inner / input width.
  A learner step's exact-KL reference calls are differentiated in their input only and are counted with the
  frozen coefficients. Frame-count scaling, per-call / per-block checkpointing and every estimator on both video
  architectures: `rlr-dist bench video-memory` (`docs/results/video-memory.md`).
- **Flow transformers** (`tests/test_planner_flow.py`): joint / single / Wan blocks measured here like the
  UNet units, counted over image and text tokens; Wan blocks calibrated at `ffn_dim = 4·dim` and scaled to their
  own ratio (the published 1.3B / 14B have 5.83 / 2.70), plus their cross-attention keys and values over the text
  tokens (~20 bytes per text element); Wan's output head (norm, modulation, `proj_out`: 12.4 bytes per token ×
  width element, measured) is counted like the UNet's. The patch embedding's input is not (in_channels × patch
  volume per token: 64 values against a width of 1,536 in Wan 2.1; it matters only for tiny models under
  per-block checkpointing, `docs/results/video-memory.md`). Tiny SD3 / FLUX / Wan within 15 % per call.
- **Assumed, not measured**: attention runs through a fused SDPA kernel (flash / memory-efficient: O(tokens)
  saved); if a GPU falls back to the math kernel (odd head sizes), each attention also saves
  heads × tokens² scores and the estimate is far too low. Optimizer / gradient bytes by ZeRO stage follow the
  DeepSpeed rules in `rlr_dist/planner.py`; the no-grad working sets (sampler, reward without ∂R/∂x₀) are
  3 × the largest unit input; 2 GB is reserved per GPU. Times are FLOPs (exact, from a meta-device pass) at
  35 % of the dense peak — rough.
- **GPU validation pending**: no GPU was available to this work. The check to run when one is lent:
  `rlr-dist bench plan` on the device, plus `torch.cuda.max_memory_allocated` of one learner step of a
  full-size SD-1.5 UNet (LoRA, bf16, chunk 1–4, h = 1, 2) against `rlr-dist plan`.
"""


def main(out: str | None = "docs/results/plan.md", progress=print) -> str:
    """Measure the coefficients and the validation cases; write the report (markdown) to ``out``."""
    from rlr_dist import planner as P

    t0 = time.perf_counter()
    fresh = measure_coefficients()
    drift = max(abs(fresh[p][m][k] - P.COEF[p][m][k]) / max(P.COEF[p][m][k], 1e-9)
                for p in fresh for m in fresh[p] for k in fresh[p][m])
    rows = validate(progress)
    lines = ["# Planner estimate vs measured activation memory (CPU)", "",
             "`rlr-dist bench plan` (`rlr_dist/bench/planner.py`); torch "
             f"{torch.__version__}, {time.perf_counter() - t0:.0f} s on this machine. Bytes autograd saves for backward "
             "(`SavedTensorMeter`): one model call (both CFG branches when guided) at batch 2, and the peak of one "
             "`rlr` learner step (h = 2, `zo: lr_sampled`, K = 2, `kl_exact`, T = 6) run by "
             "`rlr_dist.train.step.learn`. Estimates: `rlr_dist.planner` from the model's configs alone "
             "(meta-device pass × the unit coefficients). Error = estimate / measured − 1.", "",
             "| case | latent | one call: measured MB | estimated MB | error | rlr step: measured MB | estimated MB | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['latent']} | {r['call_measured'] / MB:.2f} | {r['call_estimated'] / MB:.2f} | "
                     f"{r['call_error']:+.1%} | {r['step_measured'] / MB:.2f} | {r['step_estimated'] / MB:.2f} | "
                     f"{r['step_error']:+.1%} |")
    img = [r for r in rows if "video" not in r["case"]]
    vid = [r for r in rows if "video" in r["case"]]
    worst = lambda rs, k: max(abs(r[k]) for r in rs)  # noqa: E731
    lines += ["", f"Largest error: image / text-to-image {worst(img, 'call_error'):.1%} per call, "
              f"{worst(img, 'step_error'):.1%} per step; video {worst(vid, 'call_error'):.1%} per call, "
              f"{worst(vid, 'step_error'):.1%} per step. The unit coefficients re-measured in this run differ from "
              f"the ones in `rlr_dist/planner.py` by at most {drift:.1%}."]
    text = "\n".join(lines) + "\n" + NOTES
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text
