"""Reports a person can read: figures and a self-contained report.html for a run or a comparison."""

from __future__ import annotations

import json
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnlab import figures
from cnnlab.atomic import atomic_write, write_text
from cnnlab.config import RunConfig, build, to_toml
from cnnlab.data import Dataset, Split
from cnnlab.evaluate import Evaluation, evaluate, test_split_for, write_evaluation
from cnnlab.explain import explanations
from cnnlab.models import TrainedModel, load_model
from cnnlab.models.inference import Scores
from cnnlab.report import html
from cnnlab.report.label_sets import class_table, label_set_figures
from cnnlab.run_dir import RunDir
from cnnlab.tracking.catalog import RunSummary, machine_kind_of, precision_of

GALLERY_SIZE = 18
SAMPLE_SIZE = 12  # test images shown with their predictions
GRADCAM_MISTAKES = 8  # the worst mistakes shown under their Grad-CAM

if TYPE_CHECKING:
    from cnnlab.compare import ComparisonRow  # compare writes its report with this module


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


def sample_predictions(evaluation: Evaluation, split: Split, count: int = SAMPLE_SIZE) -> tuple[np.ndarray, list[str]]:
    """`count` test images spread evenly over the split, each captioned with the prediction and the truth."""
    chosen = np.linspace(0, len(split) - 1, min(count, len(split))).round().astype(int)
    predicted = evaluation.probabilities.argmax(1)
    classes = evaluation.classes
    captions = [
        f"{classes[predicted[i]]} {evaluation.probabilities[i].max():.2f}\n"
        + ("right" if predicted[i] == evaluation.labels[i] else f"wrong: {classes[evaluation.labels[i]]}")
        for i in chosen
    ]
    return split.images[chosen], captions


def run_figures(
    history: list[dict[str, Any]], evaluation: Evaluation, split: Split, model: TrainedModel | None = None
) -> dict[str, bytes]:
    """PNG bytes of every figure of a run report, by file name; with the `model`, its worst mistakes under
    their Grad-CAM (where it has convolutions)."""
    pngs = {}
    if history:
        pngs["training_curves.png"] = figures.png_bytes(figures.training_curves(history))
    if evaluation.multi_label:
        return pngs | label_set_figures(evaluation, split, model)
    pngs["per_class_scores.png"] = figures.png_bytes(figures.per_class_scores(evaluation.report, evaluation.classes))
    pngs["confusion_matrix.png"] = figures.png_bytes(
        figures.confusion_heatmaps(evaluation.confusion, evaluation.classes)
    )
    if len(split):
        pngs["sample_predictions.png"] = figures.png_bytes(
            figures.image_gallery(*sample_predictions(evaluation, split), "predictions on test images")
        )
    images, captions = confidently_wrong(evaluation, split)
    if len(images):
        pngs["confidently_wrong.png"] = figures.png_bytes(
            figures.image_gallery(images, captions, "most confidently wrong test images")
        )
    if len(images) and model is not None and model.module.gradcam_layer() is not None:
        shown = np.asarray(images[:GRADCAM_MISTAKES])
        heats = np.stack([one.heat for one in explanations(model, shown, [None] * len(shown))])
        pngs["worst_mistakes_gradcam.png"] = figures.png_bytes(
            figures.gradcam_gallery(
                shown, heats, captions[:GRADCAM_MISTAKES], "what the model looked at in its worst mistakes"
            )
        )
    return pngs


@dataclass(frozen=True)
class RunReport:
    path: Path  # report.html
    summary: str  # its headline: the delivered test accuracy and the rest


def write_run_report(run_dir: Path, split: Split | None = None, own_split: bool = True) -> RunReport:
    """Evaluate a finished run on its test split (or `split`) and write its figures and report.html into the run
    folder. On the run's own test split (`own_split`) the headline is the accuracy training recorded.

    The page leads with the answer (the title: model, data and delivered accuracy; then the summary: accuracy,
    time, machine and recipe), then how training went, the per-class results and the confusion matrix, then the
    worst mistakes with what the model looked at, and the configuration last."""
    model = load_model(run_dir)
    split = split if split is not None else test_split_for(model, None)
    evaluation = evaluate(model, split)
    write_evaluation(evaluation, run_dir)
    folder = RunDir(run_dir)
    history = folder.read_metrics()
    pngs = run_figures(history, evaluation, split, model)
    for name, data in pngs.items():
        atomic_write(run_dir / name, data)

    recorded = Scores.from_metrics(model.info.metrics, "test") if own_split else None
    scores = recorded or evaluation.scores
    config = build(RunConfig, model.info.config, f"{run_dir / RunDir.INFO}")
    balanced = evaluation.balanced_accuracy
    summary = (
        f"test {scores.describe()}{'' if balanced is None else f', balanced accuracy {balanced:.4f}'}, "
        f"loss {scores.delivered_loss:.4f}, on {len(split)} images"
    )
    if config.data.exclude:
        summary += f"; trained without the images {config.data.exclude} flags (data.exclude; the test split whole)"
    facts = _run_facts(config, folder.read_sessions(), history, scores, evaluation, len(split))
    # Every key of any line, in the order first seen: epochs of different kinds log different figures (the
    # first has init_seconds; head-only epochs have no test_seconds).
    metric_keys = [key for key in dict.fromkeys(k for m in history for k in m) if key != "epoch"]
    per_epoch = html.table(
        ["epoch", *metric_keys], [[m["epoch"], *(m.get(k, "") for k in metric_keys)] for m in history]
    )
    figure = {
        name.removesuffix(".png"): html.image(data, name.removesuffix(".png").replace("_", " "))
        for name, data in pngs.items()
    }
    sections = [
        ("Summary", html.facts(facts)),
        ("Training", figure.get("training_curves", "") + html.details("Metrics per epoch", per_epoch)),
        *(_label_set_sections(evaluation, figure) if evaluation.multi_label else _class_sections(evaluation, figure)),
        ("Configuration", f"<pre>{escape(folder.config_text() or to_toml(config))}</pre>"),
    ]
    headline = (
        f"test mAP {scores.delivered_map:.4f}"
        if scores.multi_label
        else f"{scores.delivered_accuracy:.2%} test accuracy"
    )
    title = f"{model.info.architecture} on {config.data.label}: {headline}"
    write_text(folder / RunDir.REPORT, html.page(title, sections, summary))
    return RunReport(folder / RunDir.REPORT, summary)


def _class_sections(evaluation: Evaluation, figure: dict[str, str]) -> list[tuple[str, str]]:
    """A single-label run's results: per class, the confusion matrix, examples and the worst mistakes."""
    return [
        (
            "Per class (test)",
            html.classification_table(evaluation.report, evaluation.classes) + figure["per_class_scores"],
        ),
        ("Confusion matrix", figure["confusion_matrix"]),
        ("Examples", figure.get("sample_predictions", "")),
        (
            "Worst mistakes",
            figure.get("worst_mistakes_gradcam", "") + figure.get("confidently_wrong", "")
            or "<p>none: every test image was classified correctly</p>",
        ),
    ]


def _label_set_sections(evaluation: Evaluation, figure: dict[str, str]) -> list[tuple[str, str]]:
    """A multi-label run's results: per class with precision-recall curves, co-occurrence, examples, and the worst
    misses and false alarms."""
    worst = [
        figure.get(f"worst_{kind}_gradcam", figure.get(f"worst_{kind}", "")) for kind in ("misses", "false_alarms")
    ]
    return [
        ("Per class (test)", class_table(evaluation) + figure["precision_recall"]),
        ("Label co-occurrence (test)", figure["label_cooccurrence"]),
        ("Examples", figure.get("sample_predictions", "")),
        ("Worst misses and false alarms", "".join(worst) or "<p>none: every test label set was answered right</p>"),
    ]


def _run_facts(
    config: RunConfig,
    sessions: list[dict[str, Any]],
    history: list[dict[str, Any]],
    scores: Scores,
    evaluation: Evaluation,
    images: int,
) -> list[tuple[str, str]]:
    """The summary's rows: how good, how long, where, and how it was trained."""
    optim, augment = config.train.optim, config.train.augment
    kept = history[-1].get("best_epoch") if history else None
    seconds = sum(m.get("seconds", 0.0) for m in history)
    machine = f"{machine_kind_of(sessions)}, {precision_of(sessions, history) or 'precision not recorded'}"
    augmented = [
        f"flip {augment.flip}" if augment.flip != "none" else "",
        f"translate {augment.translate} px" if augment.translate else "",
        f"crops of {augment.crop_area:g}+ of the area" if augment.crop_area < 1 else "",
    ]
    recipe = (
        f"{config.train.recipe or 'none'}: {config.train.model}, {optim.optimizer} lr {optim.lr:g}, "
        f"batch {optim.batch_size}, {optim.epochs:g} epochs, {optim.schedule} schedule"
    )
    excluded = f", without what {config.data.exclude} flags" if config.data.exclude else ""
    balanced = evaluation.balanced_accuracy
    if scores.multi_label:
        results = [
            ("test mAP (delivered)", f"{scores.delivered_map:.4f}" + _with_tta(scores.tta)),
            ("exact match", f"{scores.delivered_accuracy:.2%}"),
            ("Hamming loss", f"{scores.hamming_loss:.4f}"),
            ("F1 micro / macro", f"{scores.micro_f1:.4f} / {scores.macro_f1:.4f}"),
        ]
    else:
        results = [
            ("test accuracy (delivered)", f"{scores.delivered_accuracy:.2%}" + _with_tta(scores.tta)),
            *([("without TTA", f"{scores.plain_accuracy:.2%}")] if scores.tta != "none" else []),
            ("balanced accuracy", f"{balanced:.2%}" if balanced is not None else "-"),
        ]
    return [
        *results,
        ("test loss", f"{scores.delivered_loss:.4f} on {images:,} images"),
        ("training", f"{seconds:,.1f} s, {len(history)} epochs" + (f" (kept epoch {kept})" if kept else "")),
        ("machine", machine),
        ("recipe", recipe),
        ("augmentation", ", ".join(part for part in augmented if part) or "none"),
        ("data", f"{config.data.data or config.data.dataset}{excluded}"),
    ]


def _with_tta(tta: str) -> str:
    return "" if tta == "none" else f" with {tta} TTA"


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
    rows: list[ComparisonRow],
    evaluations: dict[str, Evaluation],
    histories: dict[str, list[dict[str, Any]]],
    dataset: Dataset,
) -> Path:
    """report.html with the models side by side, opening with their ranking by delivered test accuracy; then
    per-class F1, confusion matrices and training curves."""
    classes = list(dataset.classes)
    ranked = sorted(rows, key=lambda r: r.scores.headline[1], reverse=True)
    metric = "mAP" if ranked[0].scores.multi_label else "test accuracy"
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
        ("Ranking", html.table(RANKING_HEADER, _ranking_rows(ranked))),
        ("Per-class F1", html.image(f1, "per-class F1")),
        ("Confusion matrices", f'<div class="side">{confusions}</div>'),
        ("Training curves", f'<div class="side">{curves}</div>'),
        ("Runs", f"<pre>{escape(json.dumps([r.to_dict() for r in rows], indent=2))}</pre>"),
    ]
    best = ranked[0]
    summary = f"best: {best.model} at {best.scores.headline_text} {metric} on {dataset.name}" + "".join(
        f"; {r.model} {r.scores.headline_text}" for r in ranked[1:]
    )
    title = f"Comparison on {dataset.name}: {best.model} best at {best.scores.headline_text} {metric}"
    write_text(out / RunDir.REPORT, html.page(title, sections, summary))
    return out / RunDir.REPORT


RANKING_HEADER = [
    "rank",
    "model",
    "test accuracy (delivered; multi-label: mAP)",
    "without TTA (multi-label: exact match)",
    "macro F1",
    "recipe",
    "epochs (kept)",
    "parameters",
    "training s",
    "s / epoch",
]


def _ranking_rows(ranked: list[ComparisonRow]) -> list[list[Any]]:
    """A comparison's rows, best first, as its report's ranking shows them."""
    return [
        [
            rank,
            row.model,
            row.scores.headline_text + _with_tta(row.scores.tta),
            f"{row.scores.plain_accuracy:.2%}",
            row.macro_f1,
            row.recipe or "-",
            f"{row.epochs} ({row.kept_epoch})",
            row.parameters,
            f"{row.train_seconds:.1f}",
            f"{row.seconds_per_epoch:.2f}",
        ]
        for rank, row in enumerate(ranked, 1)
    ]


def runs_table_rows(runs: list[RunSummary]) -> list[list[Any]]:
    """The table's cells, as `cnnlab runs` prints them and its page shows them."""
    return [
        [
            run.name,
            run.status,
            run.model,
            run.data,
            run.recipe or "-",
            f"{run.epochs}/{run.epochs_planned:g}",
            run.headline,
            f"{run.seconds:,.1f}",
            run.precision,
            run.started.replace("T", " ")[:16],
        ]
        for run in runs
    ]


RUNS_HEADER = [
    "run",
    "status",
    "model",
    "data",
    "recipe",
    "epochs",
    "test accuracy (multi-label: mAP)",
    "training s",
    "precision",
    "started",
]


def write_runs_page(groups: dict[str, list[RunSummary]], out: Path, root: Path) -> Path:
    """One page: per machine kind, the table of its runs and their curves overlaid on shared axes."""
    sections = []
    for kind, runs in groups.items():
        curves = {run.name: run.history for run in runs if run.history}
        figure = figures.png_bytes(figures.overlaid_curves(curves)) if curves else b""
        content = html.table(RUNS_HEADER, runs_table_rows(runs)) + (
            html.image(figure, f"curves on {kind}") if figure else ""
        )
        sections.append((f"{kind}: {len(runs)} run(s)", content))
    best = [run for runs in groups.values() for run in runs if run.delivered_accuracy is not None]
    leader = max(best, key=lambda run: run.delivered_accuracy or 0.0) if best else None
    summary = f"{sum(len(runs) for runs in groups.values())} runs under {root}" + (
        f"; the most accurate: {leader.name} ({leader.model} on {leader.data}) at {leader.delivered_accuracy:.2%}"
        if leader
        else ""
    )
    write_text(out, html.page(f"Runs under {root}", sections, summary))
    return out
