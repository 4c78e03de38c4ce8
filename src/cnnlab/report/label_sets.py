"""The parts of a run report that differ for a multi-label model: the per-class table with average precision and
threshold, precision-recall curves, label co-occurrence, predictions as label sets, and the worst misses (a class
the image carries, answered least) and false alarms (a class it does not carry, answered most), each under the
Grad-CAM of the class concerned."""

from __future__ import annotations

import numpy as np

from cnnlab import figures
from cnnlab.data import Split
from cnnlab.evaluate import Evaluation
from cnnlab.explain import explanations
from cnnlab.models import TrainedModel
from cnnlab.report import html

SAMPLE_SIZE, WORST_SHOWN = 12, 8


def class_table(evaluation: Evaluation) -> str:
    """Each class's precision, recall and F1 at its threshold, average precision, support and threshold, then the
    micro and macro averages."""
    report, header = evaluation.report, ["class", "precision", "recall", "F1", "average precision", "support"]
    rows = [
        [
            name,
            *(report[name][key] for key in ("precision", "recall", "f1-score", "average_precision")),
            int(report[name]["support"]),
            report[name]["threshold"],
        ]
        for name in evaluation.classes
    ]
    rows += [
        [
            name,
            report[name]["precision"],
            report[name]["recall"],
            report[name]["f1-score"],
            "-",
            int(report[name]["support"]),
            "-",
        ]
        for name in ("micro avg", "macro avg")
    ]
    return html.table([*header, "threshold"], rows)


def label_set_figures(evaluation: Evaluation, split: Split, model: TrainedModel | None) -> dict[str, bytes]:
    """PNG bytes of a multi-label run's figures, by file name."""
    targets, chances = evaluation.labels, evaluation.probabilities
    per_class = [evaluation.report[name] for name in evaluation.classes]
    thresholds = np.array([row["threshold"] for row in per_class])
    precisions = np.array([row["average_precision"] for row in per_class])
    pngs = {
        "precision_recall.png": figures.png_bytes(
            figures.precision_recall_curves(chances, targets, evaluation.classes, thresholds, precisions)
        ),
        "label_cooccurrence.png": figures.png_bytes(figures.cooccurrence(targets, evaluation.classes)),
    }
    if len(split):
        chosen = np.linspace(0, len(split) - 1, min(SAMPLE_SIZE, len(split))).round().astype(int)
        captions = [_caption(evaluation, i) for i in chosen]
        gallery = figures.image_gallery(split.images[chosen], captions, "label sets answered on test images")
        pngs["sample_predictions.png"] = figures.png_bytes(gallery)
    for misses in (True, False):
        pngs |= _worst_figure(evaluation, split, model, misses)
    return pngs


def _worst_figure(evaluation: Evaluation, split: Split, model: TrainedModel | None, misses: bool) -> dict[str, bytes]:
    """The worst misses (or false alarms) under the Grad-CAM of the class concerned, where the model has one."""
    worst = worst_decisions(evaluation, misses)
    if not len(worst):
        return {}
    kind, what = ("misses", "missed") if misses else ("false_alarms", "false alarm")
    title = "classes the image carries, answered least" if misses else "classes it does not carry, answered most"
    images = np.asarray(split.images[worst[:, 0]])
    captions = [
        f"{what}: {evaluation.classes[k]} {evaluation.probabilities[i, k]:.2f}\ncarries {_carried(evaluation, i)}"
        for i, k in worst
    ]
    if model is None or model.module.gradcam_layer() is None:
        return {f"worst_{kind}.png": figures.png_bytes(figures.image_gallery(images, captions, f"worst {title}"))}
    heats = np.stack([one.heat for one in explanations(model, images, [evaluation.classes[k] for _, k in worst])])
    figure = figures.gradcam_gallery(images, heats, captions, f"worst {title}, under that class's Grad-CAM")
    return {f"worst_{kind}_gradcam.png": figures.png_bytes(figure)}


def worst_decisions(evaluation: Evaluation, misses: bool, count: int = WORST_SHOWN) -> np.ndarray:
    """(n, 2) (image, class) pairs decided wrong, worst first: with `misses`, classes carried but not answered,
    lowest probability first; else classes answered but not carried, highest first."""
    wrong = (
        (evaluation.labels == 1) & ~evaluation.answered if misses else (evaluation.labels == 0) & evaluation.answered
    )
    rows, columns = np.nonzero(wrong)
    chances = evaluation.probabilities[rows, columns]
    order = np.argsort(chances if misses else -chances, kind="stable")[:count]
    return np.stack([rows[order], columns[order]], axis=1)


def _carried(evaluation: Evaluation, image: int) -> str:
    return (
        ", ".join(name for name, on in zip(evaluation.classes, evaluation.labels[image], strict=True) if on) or "none"
    )


def _caption(evaluation: Evaluation, image: int) -> str:
    said = [name for name, on in zip(evaluation.classes, evaluation.answered[image], strict=True) if on]
    right = bool((evaluation.answered[image] == evaluation.labels[image].astype(bool)).all())
    return f"{', '.join(said) or 'none'}\n" + ("right" if right else f"true: {_carried(evaluation, image)}")
