"""rlr-dist: RLR fine-tuning of diffusion models on Ray."""
__version__ = "0.1.0"
