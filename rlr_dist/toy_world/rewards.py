"""Digit rewards of the embedded toy world, registered in :data:`rlr_dist.rewards.REWARDS` through the
package's ``rlr_dist.rewards`` entry points (the core never imports the toy world).

* ``digit_logprob``   — ``log p(target | image)`` under the *training* classifier (sklearn digits); the reward
  to fine-tune against. Differentiable.
* ``digit_evaluator`` — ``log p(target | image)`` under the *held-out* evaluator (another architecture trained
  on MNIST); use it to check that a gain in the training reward is real and not reward hacking.
* :func:`evaluate_digits` — summary numbers for reports (mean log p(target), fraction predicted as target,
  per-class prediction counts, entropy of the predicted classes).

Images are in ``[0, 1]``, ``(B, 1, 16, W)`` with ``W >= 16``; video ``(B, 1, F, 16, W)`` is scored per frame and
averaged over frames. Other heights are resized to 16 (aspect kept), RGB is averaged to grey.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rlr_dist.config import PathArg
from rlr_dist.registry import check_param
from rlr_dist.rewards.base import REWARDS, Reward, RewardError


def _load(path: str | Path | None, default: str):
    from rlr_dist.storage import resolve
    from rlr_dist.toy_world import asset_path
    from rlr_dist.toy_world.classifiers import load_classifier

    return load_classifier(resolve(path) if path else asset_path(default))


def _to_frames(images: Tensor) -> tuple[Tensor, int]:
    """``(B, C, H, W)`` or ``(B, C, F, H, W)`` in [0, 1] -> grey 16-high frames ``(B·F, 1, 16, W')`` and ``F``."""
    if images.dim() == 5:
        B, C, Fr, H, W = images.shape
        images = images.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
    elif images.dim() == 4:
        Fr = 1
    else:
        raise RewardError(f"digit rewards take images (B, C, H, W) or video (B, C, F, H, W); got {tuple(images.shape)}")
    if images.shape[1] == 3:
        images = images.mean(1, keepdim=True)
    elif images.shape[1] != 1:
        raise RewardError(f"digit rewards take 1 or 3 channels; got {images.shape[1]}")
    H, W = images.shape[-2:]
    if H != 16:
        images = F.interpolate(images, size=(16, max(16, round(W * 16 / H))), mode="bilinear", align_corners=False)
    elif W < 16:
        raise RewardError(f"digit rewards need images at least 16 pixels wide; got width {W}")
    return images, Fr


def _logprob(model: torch.nn.Module, images: Tensor, target: int) -> Tensor:
    frames, Fr = _to_frames(images)
    lp = torch.log_softmax(model(frames).float(), dim=1)[:, target]
    return lp.reshape(-1, Fr).mean(1)


def _check_target(target) -> int:
    ok = isinstance(target, int) and not isinstance(target, bool) and 0 <= target <= 9
    check_param("target", ok, f"must be a digit 0..9 (int), got {target!r}")
    return int(target)


@REWARDS.register("digit_logprob")
class DigitLogProb(Reward):
    """``log p(target | x)`` under the training classifier (``path``: a classifier folder; default shipped)."""

    differentiable = True
    modality = "image"
    default_asset = "classifier"

    def __init__(self, target: int = 3, path: PathArg | None = None):
        super().__init__()
        self.target = _check_target(target)
        self.classifier = _load(path, self.default_asset)

    @classmethod
    def check_params(cls, target: int = 3, path: PathArg | None = None) -> None:
        _check_target(target)

    @classmethod
    def eval_metric_names(cls) -> list[str]:
        return ["class_entropy", "logp_target"]

    def eval_metrics(self, images: Tensor, prompts: Sequence[str] | None = None) -> dict[str, float]:
        """Diversity of the predicted classes (entropy in bits; log2 10 = 3.32 is uniform) and the mean
        log p(target), under this reward's network."""
        ev = _summary(self.classifier, images, self.target)
        return {"class_entropy": ev["entropy_bits"], "logp_target": ev["mean_logp_target"]}

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        return _logprob(self.classifier, images, self.target)


@REWARDS.register("digit_evaluator")
class DigitEvaluator(DigitLogProb):
    """``log p(target | x)`` under the held-out evaluator (other architecture, trained on MNIST)."""

    default_asset = "evaluator"


@REWARDS.register("digit_evaluator_hit")
class DigitEvaluatorHit(DigitLogProb):
    """1 when the held-out evaluator's top class is ``target``, else 0: its mean over samples is the
    fraction of samples the evaluator reads as the target digit (a report metric, not a training reward)."""

    differentiable = False
    default_asset = "evaluator"

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        frames, Fr = _to_frames(images)
        hit = (self.classifier(frames).argmax(1) == self.target).float()
        return hit.reshape(-1, Fr).mean(1)


@lru_cache(maxsize=4)
def _cached(path: str | None, default: str):
    return _load(path, default)


@torch.no_grad()
def _summary(model: torch.nn.Module, images: Tensor, target: int | None) -> dict:
    frames, _ = _to_frames(images)
    lp = torch.cat([torch.log_softmax(model(c).float(), 1) for c in frames.split(512)])
    pred = lp.argmax(1)
    counts = torch.bincount(pred, minlength=10)
    p = counts.float() / max(1, len(pred))
    nz = p[p > 0]
    out = {"n": len(pred), "counts": counts.tolist(), "entropy_bits": float(-(nz * nz.log2()).sum()),
           "mean_confidence": float(lp.max(1).values.exp().mean())}
    if target is not None:
        t = int(target)
        out.update(mean_logp_target=float(lp[:, t].mean()), std_logp_target=float(lp[:, t].std()) if len(lp) > 1 else 0.0,
                   frac_target=float((pred == t).float().mean()))
    return out


def evaluate_digits(images: Tensor, target: int | None = None, path: str | None = None,
                    which: str = "evaluator") -> dict:
    """Report numbers for images ``(B, 1, 16, W)`` (or video, per frame) in ``[0, 1]``.

    ``which``: ``"evaluator"`` (default, held out) or ``"classifier"`` (the training reward); ``path``
    overrides the folder. Returns ``n`` (images or frames scored), ``counts`` (predictions per class),
    ``entropy_bits`` (of the predicted-class histogram; log2(10) = 3.32 is uniform), ``mean_confidence``
    and, with ``target``: ``mean_logp_target``, ``std_logp_target`` and ``frac_target``.
    """
    return _summary(_cached(str(path) if path else None, which), images, target)
