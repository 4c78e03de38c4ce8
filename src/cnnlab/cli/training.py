"""Commands that train: train, compare, bench, and the list of models."""

from __future__ import annotations

import contextlib
import functools
import json
import shlex
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cnnlab import progress
from cnnlab.bench import bench, format_ratio, with_seeds
from cnnlab.cli import app, console, errors, handles_errors, print_whole
from cnnlab.cli.flags import DATA_FIELDS, LABEL_FIELDS, TRAIN_FIELDS, Flags, takes_config
from cnnlab.compare import TABLE_FILES, compare, comparison_markdown
from cnnlab.config import DataConfig, load_toml
from cnnlab.data.dataset import ImageShape
from cnnlab.errors import CnnlabError
from cnnlab.models import MODELS, create_model, model_spec, parameter_count
from cnnlab.models.inference import Scores
from cnnlab.recipes import RECIPES, recipe_explained, recipe_values, resolve_run_config
from cnnlab.report import write_run_report
from cnnlab.tracking.loggers import publish
from cnnlab.train import run
from cnnlab.train.reporter import default_reporter

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="One line per epoch instead of a progress bar.")]
DATA_SOURCE = ("dataset", "data", *LABEL_FIELDS, "cache_dir")


@app.command()
@handles_errors
@takes_config(data=DATA_FIELDS, train=TRAIN_FIELDS, out=True)
def train(
    flags: Flags,
    config: Annotated[Path | None, typer.Option(help="TOML file: data and train tables of flag values.")] = None,
    resume_dir: Annotated[Path | None, typer.Option("--resume", help="Continue this run folder.")] = None,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write report.html at the end.")] = True,
    nproc: Annotated[int, typer.Option(help="Train in this many processes on this machine (torchrun, DDP).")] = 1,
    max_restarts: Annotated[int, typer.Option(help="With --nproc: restarts from the last checkpoint.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Train a model; writes config, metrics, checkpoints and the final model into a run folder."""
    worker_flags = (*(["-q"] if quiet else []), *([] if report else ["--no-report"]))
    launch = functools.partial(
        run, nproc=nproc, max_restarts=max_restarts, worker_flags=worker_flags, reporter=default_reporter(quiet)
    )
    with progress.plain_lines() if quiet else contextlib.nullcontext():
        if resume_dir is not None:
            conflicting = sorted({*flags.data, *flags.train} - {"epochs"} | ({"config"} if config else set()))
            conflicting += ["out"] if flags.out else []
            if conflicting:
                given = ", ".join(f"--{name.replace('_', '-')}" for name in conflicting)
                raise CnnlabError(f"--resume continues a run as configured; it takes only --epochs, not: {given}")
            epochs = flags.train.get("epochs")
            result = launch(resume_from=resume_dir, epochs=epochs)
        else:
            run_config = resolve_run_config(load_toml(config) if config else {}, flags.layer())
            result = launch(run_config)
        if result is None or not result.is_main:  # launched processes report for themselves
            return
        info = result.model.info
        recorded = Scores.from_metrics(info.metrics, "test")
        test = recorded.describe() if recorded is not None else "accuracy not measured (no test split)"
        console.print(f"run folder: {result.run_dir}  test {test}")
        if report:
            console.print(f"report: {write_run_report(result.run_dir, result.dataset.test).path}")
        publish(result.run_dir)


@app.command(name="compare")
@handles_errors
@takes_config(data=DATA_FIELDS, train=("epochs", "patience"))
def compare_command(
    flags: Flags,
    models: Annotated[str, typer.Option(help="Comma-separated model names.")] = "tutorial-mlp,tutorial-cnn",
    out: Annotated[Path | None, typer.Option(help="Folder (default runs/compare-<data>-<time>).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print the table alone, not each run's epochs.")] = False,
) -> None:
    """Train each model with its default recipe on one dataset and print a comparison table."""
    data_config = DataConfig(**flags.data)
    names = [name.strip() for name in models.split(",") if name.strip()]
    for name in names:
        model_spec(name)  # fail on a misspelt name before any training starts
    out = out or Path("runs") / f"compare-{data_config.label}-{datetime.now():%Y%m%d-%H%M%S}"
    rows = compare(names, data_config, out, flags.train, None if quiet else console.print)
    console.print(comparison_markdown(rows, data_config.label))
    console.print(f"wrote {', '.join(str(out / name) for name in TABLE_FILES)}")


@app.command(name="bench")
@handles_errors
@takes_config(data=DATA_SOURCE, train=("epochs",))
def bench_command(
    flags: Flags,
    recipe: Annotated[str, typer.Option(help="Comma-separated recipes to time; name:N runs one N times.")] = "fast70",
    compare_with: Annotated[str, typer.Option("--compare", help="Comma-separated baseline recipes (name:N too).")] = "",
    seeds: Annotated[int, typer.Option(help="Runs per recipe without its own :N, seeded 0..N-1.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda, for every run and the peaks.")] = "auto",
    train_args: Annotated[str, typer.Option(help="More `cnnlab train` flags for every run, e.g. '--compile'.")] = "",
    out: Annotated[Path | None, typer.Option(help="Folder for the runs (default runs/bench-<time>).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Time-to-accuracy of training recipes, side by side, with this machine's capability and dense peaks."""
    data_config = DataConfig(**flags.data)
    split = [name.strip() for name in recipe.split(",") if name.strip()]
    baselines = [name.strip() for name in compare_with.split(",") if name.strip()]
    for entry in [*split, *baselines]:
        recipe_values(with_seeds(entry, seeds)[0])  # fail on a misspelt name before anything runs
    out = out or Path("runs") / f"bench-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    report = errors.print if as_json else console.print
    epochs = flags.train.get("epochs")
    result = bench(split, data_config, out, baselines, seeds, epochs, device, shlex.split(train_args), report)
    summary = result.to_dict()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for row in summary["across_seeds"]:
        score = "delivered_map" if row["metric"] == "mAP" else "delivered_accuracy"
        console.print(
            f"{row['recipe']}: delivered {row['metric']} {row[f'{score}_mean']:.4f} ± "
            f"{row[f'{score}_std']:.4f}, {row['seconds_mean']:.1f} ± {row['seconds_std']:.1f} s of training, "
            f"{row['delivered_seconds_mean']:.1f} ± {row['delivered_seconds_std']:.1f} s delivered, "
            f"over {row['seeds']} seed(s)"
        )
    for row in summary["ratios"]:
        console.print(format_ratio(row))
    console.print(f"wrote {out / 'bench.json'}")


@app.command()
@handles_errors
def models() -> None:
    """List the registered models with their parameter counts at CIFAR-10's input (32x32 RGB, 10 classes)."""
    table = Table("model", "parameters (CIFAR-10)", "input (min)", "weights", "default recipe", "description")
    for spec in MODELS.values():
        count = parameter_count(create_model(spec.name, ImageShape(3, 32, 32), 10))
        size = f"{spec.input_size or 'any'}px ({spec.min_input_size}px)"
        weights = spec.weights or "from scratch"
        table.add_row(spec.name, f"{count:,}", size, weights, spec.default_recipe or "-", spec.summary)
    console.print(table)


@app.command()
@handles_errors
def recipes(
    name: Annotated[
        str | None, typer.Argument(help="A recipe: every value it trains with, and where it comes from.")
    ] = None,
) -> None:
    """List the training recipes, or show one: each value, and whether the recipe, the config's defaults or the
    model family sets it. Flags and a --config file override any of them."""
    if name is None:
        table = Table("recipe", "model", "epochs", "optimizer", "batch", "test-time views")
        for recipe in RECIPES:
            train = resolve_run_config({"train": {"recipe": recipe}}).train
            table.add_row(
                recipe,
                train.model,
                f"{train.optim.epochs:g}",
                train.optim.optimizer,
                str(train.optim.batch_size),
                train.inference.tta,
            )
        print_whole(table)
        return
    table = Table("setting", "value", "from", title=f"recipe {name}", title_justify="left")
    for value in recipe_explained(name):
        table.add_row(value.key, str(value.value), value.source)
    print_whole(table)
