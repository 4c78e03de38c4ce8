"""Comparison: train several models, each with its own recipe, on one dataset, and tabulate them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cnnlab.atomic import write_text
from cnnlab.config import DataConfig, RunConfig
from cnnlab.data import load_dataset
from cnnlab.evaluate import Evaluation, evaluate, write_evaluation
from cnnlab.models import parameter_count
from cnnlab.recipes import resolve_run_config
from cnnlab.report import write_comparison_report
from cnnlab.train import fit
from cnnlab.train.progress import Reporter

TABLE_FILES = ("comparison.md", "comparison.json", "report.html")


@dataclass
class ComparisonRow:
    model: str
    recipe: str | None
    epochs: int
    test_accuracy: float  # delivered: with the recipe's TTA when it has one
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
    reporter: Reporter | None = None,
) -> list[ComparisonRow]:
    """Train each model into out/<model>/; write out/comparison.md, out/comparison.json and out/report.html."""
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(data)
    rows = []
    evaluations: dict[str, Evaluation] = {}
    histories = {}
    for name in models:
        config: RunConfig = resolve_run_config(
            {"data": asdict(data), "train": {"model": name, **(train_overrides or {})}, "out": str(out / name)}
        )
        if reporter is not None:
            reporter.message(f"training {name} (recipe {config.train.recipe})")
        result = fit(config, dataset, reporter)
        evaluation = evaluate(result.model, dataset.test)
        write_evaluation(evaluation, result.run_dir)
        evaluations[name], histories[name] = evaluation, result.history
        seconds = sum(epoch["seconds"] for epoch in result.history)
        rows.append(
            ComparisonRow(
                model=name,
                recipe=config.train.recipe,
                epochs=len(result.history),
                test_accuracy=evaluation.accuracy,
                plain_accuracy=evaluation.scores.accuracy,
                tta=evaluation.scores.tta,
                macro_f1=evaluation.macro_f1,
                parameters=parameter_count(result.model.module),
                train_seconds=seconds,
                seconds_per_epoch=seconds / max(1, len(result.history)),
                run_dir=str(result.run_dir),
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
        "| model | recipe | epochs | test accuracy (delivered) | without TTA | macro F1 | parameters | training s "
        "| s / epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.model} | {r.recipe or '-'} | {r.epochs} | {r.test_accuracy:.2%}{_tta_label(r.tta)} "
        f"| {r.plain_accuracy:.2%} | {r.macro_f1:.4f} | {r.parameters:,} "
        f"| {r.train_seconds:.1f} | {r.seconds_per_epoch:.2f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def _tta_label(tta: str) -> str:
    return "" if tta == "none" else f" ({tta} TTA)"
