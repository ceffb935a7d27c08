"""What every estimator needs from a model: the Gaussian transition mean, its reference, its weights."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from rlr_dist.chain.schedule import GaussianSchedule


@runtime_checkable
class Chain(Protocol):
    """A denoiser in Gaussian form (spec §1).

    ``mean`` must keep the autograd graph to the trainable parameters *and* to ``x`` (pathwise terms
    back-propagate through states); ``ref_mean`` is the frozen reference model (LoRA disabled, or a
    frozen copy) and keeps the graph to ``x`` only. ``k`` is the step index (int), ``cond`` whatever the
    model consumes (text embeddings, class labels, ``None``).
    """

    schedule: GaussianSchedule

    def mean(self, x: Tensor, k: int, cond: Any) -> Tensor: ...

    def ref_mean(self, x: Tensor, k: int, cond: Any) -> Tensor: ...

    def trainable_parameters(self) -> list[Tensor]: ...
