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
from cnnlab.config import InferenceConfig, build
from cnnlab.data.dataset import ImageShape
from cnnlab.data.transforms import Normalization
from cnnlab.errors import CnnlabError, first_line
from cnnlab.machine import inference_precision
from cnnlab.models.inference import NO_TTA, predict_logits
from cnnlab.models.label_sets import probabilities
from cnnlab.models.registry import Classifier, create_model
from cnnlab.run_dir import RunDir, metrics_in_current_names

FORMAT_VERSION = 1


@dataclass
class ModelInfo:
    architecture: str
    classes: list[str]
    input_shape: ImageShape
    normalization: Normalization  # of pixels scaled to [0, 1]
    inference: InferenceConfig = NO_TTA  # how it answers (evaluation, prediction, export and serving)
    precision: str = "fp32"  # what training ran in; "bf16": inference under bf16 autocast where it is native
    metrics: dict[str, Any] = field(default_factory=dict)  # the kept epoch's metrics.jsonl line
    config: dict[str, Any] = field(default_factory=dict)  # the resolved run config
    cnnlab_version: str = ""
    format_version: int = FORMAT_VERSION
    quantization: dict[str, Any] = field(default_factory=dict)  # an INT8 export: how, and its measured accuracy
    # A multi-label model's (a sigmoid per class): each class's threshold, chosen on the validation split (see
    # `label_sets`); None for a model that answers one class.
    thresholds: list[float] | None = None

    @property
    def multi_label(self) -> bool:
        return self.thresholds is not None

    def bf16_on(self, device: torch.device) -> bool:
        """Whether inference on `device` runs under bf16 autocast: as trained, where that is native."""
        return inference_precision(self.precision, device) == "bf16"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelInfo:
        """A model.json's description, typed. One written before the inference section had `tta` and
        `tta_below` beside the other keys."""
        values = dict(values)
        older = {key: values.pop(key) for key in ("tta", "tta_below") if key in values}
        inference = build(InferenceConfig, values.pop("inference", older), "model.json inference")
        mean, std = values.pop("normalization").values()
        shape = ImageShape(*values.pop("input_shape"))
        info = cls(
            input_shape=shape, normalization=Normalization(tuple(mean), tuple(std)), inference=inference, **values
        )
        info.metrics = metrics_in_current_names(info.metrics, inference.tta)
        return info


@dataclass
class TrainedModel:
    module: Classifier
    info: ModelInfo

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 at the model's input format -> (N, classes), with the model's TTA: a softmax over
        the classes, or a multi-label model's sigmoid per class."""
        device = next(self.module.parameters()).device
        info, multi = self.info, self.info.multi_label
        bf16 = info.bf16_on(device)
        logits = predict_logits(
            self.module, images, info.normalization, device, info.inference, bf16, multi_label=multi
        )
        chances: np.ndarray = probabilities(logits) if multi else torch.softmax(logits, 1).numpy()
        return chances


def package_version() -> str:
    try:
        return version("cnnlab")
    except PackageNotFoundError:
        return "unknown"


def save_model(model: nn.Module, info: ModelInfo, folder: Path) -> None:
    """model.safetensors, then model.json: each replaced atomically, the description last."""
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    atomic_write(folder / RunDir.WEIGHTS, safetensors_bytes(weights))
    write_text(folder / RunDir.INFO, info.to_json())


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
    module = create_model(info.architecture, info.input_shape, len(info.classes))
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
            f"at input {list(info.input_shape)}; first difference: {differing[0][0]}"
        )
    module.load_state_dict(weights)
    return TrainedModel(module.to(device).eval(), info)


def read_info(path: Path) -> ModelInfo:
    try:
        info = ModelInfo.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, ValueError, CnnlabError) as error:
        raise CnnlabError(f"{path}: not a cnnlab model description ({first_line(error)})") from None
    if info.format_version != FORMAT_VERSION:
        raise CnnlabError(f"{path}: model format {info.format_version}, this cnnlab reads {FORMAT_VERSION}")
    return info
