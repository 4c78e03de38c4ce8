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
from cnnlab.runs import train_in_child

TABLE_FILES = ("comparison.md", "comparison.json", "report.html")


@dataclass
class ComparisonRow:
    model: str
    recipe: str | None
    epochs: int  # trained
    kept_epoch: int  # whose weights the model has: the last, or the one early stopping kept
    accuracy: float  # delivered, at the kept epoch: with the recipe's TTA when it has one
    plain_accuracy: float  # each test image seen once
    tta: str
    macro_f1: float
    parameters: int
    train_seconds: float  # training only, excluding the per-epoch evaluations
    seconds_per_epoch: float
    run_dir: str


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
        scores = run.scores
        rows.append(
            ComparisonRow(
                model=name,
                recipe=config.train.recipe,
                epochs=len(run.history),
                kept_epoch=run.kept_epoch,
                accuracy=scores.delivered_accuracy,
                plain_accuracy=scores.accuracy,
                tta=scores.tta,
                macro_f1=evaluation.macro_f1,
                parameters=parameter_count(model.module),
                train_seconds=run.train_seconds,
                seconds_per_epoch=run.train_seconds / max(1, len(run.history)),
                run_dir=str(run.run_dir),
            )
        )
    write_text(out / TABLE_FILES[0], comparison_markdown(rows, dataset.name))
    write_text(
        out / TABLE_FILES[1], json.dumps({"dataset": dataset.name, "results": [asdict(r) for r in rows]}, indent=2)
    )
    write_comparison_report(out, rows, evaluations, histories, dataset)
    return rows


def comparison_markdown(rows: list[ComparisonRow], dataset_name: str) -> str:
    lines = [
        f"# Comparison on {dataset_name}",
        "",
        "| model | recipe | epochs (kept) | test accuracy (delivered) | without TTA | macro F1 | parameters "
        "| training s | s / epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.model} | {r.recipe or '-'} | {r.epochs} ({r.kept_epoch}) | {r.accuracy:.2%}{_tta_label(r.tta)} "
        f"| {r.plain_accuracy:.2%} | {r.macro_f1:.4f} | {r.parameters:,} "
        f"| {r.train_seconds:.1f} | {r.seconds_per_epoch:.2f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def _tta_label(tta: str) -> str:
    return "" if tta == "none" else f" ({tta} TTA)"
