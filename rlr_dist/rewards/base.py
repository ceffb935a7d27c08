"""The reward contract: one registry, one scoring path, clear errors.

A :class:`Reward` scores *decoded* samples: float images in ``[0, 1]``, shaped ``(B, C, H, W)`` or, for
video, ``(B, C, F, H, W)``. :class:`RewardScorer` joins a reward to the model's decoder (identity
rescale for pixel models, the VAE for latent ones) so that ``score(x_0, prompts, need_grad)`` returns
``R`` (B,) and, for differentiable rewards, ``∂R/∂x_0`` with respect to the *latent* the chain produced.
The scorer is what a reward actor holds; estimators only ever see the two tensors.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from rlr_dist.registry import Registry

REWARDS: Registry[type["Reward"]] = Registry("reward")

Decoder = Callable[[Tensor], Tensor]


class RewardError(ValueError):
    """A reward produced something unusable (wrong shape, NaN/inf, no gradient); names the reward."""


class Reward(nn.Module, ABC):
    """Base class of every reward.

    Subclasses set ``differentiable`` (whether ``∂R/∂images`` is meaningful) and ``modality``
    (``"image"``: applied per frame to video; ``"video"``: needs 5-D input; ``"any"``).
    ``forward(images, prompts) -> (B,)`` must be a torch function of ``images`` when differentiable.
    """

    differentiable: bool = False
    modality: str = "image"

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    @abstractmethod
    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor: ...


def make_reward(name: str, **params) -> Reward:
    """Instantiate a registered reward by name (``params`` are its constructor arguments)."""
    cls = REWARDS.get(name)
    try:
        return cls(**params)
    except TypeError as e:
        raise RewardError(f"reward {name!r}: bad parameters {sorted(params)}: {e}") from None


def check_output(name: str, R: Tensor, batch: int) -> Tensor:
    """``R`` must be a finite tensor of shape ``(batch,)``; otherwise raise naming the reward."""
    if not isinstance(R, Tensor):
        raise RewardError(f"reward {name!r} returned {type(R).__name__}, expected a tensor of shape ({batch},)")
    if R.shape != (batch,):
        raise RewardError(f"reward {name!r} returned shape {tuple(R.shape)}, expected ({batch},)")
    bad = ~torch.isfinite(R.detach())
    if bad.any():
        idx = bad.nonzero().flatten().tolist()[:8]
        raise RewardError(f"reward {name!r} returned non-finite values (NaN/inf) for samples {idx}")
    return R


class RewardScorer:
    """A reward plus the decoder from the chain's latent ``x_0`` to images in ``[0, 1]``.

    ``score(x0, prompts, need_grad)`` -> ``(R, dR/dx0 or None)``, both detached, ``R`` float32 (B,).
    With ``need_grad`` the decoder and reward are differentiated with respect to ``x0``.
    """

    def __init__(self, reward: Reward, decoder: Decoder | None = None):
        self.reward = reward
        self.decoder = decoder if decoder is not None else (lambda x: (x / 2 + 0.5).clamp(0, 1))

    @property
    def differentiable(self) -> bool:
        return self.reward.differentiable

    def score(self, x0: Tensor, prompts: Sequence[str] | None = None,
              need_grad: bool = False) -> tuple[Tensor, Tensor | None]:
        name = self.reward.name
        if need_grad and not self.reward.differentiable:
            raise RewardError(f"reward {name!r} is not differentiable; the estimator needs ∂R/∂x_0 "
                              "(use a black-box estimator such as lr or rlr with fo=false)")
        B = x0.shape[0]
        with torch.enable_grad() if need_grad else torch.no_grad():
            x = x0.detach().requires_grad_(need_grad)
            R = check_output(name, self.reward(self.decoder(x), prompts), B)
            if not need_grad:
                return R.detach().float(), None
            if not R.requires_grad:
                raise RewardError(f"reward {name!r} claims to be differentiable but its output has no gradient")
            (g,) = torch.autograd.grad(R.sum(), x)
        if not torch.isfinite(g).all():
            raise RewardError(f"reward {name!r}: gradient ∂R/∂x_0 has non-finite values")
        return R.detach().float(), g.detach()
