"""Gradient estimators as surrogate losses. Importing this package registers all of them."""
from rlr_dist.estimators.advantages import Advantages
from rlr_dist.estimators.base import ESTIMATORS, Batch, Estimator, backward_terms
from rlr_dist.estimators import baselines as _baselines  # noqa: F401  (registers lr, truncated_bp, full_bp)
from rlr_dist.estimators import rlr as _rlr  # noqa: F401  (registers rlr)
from rlr_dist.estimators import release as _release  # noqa: F401  (registers rlr_release: biased, reproduction)

__all__ = ["Advantages", "ESTIMATORS", "Batch", "Estimator", "backward_terms"]
