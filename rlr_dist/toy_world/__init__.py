"""The embedded toy world: small models and rewards that ship inside the package (no download, CPU only).

Assets (``rlr_dist/assets/toy/<name>``, each a folder with ``manifest.json``):

* ``digits``        — class-conditional pixel DDPM on sklearn's digits, 16×16 (layout ``pixel``);
* ``moving-digits`` — its video twin, 8 frames of 16×24 on a tiny Wan transformer, conditioned on digit and
  direction (layout ``pixel_video_flow``, ``model.sampler: flow``);
* ``digits-flow``   — a rectified-flow digits model on a tiny SD3 transformer, 16×16 (layout ``pixel_flow``);
* ``classifier``    — the digit classifier used as the *training* reward (``digit_logprob``);
* ``evaluator``     — the held-out evaluator (other architecture, other data: MNIST) (``digit_evaluator``).

``asset_path(name)`` returns the folder; ``rlr-dist pretrain ...`` rebuilds them (``docs/toy-world.md``).
"""
from __future__ import annotations

from pathlib import Path

ASSETS = ("digits", "moving-digits", "digits-flow", "classifier", "evaluator")
ASSET_ROOT = Path(__file__).resolve().parent.parent / "assets" / "toy"


def asset_path(name: str) -> Path:
    """Folder of the shipped toy asset ``name``; ``ValueError`` naming it and the known names otherwise."""
    if name not in ASSETS:
        raise ValueError(f"unknown toy asset {name!r}; known assets: {', '.join(ASSETS)}")
    p = ASSET_ROOT / name
    if not (p / "manifest.json").is_file():
        raise ValueError(f"toy asset {name!r} is missing or incomplete at {p} (no manifest.json); rebuild it with "
                         f"`rlr-dist pretrain {'classifiers' if name in ('classifier', 'evaluator') else name}`; "
                         f"known assets: {', '.join(ASSETS)}")
    return p


__all__ = ["ASSETS", "ASSET_ROOT", "asset_path"]
