"""Components defined outside the ``rlr_dist`` package, plugged in by dotted path — a template for your own.

Name them in a config as ``module:Class`` (importable from where you run ``rlr-dist``, or from the
``--working-dir`` of ``ray job submit``)::

    estimator: {name: jobs.plugins.example:StridedLR, stride: 2}
    reward: {name: jobs.plugins.example:CentreBrightness, border: 2}

Nothing in the package is edited: the config checks their parameters from the constructors' annotations,
the planner asks them what they cost (``backprop``, ``reads_frames``), and the samplers, reward actors and
learners import them as they import the built-in ones. ``jobs/configs/plugin-example.yaml`` runs them.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from rlr_dist.chain.trajectory import Plan
from rlr_dist.estimators.base import Backprop, Batch, Estimator, lr_term
from rlr_dist.registry import check_param
from rlr_dist.rewards.base import Reward


class StridedLR(Estimator):
    """DDPO's likelihood ratio on one residue class of the stochastic steps: each iteration draws an offset
    ``o`` in ``0..stride-1`` and trains on the steps ``k ≡ o (mod stride)``, each weighted ``stride``. Every
    stochastic step is trained with probability 1/stride, so the estimate stays unbiased (for those steps)
    at 1/stride of the backward passes; a deterministic step (σ = 0, the usual last one) is a fixed decoder."""

    def __init__(self, stride: int = 2) -> None:
        check_param("stride", stride >= 1, f"must be >= 1, got {stride}")
        self.stride = stride

    def check(self, schedule) -> None:
        if not any(schedule.stochastic(k) for k in range(1, schedule.T + 1)):
            raise ValueError("StridedLR: every step is deterministic (σ = 0); use eta > 0")

    def plan(self, schedule, generator: torch.Generator | None = None) -> Plan:
        offset = int(torch.randint(0, self.stride, (1,), generator=generator))
        steps = tuple(k for k in range(1, schedule.T + 1) if k % self.stride == offset and schedule.stochastic(k))
        return Plan(states=frozenset(steps), noises=frozenset(steps), steps=steps, step_weight=float(self.stride))

    def terms(self, b: Batch) -> Iterator[tuple[str, Tensor]]:
        for k in b.traj.plan.steps:
            yield f"lr:{k}", lr_term(b, k, b.traj.plan.step_weight)

    def backprop(self, T: int, regulariser) -> Backprop:
        return Backprop(segment=1, steps=1, calls=-(-T // self.stride))


class CentreBrightness(Reward):
    """Mean brightness of the image inside a ``border``-pixel frame minus the mean of the frame: rewards a
    bright subject on a dark background. Differentiable."""

    differentiable = True
    modality = "image"

    def __init__(self, border: int = 2) -> None:
        super().__init__()
        self.check_params(border)
        self.border = border

    @classmethod
    def check_params(cls, border: int = 2) -> None:
        check_param("border", border >= 1, f"must be >= 1, got {border}")

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        b = self.border
        inner = images[..., b:-b, b:-b]
        frame_sum = images.flatten(1).sum(1) - inner.flatten(1).sum(1)
        frame_n = images[0].numel() - inner[0].numel()
        return inner.flatten(1).mean(1) - frame_sum / frame_n


class Flaky(CentreBrightness):
    """:class:`CentreBrightness`, but NaN for every ``every``-th sample of a batch (from the second): a reward
    model that sometimes fails, to try ``on_nonfinite: drop`` with."""

    def __init__(self, border: int = 2, every: int = 3) -> None:
        super().__init__(border)
        self.check_params(border, every)
        self.every = every

    @classmethod
    def check_params(cls, border: int = 2, every: int = 3) -> None:
        super().check_params(border)
        check_param("every", every >= 2, f"must be >= 2, got {every}")

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        R = super().forward(images, prompts)
        bad = torch.arange(len(R), device=R.device) % self.every == 1
        return torch.where(bad, torch.full_like(R, float("nan")), R)
