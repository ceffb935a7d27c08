"""Typed config of a model: where it comes from, how it is fine-tuned, how it samples."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from rlr_dist.config import check

WINDOW_KINDS = ("all", "fixed", "sliding", "random")


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
class WindowConfig:
    """The stochastic window of a flow sampler: the steps that carry noise (and so likelihood-ratio and KL
    terms); the other steps are ODE steps. Positions are loop indices ``i = T − k`` (0 = the first step, at
    the noise; ``docs/flow.md``).

    kind: ``all`` (every step stochastic), ``fixed`` (``length`` steps from ``start``), ``sliding`` (MixGRPO:
      the start moves ``stride`` every ``every`` iterations from ``start`` up to ``max_start``, default
      ``T − length``), ``random`` (Flow-GRPO-Fast: one start per iteration drawn uniformly from ``lo..hi``,
      default ``0..T − length``). Sliding and random windows are drawn by the learner with the iteration's
      trajectory plans, so samplers and learners use the same one.
    """

    kind: Literal["all", "fixed", "sliding", "random"] = "all"
    start: int = 0
    length: int | None = None
    every: int = 1
    stride: int = 1
    max_start: int | None = None
    lo: int = 0
    hi: int | None = None

    def __post_init__(self) -> None:
        w = "model.flow.window"
        check(self.kind == "all" or (self.length is not None and self.length >= 1), f"{w}.length",
              f"window kind {self.kind!r} needs a length >= 1, got {self.length}")
        check(self.kind != "all" or self.length is None, f"{w}.length", "kind 'all' takes no length")
        check(self.start >= 0, f"{w}.start", f"must be >= 0, got {self.start}")
        check(self.every >= 1, f"{w}.every", f"must be >= 1, got {self.every}")
        check(self.stride >= 0, f"{w}.stride", f"must be >= 0, got {self.stride}")
        check(self.lo >= 0, f"{w}.lo", f"must be >= 0, got {self.lo}")
        check(self.hi is None or self.hi >= self.lo, f"{w}.hi", f"must be >= lo={self.lo}, got {self.hi}")
        check(self.max_start is None or self.max_start >= self.start, f"{w}.max_start",
              f"must be >= start={self.start}, got {self.max_start}")

    @property
    def varies(self) -> bool:
        """The window changes between iterations (drawn by the learner with the plans)."""
        return self.kind in ("sliding", "random")

    def check_fits(self, T: int) -> None:
        """Every window this spec can produce fits a ``T``-step sampler (errors name the field)."""
        w = "model.flow.window"
        if self.kind == "all":
            return
        check(self.length <= T, f"{w}.length", f"{self.length} is longer than the sampler's {T} steps")
        if self.kind == "fixed":
            check(self.start + self.length <= T, f"{w}.start",
                  f"start {self.start} + length {self.length} exceeds the sampler's {T} steps")
        elif self.kind == "sliding":
            cap = T - self.length if self.max_start is None else self.max_start
            check(self.start <= T - self.length, f"{w}.start", f"start {self.start} + length {self.length} exceeds "
                  f"the sampler's {T} steps")
            check(cap <= T - self.length, f"{w}.max_start", f"{cap} + length {self.length} exceeds {T} steps")
        else:
            hi = T - self.length if self.hi is None else self.hi
            check(hi <= T - self.length, f"{w}.hi", f"{hi} + length {self.length} exceeds the sampler's {T} steps")
            check(self.lo <= hi, f"{w}.lo", f"must be <= hi={hi} for T={T}, length={self.length}")

    def starts(self, T: int) -> list[int]:
        """Every loop-index start this spec can produce on a ``T``-step sampler (``[]`` for ``all``)."""
        self.check_fits(T)
        if self.kind == "all":
            return []
        if self.kind == "fixed":
            return [self.start]
        if self.kind == "sliding":
            cap = T - self.length if self.max_start is None else self.max_start
            return sorted({min(self.start + self.stride * n, cap) for n in range(T + 1)})
        return list(range(self.lo, (T - self.length if self.hi is None else self.hi) + 1))

    def windows(self, T: int) -> list[frozenset[int] | None]:
        """Every window (set of steps k) this spec can produce; ``[None]`` for ``all``."""
        from rlr_dist.chain.flow import fixed_window

        return [None] if self.kind == "all" else [fixed_window(T, s, self.length) for s in self.starts(T)]

    def draw(self, T: int, iteration: int, seed: int) -> frozenset[int] | None:
        """The window of ``iteration`` (``None``: every step). Random windows come from a generator seeded by
        ``(seed, iteration)``: the same on every learner, and the same in both loops."""
        from rlr_dist.chain.flow import fixed_window, random_window, sliding_window

        self.check_fits(T)
        if self.kind == "all":
            return None
        if self.kind == "fixed":
            return fixed_window(T, self.start, self.length)
        if self.kind == "sliding":
            return sliding_window(T, self.length, iteration, self.every, self.stride, self.start, self.max_start)
        g = torch.Generator().manual_seed((seed * 1_000_003 + iteration) * 7 + 3)
        return random_window(T, self.length, g, self.lo, self.hi)


@dataclass
class FlowConfig:
    """How a flow-matching model (``model.sampler: flow``) samples; see ``docs/flow.md``.

    transition: ``flow_sde`` (Flow-GRPO's marginal-preserving SDE, η = ``model.eta``), ``cps``
      (coefficient-preserving, needs η ≤ 1) or ``ode`` (Euler, deterministic: no likelihood anywhere) on the
      steps of ``window``; ODE steps elsewhere.
    window: the stochastic steps (:class:`WindowConfig`).
    t1_guard: how ``flow_sde`` evaluates its noise level at t = 1 (``next``: at the first flow time below 1;
      ``flow_grpo``: Flow-GRPO's code).
    shift: overrides the scheduler config's static ``shift`` (ignored with dynamic shifting, which takes
      ``mu`` from the resolution as the diffusers pipelines do, or from ``mu`` here).
    flux_sigmas: pass FLUX's unshifted ``linspace(1, 1/N, N)`` grid to the scheduler (what ``FluxPipeline``
      does); default: the layout's choice.
    eval: the sampler evaluation, pictures and ``rlr-dist sample`` use: ``ode`` (the deterministic Euler
      sampler diffusers' pipelines deploy) or ``sde`` (this transition on every step).
    log_prob_reduction: ``sum`` (the exact Gaussian log-density, summed over every latent dimension; the
      default and the only one under which the KL is a KL) or ``mean_compat`` (divided by the latent size D,
      as Flow-GRPO-style trainers do: every likelihood-ratio and KL term is scaled by 1/D, so β means a
      different thing at every resolution — for reproducing such runs only).
    """

    transition: Literal["ode", "flow_sde", "cps"] = "flow_sde"
    window: WindowConfig = field(default_factory=WindowConfig)
    t1_guard: Literal["next", "flow_grpo"] = "next"
    shift: float | None = None
    mu: float | None = None
    flux_sigmas: bool | None = None
    eval: Literal["ode", "sde"] = "ode"
    log_prob_reduction: Literal["sum", "mean_compat"] = "sum"

    def __post_init__(self) -> None:
        check(self.shift is None or self.shift > 0, "model.flow.shift", f"must be > 0, got {self.shift}")


@dataclass
class ModelConfig:
    """A diffusion model to fine-tune.

    path: a diffusers folder (local), ``s3://bucket/prefix`` (downloaded into a cache and verified), a hub
      id (only when the machine is online), or ``toy:digits`` / ``toy:moving-digits`` for the shipped models.
    layout: one of the registered adapters (``pixel``, ``pixel_video``, ``sd``, ``t2v``, ``sd3``, ``flux``, ``wan``, ``pixel_flow``, ``pixel_video_flow``); detected from
      the folder when omitted.
    finetune: ``lora`` (reference = adapters disabled, no second copy) or ``full`` (reference = frozen copy).
    sampler / num_inference_steps / eta: the chain the estimators see (DDIM with η > 0, DDPM, or ``flow`` for
      flow-matching models: ``FlowMatchEulerDiscreteScheduler`` times with the transition in ``flow``; η is
      its noise level).
    last_step_eta: DDIM η of the last step (0 = deterministic decoder step, the usual setting).
    flow: the flow sampler (:class:`FlowConfig`: transition, stochastic window, shift, evaluation sampler).
    mixed_precision: ``bf16`` autocasts the UNet forward; likelihood ratios and KL stay in fp32. Transformer
      layouts (``sd3``, ``flux``, ``wan``) then also hold their weights and frozen text encoders in bf16
      (LoRA weights stay fp32).
    gradient_checkpointing: recompute activations in backward — per model call for UNets, per transformer
      block for transformer layouts.
    distilled_guidance: the guidance value fed as an input to guidance-distilled models (FLUX.1-dev: 3.5);
      ``guidance_scale`` stays true classifier-free guidance (two branches), 1 = off.
    max_sequence_length: text tokens of the T5 / UMT5 encoder (default: the layout's, SD3 256, FLUX 512, Wan 512).
    text_encoder_device: ``cpu`` keeps the frozen text encoders in CPU memory on every role (prompts are encoded
      there once each and cached on the model's device): their GPU memory — T5-XXL / UMT5-XXL are 9–11 GB in
      bf16 — for a one-off CPU encode per prompt. ``auto``: with the model.
    num_frames: frames of video layouts that do not fix them (``t2v``).
    resolution: image size in pixels of latent layouts (``sd``, ``t2v``): one int or ``[height, width]``, each a
      multiple of the VAE's downsampling factor; default the UNet's ``sample_size`` (zeroscope: ``[320, 576]``).
    vae_slicing: decode one image (video: one frame) at a time. With ``∂R/∂x_0`` (a frame-wise VAE) the
      reward's gradient is taken on the decoded images and brought back through the decoder one slice at a
      time: the decoder's activations of one image instead of every decoded frame, for a second decode. A
      causal video VAE (Wan's) decodes its clips whole under ``∂R/∂x_0``.
    """

    path: str = "toy:digits"
    layout: str | None = None
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    sampler: Literal["ddim", "ddpm", "flow"] = "ddim"
    num_inference_steps: int = 20
    eta: float = 1.0
    last_step_eta: float | None = 0.0
    guidance_scale: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    num_frames: int | None = None
    vae_slicing: bool = False
    resolution: int | list[int] | None = None
    flow: FlowConfig = field(default_factory=FlowConfig)
    distilled_guidance: float | None = None
    max_sequence_length: int | None = None
    text_encoder_device: Literal["auto", "cpu"] = "auto"

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
        if self.sampler == "flow":
            check(self.flow.transition != "cps" or self.eta <= 1.0, "model.eta",
                  f"cps needs eta in [0, 1] (its noise is t'·sin(ηπ/2)), got {self.eta}")
        check(self.distilled_guidance is None or self.distilled_guidance > 0, "model.distilled_guidance",
              f"must be > 0, got {self.distilled_guidance}")
        check(self.max_sequence_length is None or self.max_sequence_length >= 1, "model.max_sequence_length",
              f"must be >= 1, got {self.max_sequence_length}")
