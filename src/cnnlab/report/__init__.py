"""Reports a person can read: figures and a self-contained report.html for a run or a comparison."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.atomic import atomic_write, write_text
from cnnlab.data import Dataset, Split
from cnnlab.evaluate import Evaluation, evaluate, test_split_for, write_evaluation
from cnnlab.models import load_model
from cnnlab.models.inference import Scores
from cnnlab.report import figures, html
from cnnlab.run_dir import RunDir

GALLERY_SIZE = 18


def confidently_wrong(evaluation: Evaluation, split: Split, count: int = GALLERY_SIZE) -> tuple[np.ndarray, list[str]]:
    """The wrong predictions the model was surest of, most confident first, with captions."""
    predicted = evaluation.probabilities.argmax(1)
    confidence = evaluation.probabilities.max(1)
    wrong = np.flatnonzero(predicted != evaluation.labels)
    chosen = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    classes = evaluation.classes
    captions = [
        f"true {classes[evaluation.labels[i]]}\npred {classes[predicted[i]]} {confidence[i]:.2f}" for i in chosen
    ]
    return split.images[chosen], captions


def run_figures(history: list[dict[str, Any]], evaluation: Evaluation, split: Split) -> dict[str, bytes]:
    """PNG bytes of every figure of a run report, by file name."""
    pngs = {}
    if history:
        pngs["training_curves.png"] = figures.png_bytes(figures.training_curves(history))
    pngs["confusion_matrix.png"] = figures.png_bytes(
        figures.confusion_heatmaps(evaluation.confusion, evaluation.classes)
    )
    pngs["per_class_scores.png"] = figures.png_bytes(figures.per_class_scores(evaluation.report, evaluation.classes))
    images, captions = confidently_wrong(evaluation, split)
    if len(images):
        pngs["confidently_wrong.png"] = figures.png_bytes(
            figures.image_gallery(images, captions, "most confidently wrong test images")
        )
    return pngs


@dataclass(frozen=True)
class RunReport:
    path: Path  # report.html
    summary: str  # its headline: the delivered test accuracy and the rest


def write_run_report(run_dir: Path, split: Split | None = None, own_split: bool = True) -> RunReport:
    """Evaluate a finished run on its test split (or `split`) and write its figures and report.html into the run
    folder. On the run's own test split (`own_split`) the headline is the accuracy training recorded."""
    model = load_model(run_dir)
    split = split if split is not None else test_split_for(model, None)
    evaluation = evaluate(model, split)
    write_evaluation(evaluation, run_dir)
    folder = RunDir(run_dir)
    history = folder.read_metrics()
    pngs = run_figures(history, evaluation, split)
    for name, data in pngs.items():
        atomic_write(run_dir / name, data)

    # Every key of any line, in the order first seen: epochs of different kinds log different figures (the
    # first has init_seconds; head-only epochs have no test_seconds).
    metric_keys = [key for key in dict.fromkeys(k for m in history for k in m) if key != "epoch"]
    config = folder.config_text()
    sections = [
        ("Configuration", f"<pre>{escape(config)}</pre>"),
        (
            "Metrics per epoch",
            html.table(["epoch", *metric_keys], [[m["epoch"], *(m.get(k, "") for k in metric_keys)] for m in history]),
        ),
        ("Classification report (test)", html.classification_table(evaluation.report, evaluation.classes)),
        *(
            (name.removesuffix(".png").replace("_", " ").capitalize(), html.image(data, name))
            for name, data in pngs.items()
        ),
    ]
    recorded = Scores.from_metrics(model.info.metrics, "test", model.info.tta) if own_split else None
    scores = recorded or evaluation.scores
    summary = (
        f"test {scores.describe()}, balanced accuracy {evaluation.balanced_accuracy:.4f}, "
        f"loss {scores.delivered_loss:.4f}, on {len(split)} images"
    )
    excluded = model.info.config.get("data", {}).get("exclude")
    if excluded:
        summary += f"; trained without the images {excluded} flags (data.exclude; the test split whole)"
    title = f"{model.info.architecture} on {model.info.config.get('data', {}).get('dataset') or run_dir.name}"
    write_text(folder / RunDir.REPORT, html.page(title, sections, summary))
    return RunReport(folder / RunDir.REPORT, summary)


def write_data_overview(dataset: Dataset, out: Path, per_class: int) -> tuple[Path, Path, dict[str, list[int]]]:
    """A labelled grid of training samples per class at `out`, and a bar chart of the class counts of
    each split beside it (`<name>_counts.png`); returns both paths and the counts."""
    counts = dataset.class_counts()
    grid = figures.save(
        figures.sample_grid(dataset.train.images, dataset.train.labels, dataset.classes, per_class), out
    )
    chart = figures.save(figures.class_counts(counts, dataset.classes), out.with_name(f"{out.stem}_counts.png"))
    return grid, chart, {name: values.tolist() for name, values in counts.items()}


def write_comparison_report(
    out: Path,
    rows: list[Any],
    evaluations: dict[str, Evaluation],
    histories: dict[str, list[dict[str, Any]]],
    dataset: Dataset,
) -> Path:
    """report.html with the models side by side: table, per-class F1, confusion matrices, training curves."""
    classes = list(dataset.classes)
    table_rows = [
        [
            r.model,
            r.recipe or "-",
            f"{r.epochs} ({r.kept_epoch})",
            r.accuracy,
            r.plain_accuracy,
            r.macro_f1,
            r.parameters,
            r.train_seconds,
            r.seconds_per_epoch,
        ]
        for r in rows
    ]
    f1 = figures.png_bytes(figures.f1_side_by_side({m: e.report for m, e in evaluations.items()}, classes))
    confusions = "".join(
        f"<div>{html.image(figures.png_bytes(figures.confusion_heatmaps(e.confusion, classes, model)), model)}</div>"
        for model, e in evaluations.items()
    )
    curves = "".join(
        f"<div>{html.image(figures.png_bytes(figures.training_curves(h, model)), model)}</div>"
        for model, h in histories.items()
        if h
    )
    sections = [
        (
            "Models",
            html.table(
                [
                    "model",
                    "recipe",
                    "epochs (kept)",
                    "test accuracy (delivered)",
                    "without TTA",
                    "macro F1",
                    "parameters",
                    "training s",
                    "s / epoch",
                ],
                table_rows,
            ),
        ),
        ("Per-class F1", html.image(f1, "per-class F1")),
        ("Confusion matrices", f'<div class="side">{confusions}</div>'),
        ("Training curves", f'<div class="side">{curves}</div>'),
        ("Runs", f"<pre>{escape(json.dumps([asdict(r) for r in rows], indent=2))}</pre>"),
    ]
    best = max(rows, key=lambda r: r.accuracy)
    summary = f"best: {best.model} at {best.accuracy:.2%} test accuracy on {dataset.name}"
    write_text(out / RunDir.REPORT, html.page(f"Comparison on {dataset.name}", sections, summary))
    return out / RunDir.REPORT
