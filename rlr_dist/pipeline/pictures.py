"""Pictures a person looks at: sample grids (PNG), videos as animated GIF grids, reward curves."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor


def grid(images: Tensor, cols: int | None = None, pad: int = 1) -> Tensor:
    """``(N, C, H, W)`` in [0, 1] -> one ``(C, H', W')`` image."""
    n, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, cols)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return out


def _pil(img: Tensor, scale: int):
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr[0] if arr.shape[0] == 1 else arr.permute(1, 2, 0)
    im = Image.fromarray(arr.numpy())
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


READABLE_PX = 640  # small samples are enlarged (nearest neighbour) until the grid is about this wide


def save_samples(images: Tensor, stem: str | Path, cols: int | None = None) -> Path:
    """Images ``(N, C, H, W)`` -> ``stem.png``; videos ``(N, C, F, H, W)`` -> ``stem.gif`` (a grid per frame).
    Tiny samples (the toy world's 16 px) are enlarged so the grid is about ``READABLE_PX`` wide."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    images = images.float().cpu()
    width = (cols or math.ceil(math.sqrt(len(images)))) * (images.shape[-1] + 1) + 1
    scale = min(16, max(1, math.ceil(READABLE_PX / width)))
    if images.dim() == 5:
        frames = [_pil(grid(images[:, :, f], cols), scale) for f in range(images.shape[2])]
        path = stem.with_suffix(".gif")
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=150, loop=0)
        return path
    path = stem.with_suffix(".png")
    _pil(grid(images, cols), scale).save(path)
    return path


def reward_curve(history: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """Line plot of metric histories ``{name: [(step, value), ...]}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, pts in history.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
