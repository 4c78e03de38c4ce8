"""Models: a registry of architectures by name, and trained models on disk."""

from cnnlab.models.files import ModelInfo, TrainedModel, load_model, save_model
from cnnlab.models.registry import MODELS, ModelSpec, create_model, model_spec, parameter_count

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
