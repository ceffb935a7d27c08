"""Baselines and reward scaling for the likelihood-ratio terms (spec §2, §3.4).

Unbiasedness needs a baseline that does not depend on the noises of the sample it weights:
leave-one-out over the other samples of the same prompt, or running per-prompt statistics from
earlier iterations. A scale ``s`` is returned separately and applied to *every* term alike
(FO, HO, ZO and regulariser), so it only rescales the whole gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

BASELINES = ("loo", "running", "none")
SCALES = ("none", "running_std", "batch_std")


class Advantages:
    def __init__(self, baseline: str = "loo", scale: str = "none", momentum: float = 0.9, min_std: float = 1e-6):
        if baseline not in BASELINES:
            raise ValueError(f"advantages.baseline must be one of {BASELINES}, got {baseline!r}")
        if scale not in SCALES:
            raise ValueError(f"advantages.scale must be one of {SCALES}, got {scale!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"advantages.momentum must be in [0, 1), got {momentum}")
        self.baseline, self.scale, self.momentum, self.min_std = baseline, scale, momentum, min_std
        self.prompt_mean: dict[int, float] = {}
        self.std: float | None = None

    def __call__(self, returns: Tensor, prompt_ids: Tensor | None) -> Tensor:
        """``A = G − b`` with ``b`` independent of each sample's own noises."""
        G = returns.detach()
        if self.baseline == "none":
            return G
        ids = (prompt_ids if prompt_ids is not None else torch.zeros(G.shape[0], dtype=torch.long)).to(G.device)
        if self.baseline == "running":
            b = torch.tensor([self.prompt_mean.get(int(p), 0.0) for p in ids.tolist()], dtype=G.dtype, device=G.device)
            return G - b
        return G - leave_one_out_mean(G, ids)

    def scale_factor(self, rewards: Tensor) -> float:
        """``1/s`` for the whole gradient; 1 when ``s`` is not above ``min_std`` (every reward the same, e.g. no hit
        of a 0/1 reward: the group-baseline advantages are all 0 then, but a state baseline's are not, and
        ``1/min_std`` would blow them up a million times)."""
        if self.scale == "none":
            return 1.0
        if self.scale == "batch_std" or self.std is None:  # running_std falls back to the batch once
            s = float(rewards.detach().double().std()) if rewards.numel() > 1 else 1.0
        else:
            s = self.std
        return 1.0 / s if s > self.min_std else 1.0

    def update(self, rewards: Tensor, prompt_ids: Tensor | None) -> None:
        """Fold this iteration's rewards into the running statistics (call after the step)."""
        R = rewards.detach().double()
        m = self.momentum
        ids = (prompt_ids if prompt_ids is not None else torch.zeros(R.shape[0], dtype=torch.long)).to(R.device)
        for p in ids.unique():
            r = float(R[ids == p].mean())
            old = self.prompt_mean.get(int(p))
            self.prompt_mean[int(p)] = r if old is None else m * old + (1 - m) * r
        if R.numel() > 1:
            s = float(R.std())
            self.std = s if self.std is None else m * self.std + (1 - m) * s

    def state_dict(self) -> dict:
        return {"prompt_mean": dict(self.prompt_mean), "std": self.std}

    def load_state_dict(self, state: dict) -> None:
        self.prompt_mean = {int(k): float(v) for k, v in state["prompt_mean"].items()}
        self.std = state["std"]


def leave_one_out_mean(values: Tensor, groups: Tensor) -> Tensor:
    """Mean of the *other* members of each sample's group; a singleton group uses the rest of the batch
    (still independent of the sample itself); a batch of one gets 0."""
    B = values.shape[0]
    uniq, inv = groups.to(values.device).unique(return_inverse=True)
    sums = values.new_zeros(len(uniq)).index_add_(0, inv, values)
    counts = values.new_zeros(len(uniq)).index_add_(0, inv, torch.ones_like(values))
    n_other = counts[inv] - 1
    loo = (sums[inv] - values) / n_other.clamp_min(1)
    if B > 1:
        rest = (values.sum() - values) / (B - 1)
        loo = torch.where(n_other > 0, loo, rest)
    else:
        loo = torch.zeros_like(values)
    return loo
