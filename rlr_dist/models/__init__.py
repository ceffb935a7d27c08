"""Model adapters: diffusers layouts behind one interface (:class:`DiffusionModel`), loaded by :func:`load_model`.
Importing this package registers the built-in layouts (``models/layouts.py``: UNets; ``models/transformers.py``:
flow-matching transformers) in :data:`MODELS`."""
from rlr_dist.models.base import (MODELS, DiffusionModel, ModelError, build_schedule, detect_layout, folder_schedule,
                                  load_decoder, load_model, read_scheduler_config, resolve_model_folder)
from rlr_dist.models import layouts as _layouts  # noqa: F401  (registers pixel, pixel_video, sd, t2v)
from rlr_dist.models import transformers as _transformers  # noqa: F401  (registers sd3, flux, wan, pixel_flow)
from rlr_dist.models.config import LoraConfig, ModelConfig

__all__ = ["MODELS", "DiffusionModel", "ModelError", "ModelConfig", "LoraConfig", "build_schedule", "detect_layout", "folder_schedule", "load_decoder",
           "load_model", "read_scheduler_config", "resolve_model_folder"]
