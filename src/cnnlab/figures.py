"""Figures, drawn with matplotlib's non-interactive backend in one consistent look.

Each function takes plain data and returns a Figure; `save` writes it as PNG and closes it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve

from cnnlab.atomic import atomic_write
from cnnlab.data.dataset import SplitName
from cnnlab.models.inference import Scores

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

    from cnnlab.data.dataset import Pixels

STYLE: dict[RcKeyType, Any] = {
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
TRAIN_COLOR, TEST_COLOR, VAL_COLOR = "#1f77b4", "#d62728", "#2ca02c"


def save(figure: Figure, path: Path) -> Path:
    atomic_write(path, png_bytes(figure))
    return path


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def subplots(
    *grid: int, figsize: tuple[float, float], layout: Literal["constrained"] | None = None, **options: Any
) -> tuple[Figure, Any]:
    """A figure and its axes, made without pyplot: no backend is chosen and no global figure list kept (a
    figure is only ever written to PNG, through the Agg canvas that `savefig` makes for it)."""
    figure = Figure(figsize=figsize, layout=layout)
    return figure, figure.subplots(*grid, **options)


def _show_image(axis: Axes, image: np.ndarray) -> None:
    """(H, W, C) uint8, grayscale or RGB, without axes."""
    axis.imshow(
        image[..., 0] if image.shape[-1] == 1 else image,
        cmap="gray" if image.shape[-1] == 1 else None,
        vmin=0,
        vmax=255,
        interpolation="nearest",
    )
    axis.set_xticks([])
    axis.set_yticks([])
    axis.grid(False)


def sample_grid(images: Pixels, labels: np.ndarray, classes: Sequence[str], per_class: int, seed: int = 0) -> Figure:
    """A row per class with up to `per_class` random examples, labelled by class name (multi-hot labels: examples
    that carry the class)."""
    rng = np.random.default_rng(seed)
    with matplotlib.rc_context(STYLE):
        figure, axes = subplots(
            len(classes), per_class, figsize=(1.1 * per_class + 1, 1.1 * len(classes)), squeeze=False
        )
        for row, name in enumerate(classes):
            members = np.flatnonzero(labels[:, row] if labels.ndim == 2 else labels == row)
            chosen = rng.choice(members, size=min(per_class, len(members)), replace=False)
            for column in range(per_class):
                axis = axes[row, column]
                axis.axis("off")
                if column < len(chosen):
                    _show_image(axis, images[chosen[column]])
            axes[row, 0].axis("on")
            axes[row, 0].set_frame_on(False)
            axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center")
        figure.suptitle("samples per class")
    return figure


def class_counts(counts: Mapping[SplitName, np.ndarray], classes: Sequence[str]) -> Figure:
    """Grouped bars: images per class in each split."""
    with matplotlib.rc_context(STYLE):
        figure, axis = subplots(figsize=(max(6, 0.6 * len(classes) * len(counts)), 3.5))
        width = 0.8 / len(counts)
        positions = np.arange(len(classes))
        for i, (split, values) in enumerate(counts.items()):
            axis.bar(positions + i * width, values, width, label=split)
        axis.set_xticks(positions + width * (len(counts) - 1) / 2, classes, rotation=45, ha="right")
        axis.set_ylabel("images")
        axis.set_title("class counts")
        axis.legend()
    return figure


def training_curves(history: list[dict[str, Any]], title: str = "") -> Figure:
    """Loss and accuracy per epoch: train against validation and test."""
    epochs = [m["epoch"] for m in history]
    with matplotlib.rc_context(STYLE):
        figure, (loss_axis, accuracy_axis) = subplots(1, 2, figsize=(10, 3.6))
        for split, color in (("train", TRAIN_COLOR), ("val", VAL_COLOR), ("test", TEST_COLOR)):
            kind = "" if split == "train" else "plain_"  # training figures are plain: augmented images, once
            if f"{split}_{kind}loss" in history[0]:
                loss_axis.plot(epochs, [m[f"{split}_{kind}loss"] for m in history], "o-", color=color, label=split)
                accuracy = [m[f"{split}_{kind}accuracy"] for m in history]
                accuracy_axis.plot(epochs, accuracy, "o-", color=color, label=split)
        delivered = [Scores.from_metrics(m, "test") for m in history]
        if delivered[0] is not None and delivered[0].tta != "none":
            accuracy = [s.delivered_accuracy for s in delivered if s is not None]
            accuracy_axis.plot(epochs, accuracy, "o--", color=TEST_COLOR, label=f"test ({delivered[0].tta} TTA)")
        loss_axis.set(xlabel="epoch", ylabel="loss", title="loss")
        accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
        for axis in (loss_axis, accuracy_axis):
            axis.legend()
            axis.xaxis.get_major_locator().set_params(integer=True)
        if title:
            figure.suptitle(title)
    return figure


def overlaid_curves(histories: Mapping[str, list[dict[str, Any]]], title: str = "") -> Figure:
    """Several runs on shared axes: each one's training loss and delivered test accuracy per epoch."""
    with matplotlib.rc_context(STYLE):
        figure, (loss_axis, accuracy_axis) = subplots(1, 2, figsize=(10, 3.8))
        for name, history in histories.items():
            epochs = [m["epoch"] for m in history]
            (line,) = loss_axis.plot(epochs, [m.get("train_loss", float("nan")) for m in history], "o-", ms=3)
            scores = [Scores.from_metrics(m, "test") for m in history]
            accuracy = [float("nan") if s is None else s.delivered_accuracy for s in scores]
            accuracy_axis.plot(epochs, accuracy, "o-", ms=3, color=line.get_color(), label=name)
        loss_axis.set(xlabel="epoch", ylabel="training loss", title="training loss")
        accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title="test accuracy (delivered)")
        for axis in (loss_axis, accuracy_axis):
            axis.xaxis.get_major_locator().set_params(integer=True)
        if histories:
            accuracy_axis.legend(fontsize="small")
        if title:
            figure.suptitle(title)
    return figure


def confusion_heatmaps(confusion: np.ndarray, classes: Sequence[str], title: str = "") -> Figure:
    """Counts beside the row-normalised matrix (each row: where that true class's images went)."""
    rows = confusion.sum(1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=float), where=rows > 0)
    size = max(5.0, 0.45 * len(classes) + 2)
    with matplotlib.rc_context({**STYLE, "axes.grid": False}):
        figure, axes = subplots(1, 2, figsize=(2 * size + 1, size), layout="constrained")
        for axis, values, name, fmt in (
            (axes[0], confusion, "counts", "d"),
            (axes[1], normalised, "row-normalised", ".2f"),
        ):
            image = axis.imshow(values, cmap="Blues")
            figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
            axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
            axis.set_yticks(range(len(classes)), classes)
            axis.set(xlabel="predicted class", ylabel="true class", title=f"confusion matrix ({name})")
            if len(classes) <= 20:
                threshold = values.max() / 2
                for (i, j), value in np.ndenumerate(values):
                    axis.text(
                        j,
                        i,
                        format(value, fmt),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if value > threshold else "black",
                    )
        if title:
            figure.suptitle(title)
    return figure


def precision_recall_curves(
    probabilities: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    thresholds: np.ndarray,
    average_precisions: np.ndarray,
) -> Figure:
    """Each class's precision-recall curve over its (N,) probabilities, its (K,) average precision in the legend
    and the point its threshold decides at marked."""
    with matplotlib.rc_context(STYLE):
        figure, axis = subplots(figsize=(6.5, 5))
        for k, name in enumerate(classes):
            if not targets[:, k].any():
                continue
            precision, recall, _ = precision_recall_curve(targets[:, k], probabilities[:, k])
            (line,) = axis.plot(
                recall,
                precision,
                label=f"{name} (AP {average_precisions[k]:.2f})",
            )
            answered = probabilities[:, k] >= thresholds[k]
            found = (answered & (targets[:, k] == 1)).sum()
            if answered.any():
                axis.plot(found / targets[:, k].sum(), found / answered.sum(), "o", color=line.get_color())
        axis.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        axis.set_title("precision-recall per class (dots: at the class's threshold)")
        axis.legend(loc="lower left", fontsize=8)
    return figure


def cooccurrence(targets: np.ndarray, classes: Sequence[str]) -> Figure:
    """How often the classes are carried together: image counts, the diagonal each class's images."""
    counts = targets.T.astype(np.int64) @ targets.astype(np.int64)
    size = max(4.5, 0.45 * len(classes) + 2)
    with matplotlib.rc_context({**STYLE, "axes.grid": False}):
        figure, axis = subplots(figsize=(size + 1, size), layout="constrained")
        image = axis.imshow(counts, cmap="Purples")
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
        axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        axis.set_yticks(range(len(classes)), classes)
        axis.set_title("label co-occurrence (images carrying both)")
        if len(classes) <= 20:
            for (i, j), value in np.ndenumerate(counts):
                color = "white" if value > counts.max() / 2 else "black"
                axis.text(j, i, str(value), ha="center", va="center", fontsize=7, color=color)
    return figure


def per_class_scores(report: dict[str, Any], classes: Sequence[str], title: str = "") -> Figure:
    """Precision, recall and F1 per class, as grouped bars."""
    with matplotlib.rc_context(STYLE):
        figure, axis = subplots(figsize=(max(7, 0.8 * len(classes)), 3.8))
        positions = np.arange(len(classes))
        for i, metric in enumerate(("precision", "recall", "f1-score")):
            axis.bar(positions + (i - 1) * 0.27, [report[name][metric] for name in classes], 0.27, label=metric)
        axis.set_xticks(positions, classes, rotation=45, ha="right")
        axis.set(ylim=(0, 1.05), ylabel="score", title=title or "per-class precision, recall and F1")
        axis.legend(loc="lower right")
    return figure


def f1_side_by_side(reports: dict[str, dict[str, Any]], classes: Sequence[str]) -> Figure:
    """Per-class F1 of several models, grouped by class."""
    with matplotlib.rc_context(STYLE):
        figure, axis = subplots(figsize=(max(7, 0.8 * len(classes)), 3.8))
        width = 0.8 / len(reports)
        positions = np.arange(len(classes))
        for i, (model, report) in enumerate(reports.items()):
            axis.bar(positions + i * width, [report[name]["f1-score"] for name in classes], width, label=model)
        axis.set_xticks(positions + width * (len(reports) - 1) / 2, classes, rotation=45, ha="right")
        axis.set(ylim=(0, 1.05), ylabel="F1", title="per-class F1")
        axis.legend(loc="lower right")
    return figure


def image_gallery(images: np.ndarray, captions: Sequence[str], title: str, columns: int = 6) -> Figure:
    """Images with a caption under each (e.g. the most confidently wrong predictions)."""
    rows = max(1, -(-len(images) // columns))
    with matplotlib.rc_context(STYLE):
        figure, axes = subplots(rows, columns, figsize=(1.9 * columns, 2.2 * rows), squeeze=False)
        for axis in axes.flat:
            axis.axis("off")
        for axis, image, caption in zip(axes.flat, images, captions, strict=False):
            axis.axis("on")
            _show_image(axis, image)
            axis.set_xlabel(caption, fontsize=8)
        figure.suptitle(title)
    return figure


def gradcam_gallery(
    images: np.ndarray, heats: np.ndarray, captions: Sequence[str], title: str, columns: int = 4
) -> Figure:
    """Each image above itself under its (H, W) Grad-CAM heat map in [0, 1], `columns` images to a row."""
    rows = max(1, -(-len(images) // columns))
    with matplotlib.rc_context(STYLE):
        figure, axes = subplots(2 * rows, columns, figsize=(2.2 * columns, 4.8 * rows), squeeze=False)
        for axis in axes.flat:
            axis.axis("off")
        for index, (image, heat, caption) in enumerate(zip(images, heats, captions, strict=True)):
            above, below = (
                axes[2 * (index // columns), index % columns],
                axes[2 * (index // columns) + 1, index % columns],
            )
            _show_image(above, image)
            above.set_title(caption, fontsize=8)
            _show_image(below, image)
            below.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
            below.set_title("Grad-CAM", fontsize=8)
        figure.suptitle(title)
    return figure


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, title: str) -> Figure:
    """The image, and the image under a (H, W) heat map in [0, 1]."""
    with matplotlib.rc_context(STYLE):
        figure, (left, right) = subplots(1, 2, figsize=(7, 3.6))
        _show_image(left, image)
        left.set_title("input")
        _show_image(right, image)
        right.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
        right.set_title("Grad-CAM")
        figure.suptitle(title)
    return figure


def channel_grid(maps: np.ndarray, title: str, limit: int = 64) -> Figure:
    """Up to `limit` single-channel maps (K, H, W) or RGB filters (K, H, W, 3), each scaled on its own."""
    maps = maps[:limit]
    columns = min(8, len(maps))
    rows = -(-len(maps) // columns)
    with matplotlib.rc_context({**STYLE, "axes.grid": False}):
        figure, axes = subplots(rows, columns, figsize=(1.2 * columns, 1.2 * rows + 0.5), squeeze=False)
        for axis in axes.flat:
            axis.axis("off")
        for axis, values in zip(axes.flat, maps, strict=False):
            low, high = values.min(), values.max()
            scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
            axis.imshow(scaled, cmap=None if scaled.ndim == 3 else "viridis", interpolation="nearest")
        figure.suptitle(title)
    return figure
