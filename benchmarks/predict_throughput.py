"""Prediction throughput (images/s) of each engine and precision, measured side by side in one run: PyTorch fp32,
PyTorch bf16 (where this CPU has it natively), onnxruntime fp32 and onnxruntime INT8, at batch 1 and 64.

Without RUN: tutorial-cnn and fast (fast94's net) at 32x32 RGB and efficientnet-lite0 at 224x224, freshly
initialised (throughput does not depend on the weights; the INT8 ranges are calibrated on random images). With
RUN folders: their trained models on their own test images, each beside its fp32 and INT8 accuracy as `cnnlab
export RUN --int8` measured it (export both first: `cnnlab export RUN` and `cnnlab export RUN --int8`), TTA
included as the model delivers it. Needs the export extra.

    PYTHONPATH=src .venv/bin/python benchmarks/predict_throughput.py [RUN ...]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cnnlab.evaluate import test_split_for
from cnnlab.export import OnnxModel, export_onnx
from cnnlab.machine import resolve_precision
from cnnlab.models import ModelInfo, TrainedModel, create_model, load_model
from cnnlab.quantize import quantize_file

SECONDS = 3.0  # measuring time per cell, after a warm-up
BATCHES = (1, 64)
FRESH = {"tutorial-cnn": 32, "fast": 32, "efficientnet-lite0": 224}


def throughput(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> float:
    predict(images)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < SECONDS:
        predict(images)
        count += len(images)
    return count / (time.perf_counter() - started)


def engines(model: TrainedModel, fp32: Path, int8: Path) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    chosen = {"torch fp32": TrainedModel(model.module, replace(model.info, precision="fp32"))}
    if resolve_precision("auto", torch.device("cpu")) == "bf16":
        chosen["torch bf16"] = TrainedModel(model.module, replace(model.info, precision="bf16"))
    return {
        **{name: trained.probabilities for name, trained in chosen.items()},
        "onnx fp32": OnnxModel(fp32).probabilities,
        "onnx int8": OnnxModel(int8).probabilities,
    }


def measure(name: str, model: TrainedModel, fp32: Path, int8: Path, images: np.ndarray, extra: str = "") -> None:
    for batch in BATCHES:
        rates = {engine: throughput(predict, images[:batch]) for engine, predict in engines(model, fp32, int8).items()}
        base = rates["torch fp32"]
        cells = "  ".join(f"{engine} {rate:,.0f} ({rate / base:.2f}x)" for engine, rate in rates.items())
        print(f"{name:>20} batch {batch:>3}: {cells}{extra}", flush=True)


def fresh(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for name, size in FRESH.items():
        info = ModelInfo(name, [str(i) for i in range(10)], [3, size, size], {"mean": [0.5] * 3, "std": [0.25] * 3})
        model = TrainedModel(create_model(name, (3, size, size), 10).eval(), info)
        images = rng.integers(0, 256, (max(BATCHES), size, size, 3), dtype=np.uint8)
        fp32, int8 = folder / f"{name}.onnx", folder / f"{name}.int8.onnx"
        export_onnx(model, fp32, images[:14])
        quantize_file(fp32, int8, images)  # the first scheme: the fast one, accuracy unchecked here
        measure(f"{name} {size}px", model, fp32, int8, images)


def trained(run: Path) -> None:
    model = load_model(run)
    fp32, int8 = run / "model.onnx", run / "model.int8.onnx"
    if not (fp32.is_file() and int8.is_file()):
        sys.exit(f"{run}: export it first (cnnlab export {run}; cnnlab export {run} --int8)")
    measured = json.loads(int8.with_suffix(".json").read_text())["quantization"]
    extra = (
        f"  | {measured['metric']} fp32 {measured['fp32_score']:.2%}, int8 {measured['int8_score']:.2%} "
        f"({model.info.inference.tta} TTA)"
    )
    images = np.asarray(test_split_for(model, None).images[: max(BATCHES)])
    measure(f"{run.name}", model, fp32, int8, images, extra)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; images/s (ratio to torch fp32)")
    if len(sys.argv) > 1:
        for run in sys.argv[1:]:
            trained(Path(run))
        return
    with tempfile.TemporaryDirectory() as folder:
        fresh(Path(folder))


if __name__ == "__main__":
    main()
