"""Models: the families registered by name (each module of `families` registers its own), and trained models on
disk."""

import importlib
import pkgutil

from cnnlab.models import families
from cnnlab.models.files import ModelInfo, TrainedModel, load_model, save_model
from cnnlab.models.registry import MODELS, Classifier, ModelSpec, create_model, model_spec, parameter_count

# Every family file registers its models when imported; `cnnlab models` lists them in this order.
for _family in sorted(module.name for module in pkgutil.iter_modules(families.__path__)):
    importlib.import_module(f"{families.__name__}.{_family}")

__all__ = [
    "MODELS",
    "Classifier",
    "ModelInfo",
    "ModelSpec",
    "TrainedModel",
    "create_model",
    "load_model",
    "model_spec",
    "parameter_count",
    "save_model",
]
