"""Evaluation: accuracy, loss, scikit-learn's per-class report and the confusion matrix of a model; for a
multi-label model, its label-set scores (`label_sets`) and each class's average precision and threshold."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, classification_report, confusion_matrix

from cnnlab.atomic import write_text
from cnnlab.config import DataConfig, build
from cnnlab.data import Dataset, Split, load_dataset, match_channels, resize_images
from cnnlab.data.dataset import Labels, Pixels
from cnnlab.data.loader import in_order
from cnnlab.errors import CnnlabError
from cnnlab.models import TrainedModel, load_model
from cnnlab.models.files import model_folder
from cnnlab.models.inference import Scores, predict_and_score
from cnnlab.models.label_sets import answered, average_precisions, probabilities
from cnnlab.progress import tracked
from cnnlab.run_dir import RunDir


@dataclass
class Evaluation:
    scores: Scores  # plain and delivered (with the model's TTA) accuracy and loss
    classes: list[str]
    report: dict[str, Any]  # scikit-learn's classification_report(output_dict=True); multi-label: + AP, threshold
    # (K, K) counts, rows true class, columns predicted class; for a multi-label model, the images carrying class i
    # that were answered with class j (its diagonal: each class found)
    confusion: np.ndarray
    labels: Labels  # the true class of each image, or its multi-hot classes
    probabilities: np.ndarray  # (N, K) as delivered: a softmax per image, or a multi-label model's sigmoid per class
    answered: np.ndarray  # (N, K) bool: the classes each image was answered with (the top one, or those at threshold)

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2

    @property
    def balanced_accuracy(self) -> float | None:
        """The mean of the per-class recalls: what accuracy says when every class counts the same (single-label)."""
        if self.multi_label:
            return None
        return float(balanced_accuracy_score(self.labels, self.probabilities.argmax(1)))

    @property
    def macro_f1(self) -> float:
        return float(self.report["macro avg"]["f1-score"])

    def to_dict(self) -> dict[str, Any]:
        averages = ("micro avg", "samples avg") if self.multi_label else ()
        return {
            **self.scores.to_dict(),
            "balanced_accuracy": self.balanced_accuracy,
            "images": len(self.labels),
            **{name: self.report[name] for name in averages},
            "per_class": {name: self.report[name] for name in self.classes},
            "macro avg": self.report["macro avg"],
            "weighted avg": self.report["weighted avg"],
            "confusion_matrix": {"classes": self.classes, "counts": self.confusion.tolist()},
        }


def evaluate(model: TrainedModel, split: Split, device: torch.device | str = "cpu") -> Evaluation:
    """Evaluate on a split whose images already have the model's size and channel count."""
    device = torch.device(device)
    info = model.info
    tta = info.inference.tta
    what = f"evaluating ({tta} TTA)" if tta != "none" else "evaluating"
    batches = tracked(in_order(split.images), len(split), what)
    bf16, thresholds = info.bf16_on(device), np.array(info.thresholds) if info.multi_label else None
    scores, logits = predict_and_score(
        model.module, batches, split.labels, info.normalization, device, info.inference, bf16, thresholds
    )
    classes = list(info.classes)
    if thresholds is not None:
        chances = probabilities(logits.delivered)
        decided = answered(chances, thresholds)
        report = classification_report(split.labels, decided, target_names=classes, output_dict=True, zero_division=0)
        for name, precision, threshold in zip(
            classes, average_precisions(chances, split.labels), thresholds, strict=True
        ):  # 0 for a class no test image carries, as scikit-learn gives its recall
            report[name] |= {"average_precision": float(np.nan_to_num(precision)), "threshold": float(threshold)}
        confusion = split.labels.T.astype(np.int64) @ decided.astype(np.int64)
        return Evaluation(scores, classes, report, confusion, split.labels, chances, decided.astype(bool))
    predicted = logits.delivered.argmax(1).numpy()
    indices = list(range(len(classes)))
    report = classification_report(
        split.labels, predicted, labels=indices, target_names=classes, output_dict=True, zero_division=0
    )
    return Evaluation(
        scores=scores,
        classes=classes,
        report=report,
        confusion=confusion_matrix(split.labels, predicted, labels=indices),
        labels=split.labels,
        probabilities=torch.softmax(logits.delivered, 1).numpy(),
        answered=np.eye(len(classes), dtype=bool)[predicted],
    )


def evaluate_saved(path: Path, data: DataConfig | None = None) -> tuple[Evaluation, Path]:
    """Evaluate a run folder or model file on the test split of `data`, or of the data it was trained on.

    Writes report.json and confusion_matrix.csv beside the model; returns the evaluation and that folder.
    """
    model = load_model(path)
    folder = model_folder(path)
    evaluation = evaluate(model, test_split_for(model, data))
    write_evaluation(evaluation, folder)
    return evaluation, folder


def test_split_for(model: TrainedModel, data: DataConfig | None) -> Split:
    """The test split of `data` (default: the run's own data), brought to the model's input format."""
    return test_split_of(model, dataset_for(model, data))


def dataset_for(model: TrainedModel, data: DataConfig | None) -> Dataset:
    """`data` (default: the run's own data) loaded at the model's input size, its test split whole."""
    if data is None:
        recorded = model.info.config.get("data")
        if not recorded:
            raise CnnlabError("this model records no dataset; pass --dataset or --data")
        data = build(DataConfig, recorded, "model.json data")
    height, width = model.info.input_shape.size
    if height == width and (data.dataset or data.image_size is None):
        data = replace(data, image_size=height)
    return load_dataset(replace(data, val_fraction=0.0, exclude=None))


def test_split_of(model: TrainedModel, dataset: Dataset) -> Split:
    """`dataset`'s test split brought to the model's input format, after checking it has the model's classes."""
    if list(dataset.classes) != list(model.info.classes):
        raise CnnlabError(
            f"the data's classes {list(dataset.classes)} differ from the model's {list(model.info.classes)}"
        )
    return Split(in_model_format(model, dataset.test.images), dataset.test.labels)


def in_model_format(model: TrainedModel, images: Pixels) -> Pixels:
    """(N, H, W, C) uint8 images at the model's input size and channel count."""
    return match_channels(resize_images(images, model.info.input_shape.size), model.info.input_shape.channels)


def write_evaluation(evaluation: Evaluation, folder: Path) -> None:
    write_text(folder / RunDir.EVALUATION, json.dumps(evaluation.to_dict(), indent=2))
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["true \\ predicted", *evaluation.classes])
    for name, row in zip(evaluation.classes, evaluation.confusion.tolist(), strict=True):
        writer.writerow([name, *row])
    write_text(folder / RunDir.CONFUSION, table.getvalue())
