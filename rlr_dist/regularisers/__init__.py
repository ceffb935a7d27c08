"""Regularisers toward the pretrained chain (KL, step-wise and surrogate f-divergences)."""
from rlr_dist.regularisers.regulariser import REGULARISERS, Regulariser

__all__ = ["REGULARISERS", "Regulariser"]
