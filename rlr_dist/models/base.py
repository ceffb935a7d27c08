"""One interface over diffusers model layouts: load, condition, sample as a chain, decode, export.

A :class:`DiffusionModel` owns the denoiser — a UNet, or a diffusion transformer for flow-matching layouts
(trainable: LoRA adapters or all weights) — its scheduler config and, for latent layouts, the frozen VAE and
text encoders. It hands the estimators a :class:`~rlr_dist.chain.denoiser.DenoiserChain` whose reference
model is the same denoiser with adapters disabled (LoRA; no second copy) or a frozen copy (full
fine-tuning), under the sampler's schedule: a :class:`~rlr_dist.chain.schedule.GaussianSchedule` (DDIM /
DDPM) or a :class:`~rlr_dist.chain.flow.FlowSchedule` (``model.sampler: flow``, with this iteration's
stochastic window). Layouts differ only in how they condition, shape and decode; each is one registered
subclass (``rlr_dist/models/layouts.py``, ``rlr_dist/models/transformers.py``).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
from abc import ABC, abstractmethod
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rlr_dist import storage
from rlr_dist.chain.denoiser import DenoiserChain
from rlr_dist.chain.flow import FlowSchedule, resolution_mu
from rlr_dist.chain.schedule import GaussianSchedule
from rlr_dist.config import ConfigError
from rlr_dist.models.config import ModelConfig
from rlr_dist.models.lora import (adapter_aware_checkpoint, adapters_disabled, add_lora, lora_state_dict,
                                  merged_state_dict)
from rlr_dist.registry import Registry

MODELS: Registry[type["DiffusionModel"]] = Registry("model layout", group="rlr_dist.models")
RLR_META = "rlr_model.json"

UNSUPPORTED = {"UNetMotionModel": "AnimateDiff's UNetMotionModel is not supported yet (a tiny one fails for "
                                  "more than one frame under diffusers 0.42.1)"}


class ModelError(ValueError):
    """A model path, folder or layout is wrong; the message names it."""


class Denoiser(nn.Module):
    """``(x, t, cond) -> model output`` of a layout's UNet, in fp32 (bf16/fp16 autocast inside when asked),
    with optional per-call activation checkpointing."""

    def __init__(self, owner: "DiffusionModel", unet: nn.Module, checkpointed: bool = False):
        super().__init__()
        self.unet = unet
        self._owner = [owner]  # not a submodule: parameters stay the UNet's
        self.checkpointed = checkpointed

    def _call(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        owner = self._owner[0]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(owner.cfg.mixed_precision)
        ctx = torch.autocast(x.device.type, dtype=dtype) if dtype is not None else nullcontext()
        with ctx:
            out = owner.unet_forward(self.unet, x, t, cond)
        return out.float()

    def forward(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(self._call, x, t, cond, use_reentrant=False)
        return self._call(x, t, cond)


class AdaptersOff(nn.Module):
    """The LoRA model with adapters disabled: the pretrained reference, sharing every weight."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def _call(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        with adapters_disabled(self.denoiser.unet):
            return self.denoiser._call(x, t, cond)

    def forward(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        # checkpointed like the trained model; the recompute runs this same function, adapters off again
        if self.denoiser.checkpointed and torch.is_grad_enabled():
            return checkpoint(self._call, x, t, cond, use_reentrant=False)
        return self._call(x, t, cond)


class DiffusionModel(ABC):
    """Base of every layout adapter. Subclasses load their extra components and define conditioning,
    latent shape, the UNet call and decoding."""

    #: the diffusers class of the denoiser (``unet/config.json``'s ``_class_name``)
    unet_class: str = ""
    #: a folder whose ``model_index.json`` names ``unet_class`` is this layout (without an ``rlr_model.json``
    #: saying otherwise); False for layouts that share a class with another (frames-as-channels video)
    detects_unet_class: bool = True
    video: bool = False
    #: module-name suffixes LoRA adapts by default (``model.lora.target_modules`` overrides)
    default_lora_targets: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    #: the subfolder (and ``model_index.json`` key) holding the denoiser
    denoiser_folder: str = "unet"
    #: ``model.gradient_checkpointing`` checkpoints each transformer block (diffusers' own per-block hooks)
    #: instead of each model call
    checkpoints_blocks: bool = False
    #: with ``mixed_precision: bf16`` and LoRA, hold the frozen denoiser and text encoders in bf16
    #: (transformer layouts; the LoRA weights, the chain's means and every log-density stay fp32)
    bf16_weights: bool = False
    #: frozen component attributes (moved with the model, checked unchanged by the tests)
    frozen_attributes: tuple[str, ...] = ("vae", "text_encoder")

    def __init__(self, folder: Path, cfg: ModelConfig, meta: dict | None = None):
        self.folder = Path(folder)
        self.cfg = cfg
        self.meta = meta or {}
        self.unet = self._load_unet()
        self.unet.eval()  # no dropout: UNet3D has hard-coded temporal dropout; sampling must be exact
        self.scheduler_config = read_scheduler_config(self.folder)
        self.load_components()
        self.lora_params: list[nn.Parameter] = []
        if self.weights_dtype() != torch.float32:
            self.unet.to(self.weights_dtype())
        if cfg.finetune == "lora":
            self.lora_params, self.lora_targets = add_lora(self.unet, cfg.lora, self.default_lora_targets)
            for p in self.lora_params:  # trained in fp32 (autocast runs the matmuls in bf16)
                p.data = p.data.float()
            self.reference_unet = None
        else:
            self.unet.requires_grad_(True)
            self.reference_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        # model.gradient_checkpointing covers the reference model too: the exact KL back-propagates through its
        # calls (pathwise in x), which would otherwise hold a whole call's activations each
        per_block = cfg.gradient_checkpointing and self.checkpoints_blocks
        per_call = cfg.gradient_checkpointing and not per_block
        if per_block:  # per transformer block; remembers adapters on/off so the recompute matches
            for unet in (self.unet, self.reference_unet):
                if unet is not None:
                    unet.enable_gradient_checkpointing(adapter_aware_checkpoint())
        self.denoiser = Denoiser(self, self.unet, checkpointed=per_call)
        self.reference = (AdaptersOff(self.denoiser) if cfg.finetune == "lora"
                          else Denoiser(self, self.reference_unet, checkpointed=per_call))

    def weights_dtype(self) -> torch.dtype:
        """The dtype the frozen denoiser weights are held in (bf16 under :attr:`bf16_weights` + LoRA + bf16)."""
        bf16 = self.bf16_weights and self.cfg.mixed_precision == "bf16" and self.cfg.finetune == "lora"
        return torch.bfloat16 if bf16 else torch.float32

    # ------------------------------------------------------------------ layout hooks
    def _load_unet(self) -> nn.Module:
        import diffusers

        cls = getattr(diffusers, self.unet_class)
        try:
            return cls.from_pretrained(self.folder, subfolder=self.denoiser_folder)
        except (OSError, ValueError, EnvironmentError) as e:
            raise ModelError(f"{self.folder / self.denoiser_folder}: cannot load {self.unet_class}: {e}") from None

    def load_components(self) -> None:
        """Load the frozen extras (VAE, text encoder, tokenizer)."""

    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent sample (no batch dim), e.g. ``(C, H, W)`` or ``(C, F, H, W)``."""

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """The UNet condition for a batch of prompts (``None`` for unconditional models)."""

    @abstractmethod
    def null_cond(self) -> Any:
        """The null condition for classifier-free guidance (batch 1), or ``None`` when CFG is impossible."""

    @abstractmethod
    def unet_forward(self, unet: nn.Module, x: Tensor, t: Tensor, cond: Any) -> Tensor: ...

    @abstractmethod
    def decoder(self) -> nn.Module:
        """The frozen module mapping the chain's ``x_0`` to images in ``[0, 1]`` (what reward actors hold)."""

    @classmethod
    def load_decoder(cls, folder: Path, cfg: ModelConfig) -> nn.Module:
        """The decoder alone, without the UNet (what a reward actor loads)."""
        raise NotImplementedError

    def decode(self, x0: Tensor) -> Tensor:
        """Differentiable map from ``x_0`` to images in ``[0, 1]``: ``(B,C,H,W)``, or ``(B,C,F,H,W)`` for video."""
        return self.decoder()(x0)

    # ------------------------------------------------------------------ chain
    @classmethod
    def image_seq_len(cls, folder: Path, cfg: ModelConfig) -> int | None:
        """Latent tokens of one sample, from the folder's configs alone: what dynamic (resolution-dependent)
        flow shifting reads (``None``: the layout has no such notion)."""
        return None

    @classmethod
    def flow_grid(cls, scheduler_config: dict, steps: int) -> tuple[dict, list[float] | None]:
        """``(FlowMatchEulerDiscreteScheduler config, unshifted custom flow times or None)`` of this layout's
        sampler: the scheduler config as stored by default (layouts override: FLUX's pipeline grid, Wan's
        UniPC flow grid)."""
        return scheduler_config, None

    @classmethod
    def make_schedule(cls, scheduler_config: dict, cfg: ModelConfig, image_seq_len: int | None = None,
                      window: frozenset[int] | None = None, latent_size: int | None = None):
        """The sampler's chain schedule from a scheduler config alone (no weights): DDIM / DDPM, or for
        ``model.sampler: flow`` a :class:`FlowSchedule` with the stochastic ``window`` (``None``: the configured
        one; a varying window's is drawn by the learner per iteration)."""
        if cfg.sampler != "flow":
            return build_schedule(scheduler_config, cfg)
        sched_cfg, sigmas = cls.flow_grid(scheduler_config, cfg.num_inference_steps)
        return flow_schedule(sched_cfg, cfg, image_seq_len, window, sigmas, latent_size)

    def schedule(self, window: frozenset[int] | None = None):
        """This model's chain schedule (with ``window``: that iteration's stochastic steps, flow samplers)."""
        return type(self).make_schedule(self.scheduler_config, self.cfg, type(self).image_seq_len(self.folder, self.cfg),
                                        window, math.prod(self.latent_shape()))

    def eval_schedule(self):
        """The schedule evaluation and pictures sample with: the training one, or for flow samplers the one
        ``model.flow.eval`` names (``ode``: the deterministic Euler sampler pipelines deploy; ``sde``: the
        transition on every step)."""
        s = self.schedule()
        if isinstance(s, FlowSchedule):
            return s.with_transition("ode") if self.cfg.flow.eval == "ode" else s.with_window(None)
        return s

    def chain(self, guidance_scale: float | None = None, window: frozenset[int] | None = None,
              schedule=None) -> DenoiserChain:
        """The chain estimators train on (``window``: the plan's stochastic steps; ``schedule`` overrides)."""
        w = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        uncond = self.null_cond() if w != 1.0 else None
        if w != 1.0 and uncond is None:
            raise ConfigError(f"model.guidance_scale: {w} needs a null condition, and layout "
                              f"{self.layout!r} of {self.folder} has none (unconditional model)")
        return DenoiserChain(self.denoiser, schedule if schedule is not None else self.schedule(window),
                             guidance_scale=w, uncond=uncond, ref_model=self.reference,
                             params=self.trainable_parameters())

    def eval_chain(self) -> DenoiserChain:
        """The chain of evaluation, pictures and ``rlr-dist sample`` (see :meth:`eval_schedule`)."""
        return self.chain(schedule=self.eval_schedule())

    # ------------------------------------------------------------------ planner
    @classmethod
    def planner_shape(cls, config: dict, vae_config: dict | None, pixels: tuple[int, int] | None,
                      cfg: ModelConfig, meta: dict, folder: Path | None) -> dict | None:
        """What the planner cannot read off a UNet config, from configs alone: ``{"latent": one sample's
        latent shape, "frames": decoded frames, "latent_hw", "tokens": text tokens per prompt, "temporal":
        a causal video VAE's frames per latent frame}``; ``None`` = the planner's UNet rules (the default)."""
        return None

    @classmethod
    def meta_inputs(cls, config: dict, latent: tuple[int, ...], tokens: int, class_conditional: bool = False,
                    device: str = "meta") -> tuple[tuple, dict]:
        """``(args, kwargs)`` of one denoiser call on a batch of 1 with latent ``latent`` (no batch dim) —
        what the planner runs on the meta device. Default: the diffusers UNet signatures."""
        t = torch.zeros(1, device=device)
        x = torch.empty(1, *latent, device=device)
        if cls.unet_class == "UNet2DModel":
            kw = {"class_labels": torch.zeros(1, dtype=torch.long, device=device)} if class_conditional else {}
            return (x, t), kw
        ctx = torch.empty(1, tokens, config.get("cross_attention_dim", 1280), device=device)
        return (x, t), {"encoder_hidden_states": ctx}

    @property
    def layout(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.lora_params) if self.cfg.finetune == "lora" else list(self.unet.parameters())

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Every module that must not change during training (for checks and device moves)."""
        named = [(a, getattr(self, a, None)) for a in self.frozen_attributes] + [("reference_unet", self.reference_unet)]
        return {name: m for name, m in named if isinstance(m, nn.Module)}

    def to(self, device: str | torch.device) -> "DiffusionModel":
        """Move the denoiser and the frozen parts (text encoders stay on the CPU with
        ``model.text_encoder_device: cpu``)."""
        self.unet.to(device)
        on_cpu = self.cfg.text_encoder_device == "cpu"
        for name, m in self.frozen_modules().items():
            m.to("cpu" if on_cpu and name.startswith("text_encoder") else device)
        return self

    @property
    def text_device(self) -> torch.device:
        """Where the text encoders run (the model's device unless ``model.text_encoder_device: cpu``)."""
        te = getattr(self, "text_encoder", None)
        return next(te.parameters()).device if isinstance(te, nn.Module) else self.device

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def initial_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn((batch, *self.latent_shape()), generator=generator, device=self.device)

    # ------------------------------------------------------------------ export
    def trained_state(self) -> dict[str, Tensor]:
        """What changes during training: LoRA weights, or the full UNet state dict."""
        if self.cfg.finetune == "lora":
            return lora_state_dict(self.unet)
        return {k: v.detach().cpu() for k, v in self.unet.state_dict().items()}

    def load_trained_state(self, state: dict[str, Tensor]) -> None:
        if self.cfg.finetune == "lora":
            from peft import set_peft_model_state_dict

            res = set_peft_model_state_dict(self.unet, state)
            bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
            if bad:
                raise ModelError(f"LoRA state does not match this model: unexpected keys {bad[:3]}")
        else:
            self.unet.load_state_dict(state)

    def export(self, uri: str | os.PathLike, lora_only: bool = False) -> None:
        """Write a diffusers-loadable folder to a path or ``s3://``.

        Full export: the pipeline folder with the UNet's trained weights (LoRA merged in), loadable with
        ``DiffusionPipeline.from_pretrained`` and by :func:`load_model`. With LoRA, ``lora/`` also holds the
        adapter alone (``pytorch_lora_weights.safetensors``, for ``pipe.load_lora_weights``);
        ``lora_only`` writes just that.
        """
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            if self.cfg.finetune == "lora":
                lora_dir = tmp if lora_only else tmp / "lora"
                lora_dir.mkdir(parents=True, exist_ok=True)
                save_file({f"unet.{k}": v for k, v in lora_state_dict(self.unet).items()},
                          str(lora_dir / "pytorch_lora_weights.safetensors"))
                (lora_dir / "lora_config.json").write_text(json.dumps(
                    {"rank": self.cfg.lora.rank, "alpha": self.cfg.lora.alpha or self.cfg.lora.rank,
                     "target_modules": self.lora_targets, "base": str(self.cfg.path)}, indent=1))
                if lora_only:
                    return
            for item in self.folder.iterdir():
                if item.name in (self.denoiser_folder, storage.MANIFEST) or item.name.startswith("."):
                    continue
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            fresh = type(self.unet).from_config(self.unet.config).to(self.weights_dtype())
            state = merged_state_dict(self.unet) if self.cfg.finetune == "lora" else self.unet.state_dict()
            fresh.load_state_dict(state)
            fresh.save_pretrained(tmp / self.denoiser_folder)

        if storage.is_s3(uri):
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                storage.atomic_dir(Path(d) / "export", write)
                storage.upload(Path(d) / "export", str(uri))
        else:
            storage.atomic_dir(uri, write)


MODELS.base = DiffusionModel


def folder_schedule(folder: Path, cfg: ModelConfig, window: frozenset[int] | None = None):
    """The schedule the model in ``folder`` samples with under ``cfg``, from its configs alone (no weights):
    what preflight checks the estimator against."""
    cls = MODELS.get(cfg.layout if cfg.layout and ":" in cfg.layout else detect_layout(folder)[0], "model.layout")
    return cls.make_schedule(read_scheduler_config(folder), cfg, cls.image_seq_len(folder, cfg), window)


def layout_of_unet_class(cls_name: str | None) -> str | None:
    """The registered layout that detects folders whose denoiser is ``cls_name``."""
    hits = [name for name, c in MODELS.items() if c.detects_unet_class and c.unet_class == cls_name]
    return hits[0] if hits else None


# ---------------------------------------------------------------------------------------------- load


def read_scheduler_config(folder: Path) -> dict:
    from diffusers import DDIMScheduler

    try:
        return dict(DDIMScheduler.load_config(folder, subfolder="scheduler"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{Path(folder) / 'scheduler'}: cannot read the scheduler config: {e}") from None


FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def build_schedule(scheduler_config: dict, cfg: ModelConfig) -> GaussianSchedule | FlowSchedule:
    """The sampler's chain schedule (``model.sampler``, steps, η) from a scheduler config alone. Flow
    samplers get the layout's grid through :meth:`DiffusionModel.make_schedule`; here, the stored one."""
    from diffusers import DDIMScheduler, DDPMScheduler

    flow_folder = scheduler_config.get("_class_name") in FLOW_SCHEDULERS or (
        scheduler_config.get("use_flow_sigmas") and scheduler_config.get("prediction_type") == "flow_prediction")
    if cfg.sampler == "flow":
        return flow_schedule(scheduler_config, cfg)
    if flow_folder:
        raise ConfigError(f"model.sampler: {cfg.sampler!r}, but the model's scheduler "
                          f"({scheduler_config.get('_class_name')}) is flow matching; use sampler: flow")
    if cfg.sampler == "ddim":
        sched = DDIMScheduler.from_config(scheduler_config)
        return GaussianSchedule.from_diffusers(sched, cfg.num_inference_steps, eta=cfg.eta,
                                               last_step_eta=cfg.last_step_eta)
    sched = DDPMScheduler.from_config(scheduler_config)
    return GaussianSchedule.from_diffusers(sched, cfg.num_inference_steps)


def flow_schedule(scheduler_config: dict, cfg: ModelConfig, image_seq_len: int | None = None,
                  window: frozenset[int] | None = None, sigmas: list[float] | None = None,
                  latent_size: int | None = None) -> FlowSchedule:
    """The :class:`FlowSchedule` of ``model.sampler: flow`` from a ``FlowMatchEulerDiscreteScheduler`` config:
    ``model.flow.shift`` overrides a static shift; with dynamic shifting ``mu`` is ``model.flow.mu`` or, as the
    pipelines compute it, from ``image_seq_len``; ``window`` (``None``: the configured window, or for a
    varying window the first one) holds the stochastic steps; ``latent_size`` (D) sets the ``mean_compat``
    log-prob scale 1/D."""
    name = scheduler_config.get("_class_name")
    if name not in FLOW_SCHEDULERS:
        raise ConfigError(f"model.sampler: 'flow' needs a flow-matching scheduler (FlowMatchEulerDiscreteScheduler); "
                          f"this model's is {name}")
    sc = dict(scheduler_config)
    f = cfg.flow
    if f.shift is not None:
        sc["shift"] = f.shift
    mu = None
    if sc.get("use_dynamic_shifting"):
        if f.mu is not None:
            mu = f.mu
        elif image_seq_len is not None:
            mu = resolution_mu(sc, image_seq_len)
        else:
            raise ConfigError("model.flow.mu: the scheduler shifts with the resolution (use_dynamic_shifting) and "
                              "this layout cannot say its token count; give model.flow.mu")
    T = cfg.num_inference_steps
    if window is None:
        window = f.window.draw(T, 0, 0) if f.window.kind != "random" else f.window.windows(T)[0]
    # the loaded model passes its latent size; a config-only schedule (preflight checks) leaves the scale at 1
    scale = 1.0 / latent_size if f.log_prob_reduction == "mean_compat" and latent_size else 1.0
    try:
        s = FlowSchedule.from_diffusers(sc, T, transition=f.transition, eta=cfg.eta, window=window, mu=mu,
                                        sigmas=sigmas, t1_guard=f.t1_guard)
    except ValueError as e:
        raise ConfigError(f"model.flow: {e}") from None
    s.log_prob_scale = scale
    return s


def resolve_model_folder(path: str) -> Path:
    """A local folder for ``model.path``: local, ``s3://`` (downloaded, verified), a plug-in scheme such as
    ``toy:NAME`` (entry-point group ``rlr_dist.model_sources``: a function NAME -> folder) or a hub id."""
    source = _model_source(path)
    if source is not None:
        try:
            return Path(source(path.split(":", 1)[1]))
        except ValueError as e:
            raise ModelError(f"model.path: {e}") from None
    if storage.is_s3(path):
        try:
            return storage.resolve(path)
        except storage.StorageError as e:
            raise ModelError(f"model.path: {e}") from None
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"model.path: {path!r} is a file; expected a diffusers model folder")
        return p
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if looks_like_hub_id and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(path))
        except Exception as e:  # network / auth / missing repo
            raise ModelError(f"model.path: cannot download hub model {path!r}: {e}") from None
    hint = " (and the hub is offline: HF_HUB_OFFLINE=1)" if looks_like_hub_id else ""
    raise ModelError(f"model.path: {path!r} does not exist{hint}")


def _model_source(path: str):
    """The resolver of ``path``'s scheme (``toy:`` ...) from the ``rlr_dist.model_sources`` entry points."""
    from importlib.metadata import entry_points

    scheme = path.split(":", 1)[0] if ":" in path and "://" not in path else None
    if not scheme:
        return None
    eps = {ep.name: ep for ep in entry_points(group="rlr_dist.model_sources")}
    return eps[scheme].load() if scheme in eps else None


def detect_layout(folder: Path) -> tuple[str, dict]:
    """``(layout, meta)`` from ``rlr_model.json`` or ``model_index.json``."""
    meta_file = folder / RLR_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("layout"):
        return meta["layout"], meta
    index = folder / "model_index.json"
    if index.is_file():
        entries = json.loads(index.read_text())
        unet = entries.get("unet") or entries.get("transformer")
        cls = unet[1] if isinstance(unet, list) and len(unet) == 2 else None
    elif (folder / "unet" / "config.json").is_file():
        cls = json.loads((folder / "unet" / "config.json").read_text()).get("_class_name")
    elif (folder / "transformer" / "config.json").is_file():
        cls = json.loads((folder / "transformer" / "config.json").read_text()).get("_class_name")
    else:
        raise ModelError(f"{folder}: not a diffusers model folder (no model_index.json, {RLR_META} or unet/config.json)")
    if cls in UNSUPPORTED:
        raise ModelError(f"{folder}: {UNSUPPORTED[cls]}")
    layout = layout_of_unet_class(cls)
    if layout is None:
        known = sorted({c.unet_class for _, c in MODELS.items() if c.detects_unet_class})
        raise ModelError(f"{folder}: unsupported denoiser class {cls!r}; supported: {known} (or name a layout: "
                         f"model.layout / {RLR_META})")
    return layout, meta


def _locate(cfg: ModelConfig | dict | str) -> tuple[ModelConfig, Path, type[DiffusionModel], dict]:
    from rlr_dist.config import build

    if isinstance(cfg, str):
        cfg = ModelConfig(path=cfg)
    elif isinstance(cfg, dict):
        cfg = build(ModelConfig, cfg, "model")
    folder = resolve_model_folder(cfg.path)
    if cfg.layout is not None and ":" in cfg.layout:  # a layout of the user's own, module:Class
        meta_file = folder / RLR_META
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        layout = cfg.layout
    else:
        layout, meta = detect_layout(folder)
        if cfg.layout is not None and cfg.layout != layout:
            raise ModelError(f"model.layout: {cfg.layout!r} given, but {folder} holds a {layout!r} model")
    try:
        cls = MODELS.get(layout, "model.layout")
    except ConfigError as e:
        raise ModelError(f"{folder}: {e}") from None
    return cfg, folder, cls, meta


def load_model(cfg: ModelConfig | dict | str, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load the model ``cfg`` names (a :class:`ModelConfig`, its dict form, or just a path)."""
    cfg, folder, cls, meta = _locate(cfg)
    return cls(folder, cfg, meta).to(device)


def load_decoder(cfg: ModelConfig | dict | str, device: str | torch.device = "cpu") -> nn.Module:
    """Only the frozen decoder of the model ``cfg`` names (latent -> images in [0, 1]), for reward actors."""
    cfg, folder, cls, _ = _locate(cfg)
    return cls.load_decoder(folder, cfg).to(device).requires_grad_(False).eval()
