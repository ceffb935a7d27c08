"""Model adapters: diffusers layouts behind one interface (:class:`DiffusionModel`), loaded by :func:`load_model`."""
from rlr_dist.models.base import (MODELS, DiffusionModel, ModelError, detect_layout, load_decoder, load_model,
                                  resolve_model_folder)
from rlr_dist.models.config import LoraConfig, ModelConfig

__all__ = ["MODELS", "DiffusionModel", "ModelError", "ModelConfig", "LoraConfig", "detect_layout", "load_decoder",
           "load_model", "resolve_model_folder"]
