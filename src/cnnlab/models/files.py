"""A trained model on disk: `model.safetensors` (weights only) beside `model.json` (everything else).

The two files alone rebuild the model: architecture, class names, input shape and normalisation are
in the JSON, and weights are never unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from cnnlab.atomic import atomic_write, write_text
from cnnlab.data.dataset import ImageShape
from cnnlab.data.transforms import Normalization
from cnnlab.errors import CnnlabError
from cnnlab.machine import inference_precision
from cnnlab.models.inference import predict_logits
from cnnlab.models.registry import Classifier, create_model
from cnnlab.run_dir import RunDir

FORMAT_VERSION = 1


@dataclass
class ModelInfo:
    architecture: str
    classes: list[str]
    input_shape: list[int]  # [C, H, W]
    normalization: dict[str, list[float]]  # {"mean": [...], "std": [...]} after scaling to [0, 1]
    tta: str = "none"  # test-time augmentation used for evaluation and prediction
    tta_below: float = 1.0  # selective TTA: the views only for images whose plain top probability is below this
    precision: str = "fp32"  # what training ran in; "bf16": inference under bf16 autocast where it is native
    metrics: dict[str, Any] = field(default_factory=dict)  # the final epoch's metrics
    config: dict[str, Any] = field(default_factory=dict)  # the resolved run config
    cnnlab_version: str = ""
    format_version: int = FORMAT_VERSION
    quantization: dict[str, Any] = field(default_factory=dict)  # an INT8 export: how, and its measured accuracy

    @property
    def norm(self) -> Normalization:
        return Normalization(tuple(self.normalization["mean"]), tuple(self.normalization["std"]))

    def bf16_on(self, device: torch.device) -> bool:
        """Whether inference on `device` runs under bf16 autocast: as trained, where that is native."""
        return inference_precision(self.precision, device) == "bf16"

    @property
    def shape(self) -> ImageShape:
        return ImageShape(*self.input_shape)


@dataclass
class TrainedModel:
    module: Classifier
    info: ModelInfo

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 at the model's input format -> (N, classes), with the model's TTA."""
        device = next(self.module.parameters()).device
        bf16 = self.info.bf16_on(device)
        logits = predict_logits(self.module, images, self.info.norm, device, self.info.tta, bf16, self.info.tta_below)
        return torch.softmax(logits, 1).numpy()


def package_version() -> str:
    try:
        return version("cnnlab")
    except PackageNotFoundError:
        return "unknown"


def save_model(model: nn.Module, info: ModelInfo, folder: Path) -> None:
    """model.safetensors, then model.json: each replaced atomically, the description last."""
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    atomic_write(folder / RunDir.WEIGHTS, safetensors_bytes(weights))
    write_text(folder / RunDir.INFO, json.dumps(asdict(info), indent=2))


def model_folder(path: Path) -> Path:
    """The folder holding model.json, given a run folder, model.json or model.safetensors."""
    if not path.exists():
        raise CnnlabError(f"{path}: no such run folder or model file")
    folder = path if path.is_dir() else path.parent
    if not (folder / RunDir.INFO).is_file():
        raise CnnlabError(f"{path}: no {RunDir.INFO} there; expected a finished run folder or its model files")
    return folder


def load_model(path: Path, device: torch.device | str = "cpu") -> TrainedModel:
    """Rebuild a model from a run folder or its model files; any mismatch is a one-line error."""
    folder = model_folder(path)
    info = read_info(folder / RunDir.INFO)
    module = create_model(info.architecture, info.shape, len(info.classes))
    weights_path = folder / RunDir.WEIGHTS
    if not weights_path.is_file():
        raise CnnlabError(f"{weights_path}: missing; the model folder is incomplete")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CnnlabError(f"{weights_path}: not a readable safetensors file ({error})") from None
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    if expected != found:
        differing = sorted(set(expected.items()) ^ set(found.items()))
        raise CnnlabError(
            f"{weights_path}: weights do not fit {info.architecture} with {len(info.classes)} classes "
            f"at input {info.input_shape}; first difference: {differing[0][0]}"
        )
    module.load_state_dict(weights)
    return TrainedModel(module.to(device).eval(), info)


def read_info(path: Path) -> ModelInfo:
    try:
        values = json.loads(path.read_text())
        info = ModelInfo(**values)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
        raise CnnlabError(f"{path}: not a cnnlab model description ({error})") from None
    if info.format_version != FORMAT_VERSION:
        raise CnnlabError(f"{path}: model format {info.format_version}, this cnnlab reads {FORMAT_VERSION}")
    return info
