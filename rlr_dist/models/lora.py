"""LoRA on a diffusers UNet through peft, and the "adapters disabled" reference view."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from rlr_dist.config import ConfigError
from rlr_dist.models.config import LoraConfig


def _matches(names: list[str], target: str) -> bool:
    return any(n == target or n.endswith("." + target) for n in names)


def add_lora(unet: nn.Module, cfg: LoraConfig, default_targets: list[str]) -> tuple[list[nn.Parameter], list[str]]:
    """Inject LoRA adapters into ``unet`` (base weights frozen); returns the trainable LoRA parameters.

    Returns ``(parameters, target module names)``. ``cfg.target_modules`` must each match a module; the layout's ``default_targets`` (used when
    the config names none) are filtered to those present.
    """
    from peft import LoraConfig as PeftLoraConfig, inject_adapter_in_model

    names = [n for n, _ in unet.named_modules()]
    if cfg.target_modules is not None:
        targets = list(cfg.target_modules)
        missing = [t for t in targets if not _matches(names, t)]
        if missing:
            raise ConfigError(f"model.lora.target_modules: {missing} match no module of {type(unet).__name__}")
    else:
        targets = [t for t in default_targets if _matches(names, t)]
        if not targets:
            raise ConfigError(f"model.lora.target_modules: none of the defaults {default_targets} exist in "
                              f"{type(unet).__name__}; name the modules to adapt")
    unet.requires_grad_(False)
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                              lora_dropout=cfg.dropout, target_modules=targets,
                              init_lora_weights=True)
    inject_adapter_in_model(peft_cfg, unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params, targets


def lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the base model. Flips peft's per-layer switch without touching ``requires_grad``
    (peft's public ``enable_adapters(False)`` would freeze the LoRA weights of the trained graph)."""
    layers = lora_layers(model)
    old = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, o in zip(layers, old):
            m._disable_adapters = o


def adapter_aware_checkpoint():
    """A per-block checkpoint function for diffusers' ``enable_gradient_checkpointing`` that records whether the
    block's LoRA adapters were on or off in the forward pass and sets them the same way in the recompute.

    The LoRA reference model is the trained model with adapters *disabled* for the length of a call; a plain
    checkpoint would recompute a reference block in backward with the adapters back on (a wrong gradient).
    """
    from torch.utils.checkpoint import checkpoint

    def ckpt(block: nn.Module, *args):
        layers = lora_layers(block)
        state = [m._disable_adapters for m in layers]

        def run(*a):
            old = [m._disable_adapters for m in layers]
            for m, s in zip(layers, state):
                m._disable_adapters = s
            try:
                return block(*a)
            finally:
                for m, o in zip(layers, old):
                    m._disable_adapters = o

        return checkpoint(run, *args, use_reentrant=False)

    return ckpt


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights in peft naming (``<module>.lora_A.weight``), as diffusers' ``load_lora_weights`` reads
    them once prefixed with ``unet.``."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def merged_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model state dict with every LoRA delta merged in (keys of the un-adapted model)."""
    out: dict[str, torch.Tensor] = {}
    deltas = {}
    for name, m in unet.named_modules():
        if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer") and not m._disable_adapters:
            for adapter in m.active_adapters:
                if adapter in getattr(m, "lora_A", {}):
                    d = m.get_delta_weight(adapter).detach()
                    deltas[f"{name}.weight"] = deltas.get(f"{name}.weight", 0) + d
    for k, v in unet.state_dict().items():
        if "lora_" in k:
            continue
        key = k.replace(".base_layer.", ".")
        out[key] = v.detach().clone()
    for k, d in deltas.items():
        out[k] = (out[k].float() + d.float()).to(out[k].dtype)
    return {k: v.cpu().contiguous() for k, v in out.items()}
