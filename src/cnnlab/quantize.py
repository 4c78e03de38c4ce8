"""Static INT8 quantization of an exported model with ONNX Runtime's own tooling, and what it costs in accuracy.

The fp32 export (verified against PyTorch) is prepared by onnxruntime (shape inference, BatchNorm folded into the
convolutions), then quantized in QDQ form (weights per output channel; which ops and which activation type: the
first of `SCHEMES` that keeps the accuracy), the activations' ranges calibrated (min-max) on a seeded sample of
the training split. Both models then score the whole test split through onnxruntime, with the recipe's test-time
augmentation (the graph holds it): the INT8 model is written only if it loses at most `max_drop` of the delivered
accuracy (of a multi-label model: of its mean average precision).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.atomic import atomic_write, write_text
from cnnlab.data import Split
from cnnlab.errors import CnnlabError, first_line
from cnnlab.export import OnnxModel, Verification, export_onnx, require
from cnnlab.models import ModelInfo, TrainedModel
from cnnlab.models.label_sets import answered, label_set_scores

log = logging.getLogger("cnnlab")


@dataclass(frozen=True)
class Scheme:
    """Which ops are quantized, and the activations' integer type (weights are always signed, per channel)."""

    name: str
    ops: tuple[str, ...] | None  # None: every op onnxruntime can quantize
    unsigned_activations: bool


# Tried in order, the first within --max-drop kept. Measured on [A] AMD EPYC (avx512_vnni), batch 64: fast94 ran 331
# images/s with its convolutions and dense layers in U8S8 (what onnxruntime's x86 integer kernels take), 86 with
# signed activations and 79 with every op quantized (GELU's Erf, Mul and Add each wrapped in a quantize/dequantize
# pair), against 139 in fp32; efficientnet-lite0 on flowers128 fell from 76.3% to 54.9% in the first scheme (its
# ReLU6 left in float, each convolution's range is calibrated before the clip) and scored 76.5% with every op
# quantized.
SCHEMES = (
    Scheme("convolutions and dense layers, U8S8", ("Conv", "Gemm", "MatMul"), True),
    Scheme("every quantizable op, S8S8", None, False),
)
CALIBRATION_BATCH = 32
SCORING_BATCH = 256


@dataclass(frozen=True)
class Int8Settings:
    calibration_images: int = 512  # from the training split, drawn with `seed`
    seed: int = 0
    max_drop: float = 0.01  # the most delivered test accuracy (or mAP) the INT8 model may lose (0.01: one point)


@dataclass(frozen=True)
class Int8Result:
    verification: Verification  # of the fp32 export against PyTorch
    scheme: str  # the first of SCHEMES within max_drop (or the last tried)
    metric: str  # what the scores are: "accuracy", or a multi-label model's "mAP"
    fp32_score: float  # delivered on the test split through onnxruntime, fp32 graph
    int8_score: float  # the same, INT8 graph
    agreement: float  # share of test images whose top class (multi-label: whole answer) the two graphs agree on
    test_images: int
    calibration_images: int

    @property
    def drop(self) -> float:
        return self.fp32_score - self.int8_score


def calibration_sample(train: Split, settings: Int8Settings) -> np.ndarray:
    """The indices of the training images the INT8 ranges are calibrated on: a seeded sample, sorted; all of
    them, with a warning that says so, when fewer than `settings.calibration_images` are there."""
    asked = settings.calibration_images
    if asked > len(train):
        log.warning(
            "calibrating on all %s training images: %s were asked, more than there are", f"{len(train):,}", f"{asked:,}"
        )
    rng = np.random.default_rng(settings.seed)
    return np.sort(rng.choice(len(train), min(asked, len(train)), replace=False))


def export_int8(
    model: TrainedModel, out: Path, calibration: np.ndarray, test: Split, settings: Int8Settings = Int8Settings()
) -> Int8Result:
    """Write `out` (INT8 ONNX) and `out.json` (preprocessing and the measured accuracies), calibrated on the
    `calibration` images (see `calibration_sample`), or refuse in one line when it loses more than
    `settings.max_drop` on `test`; nothing is written then. Both image sets are at the model's input format."""
    with tempfile.TemporaryDirectory(prefix="cnnlab-int8-") as scratch:
        fp32, int8 = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        verification = export_onnx(model, fp32, test.images[:100])
        fp32_chances = _probabilities(OnnxModel(fp32), test)
        for scheme in SCHEMES:
            quantize_file(fp32, int8, calibration, scheme)
            int8_chances = _probabilities(OnnxModel(int8), test)
            fp32_score, fp32_answer = _scored(model.info, fp32_chances, test)
            int8_score, int8_answer = _scored(model.info, int8_chances, test)
            result = Int8Result(
                verification,
                scheme=scheme.name,
                metric="mAP" if model.info.multi_label else "accuracy",
                fp32_score=fp32_score,
                int8_score=int8_score,
                agreement=float((fp32_answer == int8_answer).reshape(len(test), -1).all(1).mean()),
                test_images=len(test),
                calibration_images=len(calibration),
            )
            if result.drop <= settings.max_drop:
                break
        if result.drop > settings.max_drop:
            raise CnnlabError(
                f"INT8 loses {result.drop:.2%} of test {result.metric} ({result.fp32_score:.2%} in fp32, "
                f"{result.int8_score:.2%} in INT8), more than --max-drop {settings.max_drop:.2%}; nothing written"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, int8.read_bytes())
    info = replace(model.info, quantization={"type": "int8", **asdict(settings), **_measured(result)})
    write_text(out.with_suffix(".json"), info.to_json())
    return result


def quantize_file(fp32: Path, out: Path, calibration: np.ndarray, scheme: Scheme = SCHEMES[0]) -> None:
    """Write `out`, the INT8 form of the fp32 export `fp32` (with its preprocessing .json) in `scheme`, its
    activation ranges calibrated on `calibration` (N, H, W, C) uint8 images."""
    require("onnxruntime", "export")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime's base class is untyped
        def __init__(self) -> None:
            self.batches: Iterator[dict[str, Any]] = (
                {"pixels": np.ascontiguousarray(calibration[i : i + CALIBRATION_BATCH])}
                for i in range(0, len(calibration), CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="cnnlab-int8-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        try:
            # ONNX's own shape inference only: onnxruntime's symbolic one gives up on the data-dependent shapes
            # of selective TTA (the views go to the unsure images alone).
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(out),
                Batches(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8 if scheme.unsigned_activations else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(scheme.ops) if scheme.ops else None,
            )
        except Exception as error:  # onnxruntime's tooling raises bare Exceptions among others
            raise CnnlabError(f"INT8 quantization of {fp32.name} failed: {first_line(error)}") from None
    write_text(out.with_suffix(".json"), fp32.with_suffix(".json").read_text())


def _measured(result: Int8Result) -> dict[str, Any]:
    fields = asdict(result)
    fields.pop("verification")
    return fields


def _probabilities(model: OnnxModel, split: Split) -> np.ndarray:
    images = np.asarray(split.images)
    return np.concatenate(
        [model.probabilities(images[i : i + SCORING_BATCH]) for i in range(0, len(images), SCORING_BATCH)]
    )


def _scored(info: ModelInfo, probabilities: np.ndarray, split: Split) -> tuple[float, np.ndarray]:
    """The delivered score of `probabilities` on the split, with the answers: the top classes, or a multi-label
    model's label sets at its thresholds and its mean average precision."""
    if info.thresholds is None:
        top = probabilities.argmax(1)
        return float((top == split.labels).mean()), top
    thresholds = np.array(info.thresholds)
    return label_set_scores(probabilities, split.labels, thresholds)["map"], answered(probabilities, thresholds)
