"""A diffusers-style noise model (UNet + scheduler coefficients) as a :class:`~rlr_dist.chain.base.Chain`."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from rlr_dist.chain.schedule import GaussianSchedule

# model(x, t, cond) -> model output shaped like x; t is a (B,) long tensor of model timesteps.
ModelFn = Callable[[Tensor, Tensor, Any], Tensor]


class UNetFn(nn.Module):
    """Adapts a diffusers UNet to the ``model(x, t, cond)`` signature of :class:`DenoiserChain`.

    ``UNet2DConditionModel`` / ``UNet3DConditionModel`` get ``encoder_hidden_states=cond``;
    ``UNet2DModel`` gets ``class_labels=cond`` (omitted when ``cond`` is None). An ``nn.Module``
    so that parameters, ``deepcopy`` and ``.to()`` pass through to the UNet.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        from diffusers import UNet2DConditionModel, UNet2DModel, UNet3DConditionModel

        if isinstance(unet, (UNet2DConditionModel, UNet3DConditionModel)):
            self.cond_kwarg = "encoder_hidden_states"
        elif isinstance(unet, UNet2DModel):
            self.cond_kwarg = "class_labels"
        else:
            raise ValueError(
                f"unet_fn: unsupported model class {type(unet).__name__}; "
                "supported: UNet2DModel, UNet2DConditionModel, UNet3DConditionModel"
            )
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        kwargs = {} if cond is None and self.cond_kwarg == "class_labels" else {self.cond_kwarg: cond}
        return self.unet(x, t, **kwargs).sample


def unet_fn(unet: nn.Module) -> UNetFn:
    """``model(x, t, cond)`` callable (an ``nn.Module``) for a diffusers UNet."""
    return UNetFn(unet)


def _frozen(model: ModelFn) -> ModelFn:
    """``model`` with its parameters cut from the autograd graph (gradient still flows to the inputs).

    Detaching per call, rather than ``requires_grad_(False)``, leaves weights shared with the trained
    model (e.g. a LoRA-disabled view of it) trainable.
    """
    if not isinstance(model, nn.Module):
        return model
    detached = {name: p.detach() for name, p in model.named_parameters()}
    return lambda x, t, cond: functional_call(model, detached, (x, t, cond))


class DenoiserChain:
    """Gaussian chain ``x_{k-1} = μ_θ(x_k, k, c) + σ_k ε`` of a noise model under a :class:`GaussianSchedule`.

    Args:
      model: ``model(x, t, cond) -> output`` (see :func:`unet_fn`), trainable.
      schedule: the sampler's coefficients (e.g. :meth:`GaussianSchedule.from_diffusers`).
      guidance_scale: CFG scale ``w``; ``w != 1`` needs ``uncond`` (the null condition, e.g. empty-prompt
        embeddings of batch 1, or a null class label), broadcast over the batch.
      ref_model: frozen reference for :meth:`ref_mean` (same signature as ``model``). If it is an
        ``nn.Module``, its parameters are detached on each call (so it may share weights with ``model``);
        a plain callable must not depend on trainable tensors.
      params: explicit trainable parameters (required when ``model`` is not an ``nn.Module``).
    """

    def __init__(self, model: ModelFn, schedule: GaussianSchedule, guidance_scale: float = 1.0,
                 uncond: Any = None, ref_model: ModelFn | None = None, params: Iterable[Tensor] | None = None):
        if guidance_scale != 1.0 and uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs uncond (the null condition for CFG)")
        self.model = model
        self.schedule = schedule
        self.guidance_scale = float(guidance_scale)
        self.uncond = uncond
        self.ref_model = ref_model
        self._params = None if params is None else list(params)

    # ------------------------------------------------------------------ model output
    def _uncond_like(self, cond: Tensor) -> Tensor:
        """``uncond`` broadcast to ``cond``'s batch (a 0-d null label becomes shape ``(1,)`` first)."""
        u = self.uncond.to(cond.device)
        if u.dim() < cond.dim():
            u = u.unsqueeze(0)
        return u.expand(cond.shape[0], *u.shape[1:])

    def _output(self, model: ModelFn, x: Tensor, k: int | Tensor, cond: Any) -> Tensor:
        """(Guided) model output at step k. With CFG both branches run in one batched call."""
        t = self.schedule.timesteps.to(x.device)[k]
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        if self.guidance_scale == 1.0:
            return model(x, t, cond)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self._uncond_like(cond), cond]))
        out_u, out_c = both.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)

    # ------------------------------------------------------------------ Chain protocol
    def mean(self, x: Tensor, k: int | Tensor, cond: Any) -> Tensor:
        """``μ_θ(x_k, k, c)``; differentiable in the trainable weights and in ``x``."""
        return self.schedule.mean(x, self._output(self.model, x, k, cond), k)

    def ref_mean(self, x: Tensor, k: int | Tensor, cond: Any) -> Tensor:
        """``μ_ref(x_k, k, c)``; differentiable in ``x`` only."""
        if self.ref_model is None:
            raise ValueError("DenoiserChain.ref_mean needs ref_model (pass a frozen copy of the model)")
        return self.schedule.mean(x, self._output(_frozen(self.ref_model), x, k, cond), k)

    def trainable_parameters(self) -> list[Tensor]:
        """``params=`` if given, else the parameters of ``model`` that require grad."""
        if self._params is not None:
            return self._params
        if not isinstance(self.model, nn.Module):
            raise ValueError("DenoiserChain: model is not an nn.Module; pass params= to name its trainable weights")
        return [p for p in self.model.parameters() if p.requires_grad]
