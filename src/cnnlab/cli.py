"""The `cnnlab` command: a thin layer that parses flags and calls the library."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shlex
import sys
import tempfile
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cnnlab.bench import bench
from cnnlab.compare import TABLE_FILES, compare, comparison_markdown
from cnnlab.config import DataConfig, RunConfig, TrainConfig, load_toml, to_toml
from cnnlab.data import images as image_io
from cnnlab.data import load_dataset
from cnnlab.errors import CnnlabError
from cnnlab.evaluate import REPORT_FILE, Evaluation, evaluate_saved, test_split_for
from cnnlab.explain import explain as explain_image
from cnnlab.explain import write_explanation
from cnnlab.export import export_onnx, require
from cnnlab.models import MODELS, create_model, load_model, model_spec, parameter_count
from cnnlab.models.files import model_folder
from cnnlab.predict import expand_paths, load_classifier, predict_files
from cnnlab.recipes import recipe_values, resolve_run_config
from cnnlab.report import write_data_overview, write_run_report
from cnnlab.train import fit, resume
from cnnlab.train.distributed import launch
from cnnlab.train.fit import default_run_dir
from cnnlab.train.progress import default_reporter

app = typer.Typer(
    help="Train, evaluate and use convolutional image classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# markup=False: messages carry paths and library errors, whose square brackets are not rich markup.
console = Console(highlight=False, soft_wrap=True, markup=False)
errors = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

# Exit codes: 1 when some inputs failed (predict) or the reader of our output went away (click's own
# handling of EPIPE), 2 for a usage or input error, 74 when a file system operation fails (WriteError's
# code), 130 when interrupted.
EXIT_PARTIAL, EXIT_ERROR, EXIT_IO, EXIT_INTERRUPTED = 1, 2, 74, 130

Dataset = Annotated[str | None, typer.Option("--dataset", help="Named dataset: digits, cifar10, cifar100.")]
Data = Annotated[str | None, typer.Option("--data", help="Image folder, .tar.gz/.zip of one, or a CIFAR archive.")]
ImageSize = Annotated[int | None, typer.Option(help="Resize images to this many pixels per side.")]
ValFraction = Annotated[float | None, typer.Option(help="Share of train held out for validation.")]
TestFraction = Annotated[float | None, typer.Option(help="Test share when the data has no test split.")]
SplitSeed = Annotated[int | None, typer.Option(help="Seed of the validation/test splits.")]
CacheDir = Annotated[str | None, typer.Option(help="Cache folder (default $CNNLAB_CACHE or ~/.cache/cnnlab).")]
Strict = Annotated[bool | None, typer.Option("--strict", help="Unreadable images are an error.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="One line per epoch instead of a progress bar.")]
Epochs = Annotated[float | None, typer.Option(help="Number of epochs; a fraction trains part of the last.")]
ModelPath = Annotated[Path, typer.Argument(help="A run folder, or its model.json / model.safetensors.")]
AnyModelPath = Annotated[Path, typer.Argument(help="A run folder, its model files, or an exported .onnx file.")]


def handles_errors(command):
    """Turn cnnlab's input errors into one line on stderr and a distinct exit code; no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CnnlabError as error:
            errors.print(f"error: {error}")
            raise typer.Exit(getattr(error, "exit_code", EXIT_ERROR)) from None
        except KeyboardInterrupt:
            errors.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            raise  # click ends quietly with exit code 1: `cnnlab predict ... | head` closed our output
        except OSError as error:  # a file system fault the library did not foresee: still one line
            where = f"{error.filename}: " if error.filename else ""
            errors.print(f"error: {where}{error.strerror or error}")
            raise typer.Exit(EXIT_IO) from None

    return wrapper


@app.callback()
def setup() -> None:
    """Library warnings (skipped files and the like) go to stderr as plain lines."""
    logger = logging.getLogger("cnnlab")
    for previous in [handler for handler in logger.handlers if handler.name == "cnnlab-cli"]:
        logger.removeHandler(previous)
    handler = logging.StreamHandler(sys.stderr)  # this invocation's stderr: a test runner swaps it per call
    handler.name = "cnnlab-cli"
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False


DATA_KEYS = frozenset(field.name for field in dataclasses.fields(DataConfig))
TRAIN_KEYS = frozenset(field.name for field in dataclasses.fields(TrainConfig))


def given(flags: dict[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    """The flags among `keys` that were given on the command line (a command passes its locals())."""
    return {key: value for key, value in flags.items() if key in keys and value is not None}


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
    optimizer: Annotated[str | None, typer.Option(help="sgd, adam or muon.")] = None,
    momentum: Annotated[float | None, typer.Option(help="SGD momentum.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="L2 weight decay.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of weight init and data order.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    nesterov: Annotated[bool | None, typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum.")] = None,
    adam_eps: Annotated[float | None, typer.Option(help="Adam epsilon.")] = None,
    muon_lr: Annotated[float | None, typer.Option(help="Muon: the conv filters' learning rate.")] = None,
    muon_momentum: Annotated[float | None, typer.Option(help="Muon: the conv filters' momentum.")] = None,
    schedule: Annotated[str | None, typer.Option(help="constant or triangle.")] = None,
    peak_fraction: Annotated[float | None, typer.Option(help="Triangle: share of steps to the peak.")] = None,
    lr_start: Annotated[float | None, typer.Option(help="Triangle: first lr as a share of --lr.")] = None,
    lr_end: Annotated[float | None, typer.Option(help="Triangle: last lr as a share of --lr.")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing of the loss.")] = None,
    bias_lr_scale: Annotated[float | None, typer.Option(help="BatchNorm bias learning-rate multiplier.")] = None,
    lookahead: Annotated[bool | None, typer.Option("--lookahead/--no-lookahead", help="Weight averaging.")] = None,
    whiten_bias_epochs: Annotated[int | None, typer.Option(help="Epochs the whitening bias learns.")] = None,
    normalize: Annotated[str | None, typer.Option(help="unit or standardize.")] = None,
    flip: Annotated[str | None, typer.Option(help="none, random or alternating.")] = None,
    translate: Annotated[int | None, typer.Option(help="Random shift in pixels.")] = None,
    tta: Annotated[str | None, typer.Option(help="none, flip or flip-translate.")] = None,
    precision: Annotated[
        str | None, typer.Option(help="auto (bf16 where native, else fp32), fp32 or bf16 (autocast).")
    ] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the training forward.")
    ] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Also checkpoint every N steps.")] = None,
    sync_bn: Annotated[
        bool | None, typer.Option("--sync-bn/--no-sync-bn", help="Distributed: BatchNorm over the global batch.")
    ] = None,
    out: Annotated[str | None, typer.Option(help="Run folder (default runs/<model>-<data>-<time>).")] = None,
    resume_dir: Annotated[Path | None, typer.Option("--resume", help="Continue this run folder.")] = None,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write report.html at the end.")] = True,
    nproc: Annotated[int, typer.Option(help="Train in this many processes on this machine (torchrun, DDP).")] = 1,
    max_restarts: Annotated[int, typer.Option(help="With --nproc: restarts from the last checkpoint.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Train a model; writes config, metrics, checkpoints and the final model into a run folder."""
    reporter = default_reporter(quiet)
    data_flags = given(locals(), DATA_KEYS)
    train_flags = given(locals(), TRAIN_KEYS)
    if nproc < 1 or max_restarts < 0 or (max_restarts and nproc == 1):
        raise CnnlabError("--nproc must be at least 1, and --max-restarts (0 or more) goes with --nproc 2 or more")
    if resume_dir is not None:
        conflicting = sorted(
            {*data_flags, *(set(train_flags) - {"epochs"})}
            | ({"config", "out"} & {name for name, value in (("config", config), ("out", out)) if value is not None})
        )
        if conflicting:
            raise CnnlabError(
                f"--resume continues a run as configured; it takes only --epochs, not: {', '.join(conflicting)}"
            )
    worker_flags = [*(["-q"] if quiet else []), *([] if report else ["--no-report"])]
    if resume_dir is not None and nproc > 1:
        epochs_flag = ["--epochs", str(epochs)] if epochs is not None else []
        worker_args = ["train", "--resume", str(resume_dir), *epochs_flag, *worker_flags]
        launch(worker_args, nproc, max_restarts, str(resume_dir))
        return
    if resume_dir is not None:
        result = resume(resume_dir, epochs=epochs, reporter=reporter)
    else:
        file_values = load_toml(config) if config else {}
        flags = {"data": data_flags, "train": train_flags, **({"out": out} if out else {})}
        run_config = resolve_run_config(file_values, flags)
        if nproc > 1:
            _launch_new_run(run_config, worker_flags, nproc, max_restarts)
            return
        result = fit(run_config, reporter=reporter)
    if not result.is_main:
        return
    final = result.history[-1] if result.history else {}
    console.print(f"run folder: {result.run_dir}  {delivered_accuracy(final)}")
    if report:
        console.print(f"report: {write_run_report(result.run_dir, result.dataset.test)}")


def delivered_accuracy(metrics: dict[str, Any]) -> str:
    """The test accuracy the model delivers (with the recipe's TTA, as evaluate, predict and serve use it), and the
    plain one beside it."""
    plain = metrics.get("test_acc", float("nan"))
    if "test_acc_tta" not in metrics:
        return f"test accuracy: {plain:.4f}"
    return f"test accuracy: {metrics['test_acc_tta']:.4f} (with TTA; {plain:.4f} without)"


def _launch_new_run(run_config: RunConfig, worker_flags: list[str], nproc: int, max_restarts: int) -> None:
    """Train `run_config` in `nproc` processes. Its run folder is fixed first, so that processes torchrun
    restarts find the run to resume; the workers read the resolved config from a temporary file."""
    if not run_config.out:
        run_config.out = str(default_run_dir(run_config))
        Path(run_config.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        config_file = Path(folder) / "config.toml"
        config_file.write_text(to_toml(run_config))
        launch(["train", "--config", str(config_file), *worker_flags], nproc, max_restarts, run_config.out)


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
    flags = given(locals(), DATA_KEYS)
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
    model: AnyModelPath,
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    top_k: Annotated[int, typer.Option(help="How many classes to show per image.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the predictions as JSON.")] = False,
) -> None:
    """Predict the class of image files; exits 1 when any file could not be read."""
    files, skipped = expand_paths(paths)
    if skipped:
        logging.getLogger("cnnlab").warning(
            "skipped %d entries of the folders given: %s", len(skipped), "; ".join(skipped[:3])
        )
    predictions = predict_files(load_classifier(model), files, top_k)
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
    epochs: Epochs = None,
    out: Annotated[Path | None, typer.Option(help="Folder (default runs/compare-<data>-<time>).")] = None,
    quiet: Quiet = False,
) -> None:
    """Train each model with its recipe on one dataset and print a comparison table."""
    data_config = DataConfig(**given(locals(), DATA_KEYS))
    names = [name.strip() for name in models.split(",") if name.strip()]
    for name in names:
        model_spec(name)  # fail on a misspelt name before any training starts
    out = out or Path("runs") / f"compare-{data_config.label}-{datetime.now():%Y%m%d-%H%M%S}"
    overrides = {"epochs": epochs} if epochs is not None else {}
    rows = compare(names, data_config, out, overrides, default_reporter(quiet))
    console.print(comparison_markdown(rows, data_config.label))
    console.print(f"wrote {', '.join(str(out / name) for name in TABLE_FILES)}")


@app.command()
@handles_errors
def report(
    run: Annotated[Path, typer.Argument(help="A finished run folder.")],
    dataset: Dataset = None,
    data: Data = None,
    cache_dir: CacheDir = None,
) -> None:
    """Write a run's figures and a self-contained report.html into its folder."""
    if not run.is_dir():
        raise CnnlabError(f"{run}: no such run folder")
    split = None
    if dataset or data:
        split = test_split_for(load_model(run), DataConfig(**given(locals(), DATA_KEYS)))
    console.print(f"wrote {write_run_report(run, split)}")


@app.command()
@handles_errors
def explain(
    model: ModelPath,
    image: Annotated[Path, typer.Argument(help="The image file to explain.")],
    class_name: Annotated[
        str | None, typer.Option("--class", help="Explain this class (default: the predicted one).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the figures.")] = Path("explain"),
) -> None:
    """Grad-CAM heat map, feature maps of every conv layer and the first layer's filters for one image."""
    trained = load_model(model)
    pixels = image_io.decode(image, str(image), trained.info.image_size, trained.info.channels)
    explanation = explain_image(trained, pixels, class_name)
    paths = write_explanation(explanation, pixels, out, image.name)
    console.print(
        f"{image}: predicted {explanation.predicted}, explained {explanation.target} "
        f"({explanation.probabilities[explanation.target]:.3f})"
    )
    console.print(f"wrote {len(paths)} figures into {out}")


data_app = typer.Typer(help="Look at a dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("show")
@handles_errors
def data_show(
    out: Annotated[Path, typer.Option(help="PNG file for the sample grid; the counts chart goes beside it.")],
    dataset: Dataset = None,
    data: Data = None,
    image_size: ImageSize = None,
    val_fraction: ValFraction = None,
    test_fraction: TestFraction = None,
    split_seed: SplitSeed = None,
    cache_dir: CacheDir = None,
    strict: Strict = None,
    per_class: Annotated[int, typer.Option(help="Samples shown per class.")] = 8,
) -> None:
    """A labelled grid of sample images per class, and the class counts of each split."""
    config = DataConfig(**given(locals(), DATA_KEYS))
    loaded = load_dataset(config)
    grid, chart, counts = write_data_overview(loaded, out, per_class)
    table = Table("class", *counts, title=f"{loaded.name}: images per class")
    for i, name in enumerate(loaded.classes):
        table.add_row(name, *(f"{values[i]:,}" for values in counts.values()))
    table.add_row("total", *(f"{sum(values):,}" for values in counts.values()))
    console.print(table)
    console.print(f"wrote {grid} and {chart}")


@app.command()
@handles_errors
def serve(
    model: AnyModelPath,
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body accepted.")] = 10.0,
) -> None:
    """A web page and HTTP API for predictions (POST /predict, GET /model, GET /health, /docs)."""
    require("fastapi", "serve")
    uvicorn = require("uvicorn", "serve")
    from cnnlab.serve.app import ServeConfig, create_app  # needs the serve extra

    app = create_app(load_classifier(model), ServeConfig(max_upload_mb=max_upload_mb))
    console.print(f"serving {model} on http://{host}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level="warning")


@app.command(name="export")
@handles_errors
def export_command(
    model: ModelPath,
    export_format: Annotated[str, typer.Option("--format", help="Only onnx for now.")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="Output file (default: model.onnx in the model's folder).")] = None,
) -> None:
    """Export to ONNX (opset 17, dynamic batch) and verify it against PyTorch on 100 test images."""
    if export_format != "onnx":
        raise CnnlabError(f"unknown export format {export_format!r}; supported: onnx")
    trained = load_model(model)
    sample = test_split_for(trained, None).images[:100]
    out = out or model_folder(model) / "model.onnx"
    verification = export_onnx(trained, out, sample)
    console.print(
        f"wrote {out} and {out.with_suffix('.json').name}; verified on {verification.images} test images at batch "
        f"sizes {', '.join(map(str, verification.batch_sizes))}: max |onnxruntime - PyTorch| = "
        f"{verification.max_abs_difference:.1e}"
    )


@app.command(name="bench")
@handles_errors
def bench_command(
    recipe: Annotated[str, typer.Option(help="Comma-separated recipes to time.")] = "fast70",
    compare_with: Annotated[str, typer.Option("--compare", help="Comma-separated baseline recipes.")] = "",
    dataset: Dataset = None,
    data: Data = None,
    cache_dir: CacheDir = None,
    seeds: Annotated[int, typer.Option(help="Runs per recipe, seeded 0..N-1.")] = 1,
    epochs: Epochs = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda, for every run and the peaks.")] = "auto",
    train_args: Annotated[str, typer.Option(help="More `cnnlab train` flags for every run, e.g. '--compile'.")] = "",
    out: Annotated[Path | None, typer.Option(help="Folder for the runs (default runs/bench-<time>).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Time-to-accuracy of training recipes, side by side, with this machine's capability and dense peaks."""
    data_config = DataConfig(**given(locals(), DATA_KEYS))
    split = [name.strip() for name in recipe.split(",") if name.strip()]
    baselines = [name.strip() for name in compare_with.split(",") if name.strip()]
    for name in [*split, *baselines]:
        recipe_values(name)  # fail on a misspelt name before anything runs
    out = out or Path("runs") / f"bench-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    report = errors.print if as_json else console.print
    summary = bench(split, data_config, out, baselines, seeds, epochs, device, shlex.split(train_args), report)
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
    table = Table("model", "parameters (CIFAR-10)", "min input", "default recipe", "description")
    for spec in MODELS.values():
        count = parameter_count(create_model(spec.name, (3, 32, 32), 10))
        table.add_row(spec.name, f"{count:,}", f"{spec.min_input_size}px", spec.default_recipe or "-", spec.summary)
    console.print(table)


def main() -> None:
    app()
