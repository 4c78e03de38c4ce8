"""The `cnnlab` command: a thin layer that parses flags and calls the library."""

from __future__ import annotations

import functools
import json
import logging
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cnnlab.bench import bench
from cnnlab.compare import TABLE_FILES, compare, comparison_markdown
from cnnlab.config import DataConfig, load_toml
from cnnlab.errors import CnnlabError
from cnnlab.evaluate import REPORT_FILE, Evaluation, evaluate_saved
from cnnlab.models import MODELS, create_model, load_model, model_spec, parameter_count
from cnnlab.predict import expand_paths, predict_files
from cnnlab.recipes import recipe_values, resolve_run_config
from cnnlab.train import fit, resume
from cnnlab.train.progress import default_reporter

app = typer.Typer(
    help="Train, evaluate and use convolutional image classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)

# Exit codes: 1 when some inputs failed (predict), 2 for a usage or input error, 130 when interrupted.
EXIT_PARTIAL, EXIT_ERROR, EXIT_INTERRUPTED = 1, 2, 130

Dataset = Annotated[str | None, typer.Option("--dataset", help="Named dataset: digits, cifar10, cifar100.")]
Data = Annotated[str | None, typer.Option("--data", help="Image folder, .tar.gz/.zip of one, or a CIFAR archive.")]
ImageSize = Annotated[int | None, typer.Option(help="Resize images to this many pixels per side.")]
ValFraction = Annotated[float | None, typer.Option(help="Share of train held out for validation.")]
TestFraction = Annotated[float | None, typer.Option(help="Test share when the data has no test split.")]
SplitSeed = Annotated[int | None, typer.Option(help="Seed of the validation/test splits.")]
CacheDir = Annotated[str | None, typer.Option(help="Cache folder (default $CNNLAB_CACHE or ~/.cache/cnnlab).")]
Strict = Annotated[bool | None, typer.Option("--strict", help="Unreadable images are an error.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="One line per epoch instead of a progress bar.")]
Epochs = Annotated[int | None, typer.Option(help="Number of epochs.")]
ModelPath = Annotated[Path, typer.Argument(help="A run folder, or its model.json / model.safetensors.")]


def handles_errors(command):
    """Turn cnnlab's input errors into one line on stderr and a distinct exit code; no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CnnlabError as error:
            errors.print(f"error: {error}")
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            errors.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


@app.callback()
def setup() -> None:
    """Library warnings (skipped files and the like) go to stderr as plain lines."""
    logger = logging.getLogger("cnnlab")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def data_values(**flags: Any) -> dict[str, Any]:
    """The data flags that were given, as a [data] table."""
    return {key: value for key, value in flags.items() if value is not None}


@app.command()
@handles_errors
def train(
    model: Annotated[str | None, typer.Option(help="Model name; see `cnnlab models`.")] = None,
    recipe: Annotated[str | None, typer.Option(help="Training recipe (default: the model's own).")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file with [data] and [train] tables.")] = None,
    dataset: Dataset = None,
    data: Data = None,
    image_size: ImageSize = None,
    val_fraction: ValFraction = None,
    test_fraction: TestFraction = None,
    split_seed: SplitSeed = None,
    cache_dir: CacheDir = None,
    strict: Strict = None,
    epochs: Epochs = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd or adam.")] = None,
    momentum: Annotated[float | None, typer.Option(help="SGD momentum.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="L2 weight decay.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of weight init and data order.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    out: Annotated[str | None, typer.Option(help="Run folder (default runs/<model>-<data>-<time>).")] = None,
    resume_dir: Annotated[Path | None, typer.Option("--resume", help="Continue this run folder.")] = None,
    quiet: Quiet = False,
) -> None:
    """Train a model; writes config, metrics, checkpoints and the final model into a run folder."""
    reporter = default_reporter(quiet)
    data_flags = data_values(
        dataset=dataset,
        data=data,
        image_size=image_size,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        split_seed=split_seed,
        cache_dir=cache_dir,
        strict=strict,
    )
    train_flags = {
        key: value
        for key, value in dict(
            model=model,
            recipe=recipe,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            momentum=momentum,
            weight_decay=weight_decay,
            seed=seed,
            device=device,
        ).items()
        if value is not None
    }
    if resume_dir is not None:
        conflicting = sorted(
            {*data_flags, *(set(train_flags) - {"epochs"})}
            | ({"config", "out"} & {name for name, value in (("config", config), ("out", out)) if value is not None})
        )
        if conflicting:
            raise CnnlabError(
                f"--resume continues a run as configured; it takes only --epochs, not: {', '.join(conflicting)}"
            )
        result = resume(resume_dir, epochs=epochs, reporter=reporter)
    else:
        file_values = load_toml(config) if config else {}
        flags = {"data": data_flags, "train": train_flags, **({"out": out} if out else {})}
        result = fit(resolve_run_config(file_values, flags), reporter=reporter)
    final = result.history[-1] if result.history else {}
    console.print(f"run folder: {result.run_dir}  test accuracy: {final.get('test_acc', float('nan')):.4f}")


@app.command()
@handles_errors
def evaluate(
    model: ModelPath,
    dataset: Dataset = None,
    data: Data = None,
    test_fraction: TestFraction = None,
    split_seed: SplitSeed = None,
    cache_dir: CacheDir = None,
    strict: Strict = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Accuracy, loss, per-class precision/recall/F1 and the confusion matrix on a test split."""
    flags = data_values(
        dataset=dataset,
        data=data,
        test_fraction=test_fraction,
        split_seed=split_seed,
        cache_dir=cache_dir,
        strict=strict,
    )
    data_config = DataConfig(**flags) if dataset or data else None
    evaluation, folder = evaluate_saved(model, data_config)
    if as_json:
        typer.echo(json.dumps(evaluation.to_dict(), indent=2))
        return
    console.print(report_table(evaluation))
    console.print(f"accuracy {evaluation.accuracy:.4f}  loss {evaluation.loss:.4f}  ({len(evaluation.labels)} images)")
    console.print(f"wrote {folder / REPORT_FILE} and the confusion matrix beside it")


def report_table(evaluation: Evaluation) -> Table:
    table = Table("class", "precision", "recall", "f1-score", "support", title="classification report")
    for name in [*evaluation.classes, "macro avg", "weighted avg"]:
        row = evaluation.report[name]
        table.add_row(name, *(f"{row[k]:.4f}" for k in ("precision", "recall", "f1-score")), f"{row['support']:.0f}")
    return table


@app.command()
@handles_errors
def predict(
    model: ModelPath,
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    top_k: Annotated[int, typer.Option(help="How many classes to show per image.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the predictions as JSON.")] = False,
) -> None:
    """Predict the class of image files; exits 1 when any file could not be read."""
    predictions = predict_files(load_model(model), expand_paths(paths), top_k)
    if as_json:
        typer.echo(json.dumps([asdict(p) for p in predictions], indent=2))
    for prediction in predictions:
        if prediction.error:
            errors.print(f"error: {prediction.error}")
        elif not as_json:
            console.print(prediction.path + "  " + "  ".join(f"{name} {p:.3f}" for name, p in prediction.top))
    if any(p.error for p in predictions):
        raise typer.Exit(EXIT_PARTIAL)


@app.command(name="compare")
@handles_errors
def compare_command(
    models: Annotated[str, typer.Option(help="Comma-separated model names.")] = "tutorial-mlp,tutorial-cnn",
    dataset: Dataset = None,
    data: Data = None,
    image_size: ImageSize = None,
    test_fraction: TestFraction = None,
    split_seed: SplitSeed = None,
    cache_dir: CacheDir = None,
    strict: Strict = None,
    epochs: Annotated[int | None, typer.Option(help="Override every recipe's epochs.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder (default runs/compare-<data>-<time>).")] = None,
    quiet: Quiet = False,
) -> None:
    """Train each model with its recipe on one dataset and print a comparison table."""
    data_config = DataConfig(
        **data_values(
            dataset=dataset,
            data=data,
            image_size=image_size,
            test_fraction=test_fraction,
            split_seed=split_seed,
            cache_dir=cache_dir,
            strict=strict,
        )
    )
    names = [name.strip() for name in models.split(",") if name.strip()]
    for name in names:
        model_spec(name)  # fail on a misspelt name before any training starts
    out = out or Path("runs") / f"compare-{data_config.label}-{datetime.now():%Y%m%d-%H%M%S}"
    overrides = {"epochs": epochs} if epochs is not None else {}
    rows = compare(names, data_config, out, overrides, default_reporter(quiet))
    console.print(comparison_markdown(rows, data_config.label))
    console.print(f"wrote {out / TABLE_FILES[0]} and {out / TABLE_FILES[1]}")


@app.command(name="bench")
@handles_errors
def bench_command(
    recipe: Annotated[str, typer.Option(help="Comma-separated recipes to time.")] = "fast70",
    compare_with: Annotated[str, typer.Option("--compare", help="Comma-separated baseline recipes.")] = "",
    dataset: Dataset = None,
    data: Data = None,
    cache_dir: CacheDir = None,
    seeds: Annotated[int, typer.Option(help="Runs per recipe, seeded 0..N-1.")] = 1,
    epochs: Annotated[int | None, typer.Option(help="Override every recipe's epochs.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the runs (default runs/bench-<time>).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Time-to-accuracy of training recipes, side by side, with this machine's matmul peaks."""
    data_config = DataConfig(**data_values(dataset=dataset, data=data, cache_dir=cache_dir))
    split = [name.strip() for name in recipe.split(",") if name.strip()]
    baselines = [name.strip() for name in compare_with.split(",") if name.strip()]
    for name in [*split, *baselines]:
        recipe_values(name)  # fail on a misspelt name before anything runs
    out = out or Path("runs") / f"bench-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    report = errors.print if as_json else console.print
    summary = bench(split, data_config, out, baselines, seeds, epochs, progress=report)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        for row in summary["across_seeds"]:
            console.print(
                f"{row['recipe']}: accuracy {row['accuracy_mean']:.2%} ± {row['accuracy_std']:.2%}, "
                f"{row['seconds_mean']:.1f} ± {row['seconds_std']:.1f} s over {row['seeds']} seeds"
            )
        console.print(f"wrote {out / 'bench.json'}")


@app.command()
@handles_errors
def models() -> None:
    """List the registered models with their parameter counts at CIFAR-10's input (32x32 RGB, 10 classes)."""
    table = Table("model", "parameters (CIFAR-10)", "min input", "description")
    for spec in MODELS.values():
        count = parameter_count(create_model(spec.name, (3, 32, 32), 10))
        table.add_row(spec.name, f"{count:,}", f"{spec.min_input_size}px", spec.summary)
    console.print(table)


def main() -> None:
    app()
