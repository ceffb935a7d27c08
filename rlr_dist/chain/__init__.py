from rlr_dist.chain.base import Chain
from rlr_dist.chain.schedule import GaussianSchedule

__all__ = ["Chain", "GaussianSchedule"]
