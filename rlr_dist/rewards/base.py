"""The reward contract: one registry, one scoring path, clear errors.

A :class:`Reward` scores *decoded* samples: float images in ``[0, 1]``, shaped ``(B, C, H, W)`` or, for
video, ``(B, C, F, H, W)``. :class:`RewardScorer` joins a reward to the model's decoder (identity
rescale for pixel models, the VAE for latent ones) so that ``score(x_0, prompts, need_grad)`` returns
``R`` (B,) and, for differentiable rewards, ``∂R/∂x_0`` with respect to the *latent* the chain produced.
The scorer is what a reward actor holds; estimators only ever see the two tensors.

:func:`apply_reward` is the one place that matches a reward's ``modality`` to its input: an ``image``
reward given video is applied frame by frame and averaged over frames, a ``video`` reward given images
is an error. Composite rewards (``weighted_sum``, ``video_frames``) call their parts through it too.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from rlr_dist.registry import Registry, check_param

Decoder = Callable[[Tensor], Tensor]
MODALITIES = ("image", "video", "any")


class RewardError(ValueError):
    """A reward produced something unusable (wrong shape, NaN/inf, no gradient); names the reward."""


class Reward(nn.Module, ABC):
    """Base class of every reward; register with ``@REWARDS.register("name")`` (or name it in a config as
    ``module:Class``). Constructor arguments are the reward's config parameters, written beside its name
    (``reward: {name: digit_logprob, target: 3}``); annotate them (types are checked before Ray starts) and
    raise :class:`~rlr_dist.registry.ParamError` for a bad value. A ``check_params`` classmethod, when
    defined, validates values without loading weights (it runs at config time).

    Subclasses set ``differentiable`` (whether ``∂R/∂images`` is meaningful) and ``modality``
    (``"image"``: applied per frame to video; ``"video"``: needs 5-D input; ``"any"``).
    ``forward(images, prompts) -> (B,)`` must be a torch function of ``images`` when differentiable.
    Call rewards through :func:`apply_reward` (or a :class:`RewardScorer`) rather than directly, so
    modality and output checks apply.

    The classmethods answer questions about a reward from its parameters alone, without loading it
    (the planner and config checks ask them): ``is_differentiable``, ``reads_frames``, ``vision_tower``.
    """

    differentiable: bool = False
    modality: str = "image"

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    @abstractmethod
    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor: ...

    def frames(self, num: int) -> list[int] | None:
        """The frames of a ``num``-frame video this reward reads (sorted), or ``None`` for all of them.
        A :class:`RewardScorer` decodes only these; the others reach ``forward`` as zeros."""
        return None

    def eval_metrics(self, images: Tensor, prompts: Sequence[str] | None = None) -> dict[str, float]:
        """Extra report numbers of an *evaluation* reward on a batch (e.g. diversity of predicted classes);
        logged under ``eval/<name>``, named by :meth:`eval_metric_names`. None by default."""
        return {}

    @classmethod
    def eval_metric_names(cls) -> list[str]:
        """The names :meth:`eval_metrics` reports (so a sweep can be told to optimise one of them)."""
        return []

    # ------------------------------------------------------------------ answers from parameters
    @classmethod
    def is_differentiable(cls, params: dict) -> bool:
        """Whether the reward with these parameters gives ``∂R/∂x_0`` (composites: every part)."""
        return bool(cls.differentiable)

    @classmethod
    def reads_frames(cls, params: dict, num: int) -> list[int] | None:
        """:meth:`frames` of the reward these parameters make, without making it."""
        return None

    @classmethod
    def vision_tower(cls, params: dict) -> list[dict]:
        """Configs of the image networks the reward runs (e.g. a CLIP vision model), for the planner."""
        return []


REWARDS: Registry[type[Reward]] = Registry("reward", base=Reward, group="rlr_dist.rewards")


def split_spec(spec: Any, field: str, reserved: dict[str, Any] | None = None) -> tuple[str, dict, dict]:
    """A nested reward written flat, ``{name: ..., <parameters>, <reserved keys>}`` ->
    ``(name, parameters, reserved values)``; errors name ``field``."""
    reserved = reserved or {}
    check_param(field, isinstance(spec, dict) and "name" in spec,
                f"expected a mapping {{name: ..., <parameters>}}, got {spec!r}")
    params = {k: v for k, v in spec.items() if k != "name" and k not in reserved}
    return spec["name"], params, {k: spec.get(k, d) for k, d in reserved.items()}


def nested_class(spec: Any, field: str, reserved: dict[str, Any] | None = None) -> tuple[type[Reward], dict]:
    """The class and parameters of a nested reward spec (for the classmethod answers)."""
    name, params, _ = split_spec(spec, field, reserved)
    return REWARDS.get(name, field), params


def check_output(name: str, R: Tensor, batch: int) -> Tensor:
    """``R`` must be a finite tensor of shape ``(batch,)``; otherwise raise naming the reward."""
    check_shape(name, R, batch)
    bad = ~torch.isfinite(R.detach())
    if bad.any():
        idx = bad.nonzero().flatten().tolist()[:8]
        raise RewardError(f"reward {name!r} returned non-finite values (NaN/inf) for samples {idx}")
    return R


def check_shape(name: str, R: Tensor, batch: int) -> Tensor:
    """``R`` must be a tensor of shape ``(batch,)`` (values not checked); otherwise raise naming the reward."""
    if not isinstance(R, Tensor):
        raise RewardError(f"reward {name!r} returned {type(R).__name__}, expected a tensor of shape ({batch},)")
    if R.shape != (batch,):
        raise RewardError(f"reward {name!r} returned shape {tuple(R.shape)}, expected ({batch},)")
    return R


def repeat_prompts(prompts: Any, times: int) -> Any:
    """Each sample's prompt (or conditioning row) repeated ``times`` times, sample-major."""
    if prompts is None:
        return None
    if isinstance(prompts, Tensor):
        return prompts.repeat_interleave(times, dim=0)
    return [p for p in prompts for _ in range(times)]


def frames_to_batch(video: Tensor) -> Tensor:
    """``(B, C, F, H, W)`` -> ``(B·F, C, H, W)``, sample-major (frame ``f`` of sample ``b`` at ``b·F + f``)."""
    B, C, F, H, W = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(B * F, C, H, W)


def batch_to_frames(images: Tensor, frames: int) -> Tensor:
    """The inverse of :func:`frames_to_batch`: ``(B·F, C, H, W)`` -> ``(B, C, F, H, W)``."""
    n, C, H, W = images.shape
    return images.reshape(n // frames, frames, C, H, W).permute(0, 2, 1, 3, 4)


def apply_reward(reward: Reward, images: Tensor, prompts: Sequence[str] | None = None, *,
                 name: str | None = None, finite: bool = True) -> Tensor:
    """``reward(images, prompts)`` with modality handling and output checks; returns ``(B,)``.

    An ``image`` reward on ``(B, C, F, H, W)`` scores the ``B·F`` frames (prompts repeated per frame) and
    averages over frames; a ``video`` reward on 4-D input raises. ``name`` overrides the name used in
    errors; ``finite=False`` checks only the shape (for callers that handle NaN/inf themselves).
    """
    name = name or reward.name
    check = check_output if finite else check_shape
    if images.dim() not in (4, 5):
        raise RewardError(f"reward {name!r}: expected images (B, C, H, W) or video (B, C, F, H, W), "
                          f"got shape {tuple(images.shape)}")
    if reward.modality == "video" and images.dim() == 4:
        raise RewardError(f"reward {name!r} scores video (B, C, F, H, W) but was given images of shape "
                          f"{tuple(images.shape)}")
    if reward.modality == "image" and images.dim() == 5:
        B, F = images.shape[0], images.shape[2]
        R = check(name, reward(frames_to_batch(images), repeat_prompts(prompts, F)), B * F)
        return R.view(B, F).mean(dim=1)
    return check(name, reward(images, prompts), images.shape[0])


class RewardScorer:
    """A reward plus the decoder from the chain's latent ``x_0`` to images in ``[0, 1]``.

    ``score(x0, prompts, need_grad)`` -> ``(R, dR/dx0 or None)``, both detached, ``R`` float32 (B,).
    With ``need_grad`` the decoder and reward are differentiated with respect to ``x0``.

    ``on_nonfinite``: ``"fail"`` raises on a NaN/inf reward; ``"drop"`` keeps going and reports which
    samples to drop through :meth:`score_keep` (their ``R`` and gradient are set to 0); a batch with no
    finite reward still raises.
    """

    def __init__(self, reward: Reward, decoder: Decoder | None = None,
                 on_nonfinite: Literal["fail", "drop"] = "fail"):
        if on_nonfinite not in ("fail", "drop"):
            raise RewardError(f"reward {reward.name!r}: on_nonfinite must be 'fail' or 'drop', got {on_nonfinite!r}")
        self.reward = reward
        self.decoder = decoder if decoder is not None else (lambda x: (x / 2 + 0.5).clamp(0, 1))
        self.on_nonfinite = on_nonfinite

    @property
    def differentiable(self) -> bool:
        return self.reward.differentiable

    def decode(self, x0: Tensor) -> Tensor:
        """Images of ``x0``; of a video ``(B, C, F, H, W)`` only the frames the reward reads are decoded
        (decoders work frame by frame), the rest are zeros outside the graph.

        A decoder that compresses time (a causal video VAE, e.g. Wan's: latent frame ``i`` makes several
        frames) says so with ``pixel_frames(latent_frames) -> frames`` and ``decode_frames(z, frames)`` (the
        decoded frames at those indices): it is asked only for the frames the reward reads."""
        if x0.dim() == 5 and hasattr(self.decoder, "decode_frames"):
            F = self.decoder.pixel_frames(x0.shape[2])
            idx = self.reward.frames(F)
            idx = list(range(F)) if idx is None else idx
            part = self.decoder.decode_frames(x0, idx)
            if len(idx) == F:
                return part
            at = torch.tensor(idx, device=part.device)
            full = part.new_zeros(*part.shape[:2], F, *part.shape[3:])
            return full.index_copy(2, at, part)
        return self._on_read_frames(self.decoder, x0)

    def _on_read_frames(self, fn, x0: Tensor, *alike: Tensor) -> Tensor:
        """``fn(x0, *alike)`` on the frames the reward reads only (``alike`` indexed like ``x0``), zeros at the
        frames it skips; images and non-subsampled clips pass whole."""
        idx = self.reward.frames(x0.shape[2]) if x0.dim() == 5 else None
        if idx is None or len(idx) == x0.shape[2]:
            return fn(x0, *alike)
        at = torch.tensor(idx, device=x0.device)
        part = fn(*(t.index_select(2, at) for t in (x0, *alike)))
        full = part.new_zeros(*part.shape[:2], x0.shape[2], *part.shape[3:])
        return full.index_copy(2, at, part)

    @property
    def sliced(self) -> bool:
        """``∂R/∂x_0`` is taken in two passes (:meth:`_decoder_vjp`): a frame-wise decoder with a slice size
        (``model.vae_slicing``) that offers ``vjp``."""
        return bool(getattr(self.decoder, "slice_size", None)) and hasattr(self.decoder, "vjp")

    def _decoder_vjp(self, x0: Tensor, grad_images: Tensor) -> Tensor:
        """``∂R/∂x_0`` from ``∂R/∂images``, through the decoder one slice at a time (only the frames the reward
        reads): peak decoder activations of one slice instead of every decoded frame, for a second decode."""
        return self._on_read_frames(self.decoder.vjp, x0, grad_images)

    def score(self, x0: Tensor, prompts: Sequence[str] | None = None,
              need_grad: bool = False) -> tuple[Tensor, Tensor | None]:
        R, g, _ = self.score_keep(x0, prompts, need_grad)
        return R, g

    def score_keep(self, x0: Tensor, prompts: Sequence[str] | None = None,
                   need_grad: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
        """As :meth:`score`, plus ``keep`` (B,) bool: False where the reward was non-finite (drop mode)."""
        name = self.reward.name
        if need_grad and not self.reward.differentiable:
            raise RewardError(f"reward {name!r} is not differentiable; the estimator needs ∂R/∂x_0 "
                              "(use a black-box estimator such as lr or rlr with fo=false)")
        drop = self.on_nonfinite == "drop"
        B = x0.shape[0]
        sliced = need_grad and self.sliced
        with torch.enable_grad() if need_grad else torch.no_grad():
            x = x0.detach().requires_grad_(need_grad and not sliced)
            if sliced:  # the reward differentiated on the images; the decoder one slice at a time below
                with torch.no_grad():
                    images = self.decode(x)
                images.requires_grad_(True)
            else:
                images = self.decode(x)
            R = apply_reward(self.reward, images, prompts, finite=not drop)
            keep = torch.isfinite(R.detach())
            if not keep.any():
                raise RewardError(f"reward {name!r} returned non-finite values (NaN/inf) for every sample")
            R_kept = torch.where(keep, R, torch.zeros_like(R))
            if not need_grad:
                return R_kept.detach().float(), None, keep
            if not R.requires_grad:
                raise RewardError(f"reward {name!r} claims to be differentiable but its output has no gradient")
            (g,) = torch.autograd.grad(R_kept.sum(), images if sliced else x)
        if sliced:
            g = self._decoder_vjp(x, g)
        if not keep.all():
            g = torch.where(keep.view(B, *[1] * (g.dim() - 1)), g, torch.zeros_like(g))
        if not torch.isfinite(g).all():
            raise RewardError(f"reward {name!r}: gradient ∂R/∂x_0 has non-finite values")
        return R_kept.detach().float(), g.detach(), keep
