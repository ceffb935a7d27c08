"""The reward zoo: importing this package registers every built-in reward in :data:`REWARDS`; plug-ins
(the toy world's digit rewards among them) register through the ``rlr_dist.rewards`` entry points."""
from rlr_dist.rewards import aesthetic, combine, image, video  # noqa: F401  (registration)
from rlr_dist.rewards.base import REWARDS, Reward, RewardError, RewardScorer, apply_reward
from rlr_dist.rewards.config import RewardSpec, build_scorer

__all__ = ["REWARDS", "Reward", "RewardError", "RewardScorer", "RewardSpec", "apply_reward", "build_scorer"]
