"""ONNX export, verified against PyTorch right after it is written.

The graph takes the images' pixels, (B, H, W, C) uint8 at the model's input size with a dynamic batch axis,
normalises them itself and returns probabilities, test-time augmentation included when the model uses it:
nothing but decoding and resizing happens outside it. `<name>.json` beside it records the classes, the input size
(which `cnnlab predict` and `cnnlab serve` resize to) and the rest of the model's description.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnlab.atomic import write_text
from cnnlab.data.dataset import Pixels
from cnnlab.data.transforms import to_input
from cnnlab.errors import CnnlabError, first_line
from cnnlab.models import ModelInfo, TrainedModel
from cnnlab.models.files import read_info
from cnnlab.models.inference import tta_logits

OPSET = 18
TOLERANCE = 1e-4  # max absolute difference of probabilities between onnxruntime and PyTorch


class Probabilities(nn.Module):
    """The exported graph: (B, H, W, C) uint8 pixels normalised, the model with its test-time augmentation,
    then softmax, or a multi-label model's sigmoid per class (its thresholds are in the .json beside it)."""

    def __init__(self, model: TrainedModel):
        super().__init__()
        self.model, self.info = model.module.float().cpu(), model.info

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = to_input(pixels, self.info.normalization)
        multi = self.info.multi_label
        logits = tta_logits(self.model, x, self.info.inference, multi_label=multi)
        return torch.sigmoid(logits) if multi else torch.softmax(logits, dim=1)  # (B, classes)


@dataclass
class Verification:
    images: int
    batch_sizes: tuple[int, ...]
    max_abs_difference: float


def require(module: str, extra: str) -> Any:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return __import__(module)
    except ImportError:
        raise CnnlabError(f"this needs {module}: pip install 'cnnlab[{extra}]'") from None


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """torch 2.13's exporter warns that torchvision's operators are not registered (cnnlab uses none) and that a
    pytree class inside torch is deprecated: nothing its user can act on, printed before every export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model: TrainedModel, out: Path, sample: Pixels) -> Verification:
    """Write `out` (ONNX) and `out.json` (preprocessing), then check them on `sample` (N, H, W, C) uint8."""
    sample = np.asarray(sample)
    require("onnx", "export")
    require("onnxscript", "export")
    module = Probabilities(model).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with quiet_exporter():
            torch.onnx.export(
                module,
                (torch.from_numpy(sample[:2]).contiguous(),),
                str(out),
                input_names=["pixels"],
                output_names=["probabilities"],
                dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}},
                opset_version=OPSET,
                dynamo=True,
                external_data=False,  # the weights inside the one file: model.onnx alone is the whole model
                verbose=False,
            )
    except Exception as error:  # the exporter raises many types; report any in one line
        raise CnnlabError(f"ONNX export of {model.info.architecture} failed: {error}") from None
    write_text(out.with_suffix(".json"), model.info.to_json())
    verification = verify(model, out, sample)
    if verification.max_abs_difference > TOLERANCE:
        raise CnnlabError(
            f"{out}: onnxruntime differs from PyTorch by {verification.max_abs_difference:.2e} (> {TOLERANCE})"
        )
    return verification


def verify(
    model: TrainedModel, onnx_path: Path, sample: np.ndarray, batch_sizes: tuple[int, ...] = (1, 7)
) -> Verification:
    """The largest probability difference between onnxruntime and PyTorch (fp32) over `sample`."""
    session = OnnxModel(onnx_path)
    module = Probabilities(model).eval()
    worst = 0.0
    with torch.no_grad():
        for batch_size in batch_sizes:
            for start in range(0, len(sample), batch_size):
                images = sample[start : start + batch_size]
                expected = module(torch.from_numpy(images)).numpy()
                worst = max(worst, float(np.abs(session.probabilities(images) - expected).max()))
    return Verification(len(sample), batch_sizes, worst)


class OnnxModel:
    """An exported model run by onnxruntime, with the preprocessing recorded beside it."""

    def __init__(self, path: Path):
        onnxruntime = require("onnxruntime", "export")
        if not path.with_suffix(".json").is_file():
            raise CnnlabError(f"{path}: missing {path.with_suffix('.json').name}, the preprocessing saved at export")
        self.info: ModelInfo = read_info(path.with_suffix(".json"))
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise CnnlabError(f"{path}: not a loadable ONNX model ({first_line(error)})") from None
        inputs = [(graph_input.name, graph_input.type) for graph_input in self.session.get_inputs()]
        if inputs != [("pixels", "tensor(uint8)")]:
            raise CnnlabError(
                f"{path}: its graph takes {inputs}, not uint8 pixels: not a cnnlab export, or one from before the "
                "graphs took pixels (export it again: cnnlab export RUN)"
            )

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 -> (N, classes)."""
        pixels = np.ascontiguousarray(images, dtype=np.uint8)
        probabilities: np.ndarray = self.session.run(["probabilities"], {"pixels": pixels})[0]
        return probabilities
