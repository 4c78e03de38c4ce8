"""Prediction throughput (images/s) of PyTorch against onnxruntime, measured side by side in one run.

For tutorial-cnn and every fast-* model at 32x32 RGB, 10 classes, batch 1 and batch 256. The weights are
freshly initialised: throughput does not depend on their values. Needs the export extra.

    .venv/bin/python benchmarks/predict_throughput.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cnnlab.export import OnnxModel, export_onnx
from cnnlab.models import MODELS, ModelInfo, TrainedModel, create_model

SECONDS = 2.0  # measuring time per cell, after a warm-up


def throughput(predict, images: np.ndarray) -> float:
    predict(images)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < SECONDS:
        predict(images)
        count += len(images)
    return count / (time.perf_counter() - started)


def main() -> None:
    rng = np.random.default_rng(0)
    names = ["tutorial-cnn", *(name for name in MODELS if name.startswith("fast"))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':>14} {'batch':>6} {'pytorch img/s':>14} {'onnxruntime img/s':>18} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            info = ModelInfo(name, [str(i) for i in range(10)], [3, 32, 32], {"mean": [0.5] * 3, "std": [0.25] * 3})
            model = TrainedModel(create_model(name, (3, 32, 32), 10).eval(), info)
            sample = rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
            path = Path(folder) / f"{name}.onnx"
            export_onnx(model, path, sample[:14])
            exported = OnnxModel(path)
            for batch in (1, 256):
                images = sample[:batch]
                torch_rate = throughput(model.probabilities, images)
                onnx_rate = throughput(exported.probabilities, images)
                print(f"{name:>14} {batch:>6} {torch_rate:>14,.0f} {onnx_rate:>18,.0f} {onnx_rate / torch_rate:>6.2f}")


if __name__ == "__main__":
    main()
