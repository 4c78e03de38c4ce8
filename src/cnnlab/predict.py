"""Prediction on image files, with exactly the preprocessing the model was trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from cnnlab.data import images as image_io
from cnnlab.data.walk import walk_files
from cnnlab.errors import CnnlabError
from cnnlab.models import ModelInfo, load_model
from cnnlab.models.files import model_folder
from cnnlab.models.label_sets import answered_classes

_BATCH = 256  # images decoded and predicted together


class Predictor(Protocol):
    """A PyTorch model (TrainedModel) or an exported one (OnnxModel)."""

    info: ModelInfo

    def probabilities(self, images: np.ndarray) -> np.ndarray: ...


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class name, probability), most probable first; empty when error is set
    error: str | None = None
    # A multi-label model's answer: every class at or above its threshold, most probable first (None: the model
    # answers its top class)
    labels: list[tuple[str, float]] | None = None


def expand_paths(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Files as given; folders replaced by the non-hidden files below them, sorted (see `walk_files`); and
    the entries of those folders that were skipped, each with its reason."""
    files: list[Path] = []
    skipped: list[str] = []
    for path in paths:
        if path.is_dir():
            listing = walk_files(path)
            files += [Path(found.path) for found in listing.files]
            skipped += listing.skipped
        else:
            files.append(path)
    return files, skipped


ENGINES = ("auto", "torch", "onnx")


def load_classifier(path: Path, engine: str = "auto") -> Predictor:
    """A model to predict with: `path` is a run folder, its model files, or an exported .onnx file. The engine is
    PyTorch for the first two and onnxruntime for the last ("auto"); "onnx" with a run folder runs the model.onnx
    that `cnnlab export` wrote there."""
    if engine not in ENGINES:
        raise CnnlabError(f"--engine {engine}: one of {', '.join(ENGINES)}")
    exported = path.suffix.lower() == ".onnx"
    if engine == "torch" and exported:
        raise CnnlabError(f"{path}: an exported ONNX model runs on --engine onnx; give the run folder for torch")
    if engine == "onnx" and not exported:
        path = model_folder(path) / "model.onnx"
        if not path.is_file():
            raise CnnlabError(f"{path}: not there; export the model first (cnnlab export {path.parent})")
        exported = True
    if exported:
        from cnnlab.export import OnnxModel  # onnxruntime is an optional extra

        return OnnxModel(path)
    return load_model(path)


def predict_files(model: Predictor, paths: list[Path], top_k: int = 3) -> list[Prediction]:
    """One Prediction per file, in order; files that are not readable images carry an error instead."""
    top_k = max(1, min(top_k, len(model.info.classes)))
    results: list[Prediction] = []
    for start in range(0, len(paths), _BATCH):
        chunk = paths[start : start + _BATCH]
        decoded: dict[int, np.ndarray] = {}
        failed: dict[int, str] = {}
        for i, path in enumerate(chunk):
            try:
                if not path.is_file():
                    raise image_io.ImageError(f"{path}: no such file")
                decoded[i] = image_io.decode(
                    path, str(path), model.info.input_shape.size, model.info.input_shape.channels
                )
            except image_io.ImageError as error:
                failed[i] = str(error)
        probabilities = model.probabilities(np.stack(list(decoded.values()))) if decoded else None
        rows = dict(zip(decoded, probabilities if probabilities is not None else [], strict=True))
        for i, path in enumerate(chunk):
            if i in failed:
                results.append(Prediction(str(path), [], failed[i]))
                continue
            best = np.argsort(-rows[i])[:top_k]
            top = [(model.info.classes[c], float(rows[i][c])) for c in best]
            thresholds = model.info.thresholds
            labels = answered_classes(rows[i], model.info.classes, thresholds) if thresholds is not None else None
            results.append(Prediction(str(path), top, labels=labels))
    return results
