from rlr_dist.regularisers.regulariser import REGULARISERS, Regulariser, make_regulariser

__all__ = ["REGULARISERS", "Regulariser", "make_regulariser"]
