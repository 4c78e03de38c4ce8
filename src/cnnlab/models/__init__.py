"""Models: the families registered by name (each module registers its own), and trained models on disk."""

import importlib

from cnnlab.models.files import ModelInfo, TrainedModel, load_model, save_model
from cnnlab.models.registry import MODELS, ModelSpec, create_model, model_spec, parameter_count

# Each family registers its models when imported; this order is the order `cnnlab models` lists them in.
for _family in ("tutorial", "fast", "efficientnet"):
    importlib.import_module(f"cnnlab.models.{_family}")

__all__ = [
    "MODELS",
    "ModelInfo",
    "ModelSpec",
    "TrainedModel",
    "create_model",
    "load_model",
    "model_spec",
    "parameter_count",
    "save_model",
]
