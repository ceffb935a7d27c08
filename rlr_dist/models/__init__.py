"""Model adapters: diffusers layouts behind one interface (:class:`DiffusionModel`), loaded by :func:`load_model`."""
from rlr_dist.models.base import (MODELS, DiffusionModel, ModelError, build_schedule, detect_layout, load_decoder,
                                  load_model, read_scheduler_config, resolve_model_folder)
from rlr_dist.models.config import LoraConfig, ModelConfig

__all__ = ["MODELS", "DiffusionModel", "ModelError", "ModelConfig", "LoraConfig", "build_schedule", "detect_layout", "load_decoder",
           "load_model", "read_scheduler_config", "resolve_model_folder"]
