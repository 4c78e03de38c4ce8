"""Comparison: train several models, each with its own recipe, on one dataset, and tabulate what each delivered."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cnnlab.atomic import write_text
from cnnlab.config import DataConfig
from cnnlab.data import load_dataset
from cnnlab.errors import CnnlabError
from cnnlab.evaluate import Evaluation, evaluate, write_evaluation
from cnnlab.models import load_model, parameter_count
from cnnlab.recipes import resolve_run_config
from cnnlab.report import write_comparison_report
from cnnlab.runs import RunOutcome, train_in_child

TABLE_FILES = ("comparison.md", "comparison.json", "report.html")


@dataclass
class ComparisonRow(RunOutcome):
    """A run's outcome, with what the comparison adds from the model itself."""

    macro_f1: float
    parameters: int
    seconds_per_epoch: float


def compare(
    models: list[str],
    data: DataConfig,
    out: Path,
    train_overrides: dict[str, Any] | None = None,  # TrainConfig values over each model's default recipe
    echo: Callable[[str], object] | None = None,
) -> list[ComparisonRow]:
    """Train each model into out/<model>/ (each in a child process, as `bench` runs recipes, its lines handed to
    `echo`); write out/comparison.md, out/comparison.json and out/report.html."""
    if not models:
        raise CnnlabError("compare needs at least one model")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    evaluations: dict[str, Evaluation] = {}
    histories = {}
    for name in models:
        config = resolve_run_config(
            {"data": asdict(data), "train": {"model": name, **(train_overrides or {})}, "out": str(out / name)}
        )
        # At the size this model is made for (as `cnnlab train` reads the data); it also fills the cache, so
        # that the run does not decode the images again.
        dataset = load_dataset(config.data)
        if echo is not None:
            echo(f"training {name} (recipe {config.train.recipe})")
        run = train_in_child(config, echo=echo)
        model = load_model(run.run_dir)
        evaluation = evaluate(model, dataset.test)  # the per-class report; the accuracy is the run's own
        write_evaluation(evaluation, run.run_dir)
        evaluations[name], histories[name] = evaluation, run.history
        outcome = run.outcome()
        rows.append(
            ComparisonRow(
                **outcome.fields(),
                macro_f1=evaluation.macro_f1,
                parameters=parameter_count(model.module),
                seconds_per_epoch=outcome.train_seconds / max(1, outcome.epochs),
            )
        )
    write_text(out / TABLE_FILES[0], comparison_markdown(rows, dataset.name))
    write_text(
        out / TABLE_FILES[1], json.dumps({"dataset": dataset.name, "results": [r.to_dict() for r in rows]}, indent=2)
    )
    write_comparison_report(out, rows, evaluations, histories, dataset)
    return rows


def comparison_markdown(rows: list[ComparisonRow], dataset_name: str) -> str:
    """The table, its score column named for what it holds: the test accuracy, or a multi-label model's mAP
    (beside it the exact match, the accuracy of label sets)."""
    multi = rows[0].scores.multi_label if rows else False
    score, plain = (
        ("test mAP (delivered)", "exact match without TTA") if multi else ("test accuracy (delivered)", "without TTA")
    )
    lines = [
        f"# Comparison on {dataset_name}",
        "",
        f"| model | recipe | epochs (kept) | {score} | {plain} | macro F1 | parameters | training s | s / epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.model} | {r.recipe or '-'} | {r.epochs} ({r.kept_epoch}) "
        f"| {r.scores.headline_text}{_tta_label(r.scores.tta)} "
        f"| {r.scores.plain_accuracy:.2%} | {r.macro_f1:.4f} | {r.parameters:,} "
        f"| {r.train_seconds:.1f} | {r.seconds_per_epoch:.2f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def _tta_label(tta: str) -> str:
    return "" if tta == "none" else f" ({tta} TTA)"
