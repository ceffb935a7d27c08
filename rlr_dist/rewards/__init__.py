"""The reward zoo: importing this package registers every reward in :data:`REWARDS`."""
from rlr_dist.rewards import aesthetic, combine, digits, image, video  # noqa: F401  (registration)
from rlr_dist.rewards.base import (REWARDS, Reward, RewardError, RewardParamError, RewardScorer, apply_reward,
                                   make_reward)
from rlr_dist.rewards.config import RewardConfig, build_reward, build_scorer

__all__ = ["REWARDS", "Reward", "RewardError", "RewardParamError", "RewardScorer", "RewardConfig",
           "apply_reward", "build_reward", "build_scorer", "make_reward"]
