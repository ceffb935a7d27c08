"""Digit rewards of the embedded toy world, registered in :data:`rlr_dist.rewards.REWARDS` through the
package's ``rlr_dist.rewards`` entry points (the core never imports the toy world).

* ``digit_logprob``   — ``log p(target | image)`` under the *training* classifier (sklearn digits); the reward
  to fine-tune against. Differentiable.
* ``digit_hit``       — 1 when the *training* classifier's argmax is the target, else 0 (video: the fraction
  of frames); a black-box training reward (not differentiable: estimators that need ``∂R/∂x_0`` refuse it).
* ``digit_evaluator`` — ``log p(target | image)`` under the *held-out* evaluator (another architecture trained
  on MNIST); use it to check that a gain in the training reward is real and not reward hacking.
* ``digit_identity``  — identity consistency of a clip: ``−mean_f KL(p̄ ‖ p_f)`` of the training classifier's
  per-frame class probabilities ``p_f`` against their clip mean ``p̄`` (0 when every frame reads the same).
  Differentiable; a video reward.
* ``video_evaluator_hit`` — the held-out *video* evaluator: 1 when the held-out evaluator reads the target
  digit on most frames and (with ``direction``) the clip moves that way, measured by frame-to-frame
  displacement (:func:`rlr_dist.rewards.video.frame_shifts`), not by the centre of mass the ``motion``
  training reward reads; neither part shares weights or code with a training reward.
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


@REWARDS.register("digit_hit")
class DigitHit(DigitLogProb):
    """1 when the *training* classifier's top class is ``target``, else 0 — a black-box training reward (an
    argmax has no useful gradient). Video: the fraction of frames read as ``target``. The held-out evaluator's
    counterpart is ``digit_evaluator_hit``; this one never loads the evaluator."""

    differentiable = False
    default_asset = "classifier"

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        frames, Fr = _to_frames(images)
        hit = (self.classifier(frames).argmax(1) == self.target).float()
        return hit.reshape(-1, Fr).mean(1)


@REWARDS.register("digit_evaluator_hit")
class DigitEvaluatorHit(DigitHit):
    """1 when the held-out evaluator's top class is ``target``, else 0: its mean over samples is the
    fraction of samples the evaluator reads as the target digit (a report metric, not a training reward)."""

    default_asset = "evaluator"


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


def _frame_probs(model: torch.nn.Module, video: Tensor) -> Tensor:
    """Per-frame class log-probabilities ``(B, F, 10)`` of a clip ``(B, C, F, H, W)``."""
    if video.dim() != 5:
        raise RewardError(f"video digit rewards take (B, C, F, H, W); got {tuple(video.shape)}")
    frames, Fr = _to_frames(video)
    return torch.log_softmax(model(frames).float(), dim=1).reshape(video.shape[0], Fr, -1)


@REWARDS.register("digit_identity")
class DigitIdentity(Reward):
    """Identity consistency: ``−(1/F) Σ_f KL(p̄ ‖ p_f)`` with ``p_f`` the training classifier's class
    probabilities on frame ``f`` and ``p̄`` their mean over the clip — 0 when every frame reads as the same
    digit, negative when the digit changes between frames. Differentiable."""

    differentiable = True
    modality = "video"

    def __init__(self, path: PathArg | None = None):
        super().__init__()
        self.classifier = _load(path, "classifier")

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        logp = _frame_probs(self.classifier, images)  # (B, F, 10)
        p_bar = logp.exp().mean(dim=1, keepdim=True)
        kl = (p_bar * (p_bar.clamp_min(1e-12).log() - logp)).sum(-1)  # (B, F)
        return -kl.mean(dim=1)


@REWARDS.register("video_evaluator_hit")
class VideoEvaluatorHit(Reward):
    """The held-out video evaluator: 1 when the held-out evaluator's top class is ``target`` on at least half
    of the frames and, with ``direction``, the clip's net frame-to-frame displacement points that way; else 0.
    The mean over clips is the fraction of clips that show the target digit moving the right way.
    ``eval_metrics`` splits it: per-frame digit accuracy, fraction moving the right way, fraction whose top
    class is the same on every frame, and the entropy of the clips' majority classes."""

    differentiable = False
    modality = "video"

    def __init__(self, target: int = 3, direction: str | None = "right", path: PathArg | None = None):
        super().__init__()
        self.check_params(target, direction, path)
        self.target, self.direction = int(target), direction
        self.evaluator = _load(path, "evaluator")

    @classmethod
    def check_params(cls, target: int = 3, direction: str | None = "right", path: PathArg | None = None) -> None:
        _check_target(target)
        check_param("direction", direction in (None, "right", "left"),
                    f"must be 'right', 'left' or null, got {direction!r}")

    @classmethod
    def eval_metric_names(cls) -> list[str]:
        return ["frac_digit_frames", "frac_direction", "frac_identity", "class_entropy"]

    @torch.no_grad()
    def parts(self, images: Tensor) -> dict[str, Tensor]:
        from rlr_dist.rewards.video import frame_shifts

        pred = _frame_probs(self.evaluator, images).argmax(-1)  # (B, F)
        digit = (pred == self.target).float()
        shift = frame_shifts(images).sum(dim=1)
        if self.direction is None:
            moving = torch.ones_like(shift, dtype=torch.bool)
        else:
            moving = shift > 0 if self.direction == "right" else shift < 0
        return {"digit_frames": digit.mean(dim=1), "moving": moving.float(), "majority": pred.mode(dim=1).values,
                "identity": (pred == pred[:, :1]).all(dim=1).float()}

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        p = self.parts(images)
        return ((p["digit_frames"] >= 0.5) & (p["moving"] > 0)).float()

    def eval_metrics(self, images: Tensor, prompts: Sequence[str] | None = None) -> dict[str, float]:
        p = self.parts(images)
        counts = torch.bincount(p["majority"], minlength=10).float()
        q = counts[counts > 0] / counts.sum()
        return {"frac_digit_frames": float(p["digit_frames"].mean()), "frac_direction": float(p["moving"].mean()),
                "frac_identity": float(p["identity"].mean()), "class_entropy": max(0.0, float(-(q * q.log2()).sum()))}
