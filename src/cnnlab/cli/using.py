"""Commands that use a trained model or look at data: evaluate, predict, report, explain, data show, doctor, serve,
export."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from cnnlab.cli import EXIT_PARTIAL, app, console, errors, handles_errors, print_whole
from cnnlab.cli.flags import DATA_FIELDS, DOCTOR_FIELDS, LABEL_FIELDS, Flags, takes_config
from cnnlab.config import DataConfig, DoctorConfig, check_ranges
from cnnlab.data import images as image_io
from cnnlab.data import load_dataset
from cnnlab.data.cache import cache_root
from cnnlab.doctor import examine
from cnnlab.doctor.report import write_diagnosis
from cnnlab.doctor.stages import Stages
from cnnlab.errors import CnnlabError
from cnnlab.evaluate import Evaluation, dataset_for, evaluate_saved, in_model_format, test_split_for, test_split_of
from cnnlab.explain import explain as explain_image
from cnnlab.explain import write_explanation
from cnnlab.export import export_onnx, require
from cnnlab.models import load_model
from cnnlab.models.files import model_folder
from cnnlab.predict import expand_paths, load_classifier, predict_files
from cnnlab.quantize import Int8Settings, calibration_sample, export_int8
from cnnlab.report import RUNS_HEADER, runs_table_rows, write_data_overview, write_run_report, write_runs_page
from cnnlab.run_dir import RunDir
from cnnlab.serve.listen import listening_socket
from cnnlab.tracking import catalog

ModelPath = Annotated[Path, typer.Argument(help="A run folder, or its model.json / model.safetensors.")]
AnyModelPath = Annotated[Path, typer.Argument(help="A run folder, its model files, or an exported .onnx file.")]
Engine = Annotated[
    str, typer.Option(help="torch, onnx (a run folder's exported model.onnx), or auto: onnx for an .onnx file.")
]
TEST_DATA = ("dataset", "data", *LABEL_FIELDS, "test_fraction", "split_seed", "cache_dir", "strict")


@app.command(name="evaluate")
@handles_errors
@takes_config(data=TEST_DATA)
def evaluate_command(
    flags: Flags,
    model: ModelPath,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Accuracy, loss, per-class precision/recall/F1 and the confusion matrix on a test split."""
    data_config = DataConfig(**flags.data) if flags.data.get("dataset") or flags.data.get("data") else None
    evaluation, folder = evaluate_saved(model, data_config)
    if as_json:
        typer.echo(json.dumps(evaluation.to_dict(), indent=2))
        return
    console.print(report_table(evaluation))
    balanced = evaluation.balanced_accuracy
    console.print(
        f"test {evaluation.scores.describe()}  "
        + ("" if balanced is None else f"balanced accuracy {balanced:.4f}  ")
        + f"loss {evaluation.scores.delivered_loss:.4f}  ({len(evaluation.labels)} images)"
    )
    console.print(f"wrote {folder / RunDir.EVALUATION} and the confusion matrix beside it")


def report_table(evaluation: Evaluation) -> Table:
    """scikit-learn's classification report; a multi-label model's adds each class's average precision and
    threshold, and its micro average."""
    multi = evaluation.multi_label
    extra = ("average precision", "threshold") if multi else ()
    table = Table("class", "precision", "recall", "f1-score", "support", *extra, title="classification report")
    averages = ("micro avg", "macro avg") if multi else ("macro avg", "weighted avg")
    for name in [*evaluation.classes, *averages]:
        row = evaluation.report[name]
        cells = [f"{row[k]:.4f}" for k in ("precision", "recall", "f1-score")] + [f"{row['support']:.0f}"]
        if multi:
            cells += [f"{row[k]:.4f}" if k in row else "-" for k in ("average_precision", "threshold")]
        table.add_row(name, *cells)
    return table


@app.command()
@handles_errors
def predict(
    model: AnyModelPath,
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    top_k: Annotated[int, typer.Option(help="How many classes to show per image.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the predictions as JSON.")] = False,
    engine: Engine = "auto",
) -> None:
    """Predict the class of image files; exits 1 when any file could not be read."""
    files, skipped = expand_paths(paths)
    if skipped:
        logging.getLogger("cnnlab").warning(
            "skipped %d entries of the folders given: %s", len(skipped), "; ".join(skipped[:3])
        )
    predictions = predict_files(load_classifier(model, engine), files, top_k)
    if as_json:
        typer.echo(json.dumps([asdict(p) for p in predictions], indent=2))
    for prediction in predictions:
        if prediction.error:
            errors.print(f"error: {prediction.error}")
        elif not as_json:
            top = "  ".join(f"{name} {p:.3f}" for name, p in prediction.top)
            if prediction.labels is None:
                console.print(f"{prediction.path}  {top}")
            else:  # a multi-label model's answer: the labels at their thresholds
                labels = "  ".join(f"{name} {p:.3f}" for name, p in prediction.labels) or "none"
                console.print(f"{prediction.path}  labels: {labels}  (top: {top})")
    if any(p.error for p in predictions):
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
@handles_errors
@takes_config(data=("dataset", "data", "cache_dir"))
def report(
    flags: Flags,
    run: Annotated[Path, typer.Argument(help="A finished run folder.")],
) -> None:
    """Write a run's figures and a self-contained report.html into its folder."""
    if not run.is_dir():
        raise CnnlabError(f"{run}: no such run folder")
    split = None
    if flags.data.get("dataset") or flags.data.get("data"):
        split = test_split_for(load_model(run), DataConfig(**flags.data))
    written = write_run_report(run, split, own_split=split is None)
    console.print(f"wrote {written.path}: {written.summary}")


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
    pixels = image_io.decode(image, str(image), trained.info.input_shape.size, trained.info.input_shape.channels)
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
@takes_config(data=DATA_FIELDS)
def data_show(
    flags: Flags,
    out: Annotated[Path, typer.Option(help="PNG file for the sample grid; the counts chart goes beside it.")],
    per_class: Annotated[int, typer.Option(help="Samples shown per class.")] = 8,
) -> None:
    """A labelled grid of sample images per class, and the class counts of each split."""
    config = DataConfig(**flags.data)
    loaded = load_dataset(config)
    grid, chart, counts = write_data_overview(loaded, out, per_class)
    table = Table("class", *counts, title=f"{loaded.name}: images per class")
    for i, name in enumerate(loaded.classes):
        table.add_row(name, *(f"{values[i]:,}" for values in counts.values()))
    table.add_row("total", *(f"{sum(values):,}" for values in counts.values()))
    console.print(loaded.summary()[0])
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
    engine: Engine = "auto",
    max_batch: Annotated[
        int, typer.Option(help="Images of concurrent requests classified together; 1: none.", min=1)
    ] = 64,
    batch_window_ms: Annotated[float, typer.Option(help="How long a batch waits for more requests.", min=0)] = 5.0,
    queue: Annotated[int, typer.Option(help="Requests that may wait; beyond them: 503 with Retry-After.", min=1)] = 32,
) -> None:
    """A web page and HTTP API for predictions (POST /predict, GET /model, GET /health, GET /metrics, /docs)."""
    require("fastapi", "serve")
    uvicorn = require("uvicorn", "serve")
    from cnnlab.serve.app import ServeConfig, create_app  # needs the serve extra

    listener = listening_socket(host, port)  # before the model loads: a port in use is said at once
    config = ServeConfig(max_upload_mb=max_upload_mb, max_batch=max_batch, batch_window_ms=batch_window_ms, queue=queue)
    app = create_app(load_classifier(model, engine), config)
    console.print(f"serving {model} on http://{host}:{port}/")
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])


@app.command(name="export")
@handles_errors
def export_command(
    model: ModelPath,
    export_format: Annotated[str, typer.Option("--format", help="Only onnx for now.")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="Output file (default: model.onnx in the model's folder).")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Static INT8 quantization (onnxruntime), calibrated.")] = False,
    calibration: Annotated[int, typer.Option(help="--int8: training images to calibrate on.", min=1)] = 512,
    seed: Annotated[int, typer.Option(help="--int8: seed of the calibration sample.")] = 0,
    max_drop: Annotated[float, typer.Option(help="--int8: most test accuracy it may lose, in points.", min=0)] = 1.0,
) -> None:
    """Export to ONNX (opset 18, dynamic batch, uint8 pixels in) and verify it against PyTorch on 100 test
    images; with --int8, quantize it and score both on the whole test split."""
    if export_format != "onnx":
        raise CnnlabError(f"unknown export format {export_format!r}; supported: onnx")
    trained = load_model(model)
    out = out or model_folder(model) / ("model.int8.onnx" if int8 else "model.onnx")
    if int8:
        settings = Int8Settings(calibration, seed, max_drop / 100)
        dataset = dataset_for(trained, None)
        chosen = calibration_sample(dataset.train, settings)
        images = np.asarray(in_model_format(trained, dataset.train.images[chosen]))
        result = export_int8(trained, out, images, test_split_of(trained, dataset), settings)
        shown = "{:.4f}" if trained.info.multi_label else "{:.2%}"  # mAP as a fraction, accuracy as a percentage
        console.print(
            f"wrote {out} and {out.with_suffix('.json').name}: test {result.metric} {shown.format(result.int8_score)} "
            f"in INT8 against {shown.format(result.fp32_score)} in fp32 (onnxruntime, {result.test_images:,} images, "
            f"{trained.info.inference.tta} TTA; the same {'label set' if trained.info.multi_label else 'top class'} "
            f"on {result.agreement:.2%}); {result.scheme}, "
            f"calibrated on {result.calibration_images} training images"
        )
        return
    sample = test_split_for(trained, None).images[:100]
    verification = export_onnx(trained, out, sample)
    console.print(
        f"wrote {out} and {out.with_suffix('.json').name}; verified on {verification.images} test images at batch "
        f"sizes {', '.join(map(str, verification.batch_sizes))}: max |onnxruntime - PyTorch| = "
        f"{verification.max_abs_difference:.1e}"
    )


@app.command()
@handles_errors
@takes_config(data=tuple(name for name in DATA_FIELDS if name != "exclude"), doctor=DOCTOR_FIELDS)
def doctor(
    flags: Flags,
    out: Annotated[Path, typer.Option(help="Folder for doctor.html, doctor.json and doctor.csv.")] = Path("doctor"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="A line per step instead of progress bars.")] = False,
) -> None:
    """Find what is wrong with a dataset: suspected label errors, copies within and across splits (leakage),
    outliers, odd images and class balance. Nothing on disk is changed; `train --exclude` trains without them."""
    data_config, doctor_config = DataConfig(**flags.data), DoctorConfig(**flags.doctor)
    check_ranges(data_config, "data")  # before the data is read: a wrong setting is said at once
    check_ranges(doctor_config, "doctor")
    dataset = load_dataset(data_config)
    for line in dataset.summary():
        console.print(line)
    stages = Stages(console, bars=None if not quiet else False)
    diagnosis = examine(dataset, doctor_config, cache_root(data_config.cache_dir), stages)
    files = write_diagnosis(diagnosis, dataset, out)
    for line in diagnosis.summary():
        console.print(line)
    console.print(f"wrote {files.html}, {files.json.name} and {files.csv.name}")


@app.command(name="runs")
@handles_errors
def runs_command(
    folder: Annotated[Path, typer.Argument(help="The folder of runs (searched to any depth).")] = Path("runs"),
    sort: Annotated[str, typer.Option(help=f"One of {', '.join(catalog.SORT_KEYS)}.")] = "date",
    model: Annotated[str | None, typer.Option(help="Only runs of models whose name contains this.")] = None,
    data: Annotated[str | None, typer.Option(help="Only runs on data whose name contains this.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the runs as JSON.")] = False,
    page: Annotated[Path | None, typer.Option("--html", help="Also write this page: tables and curves.")] = None,
) -> None:
    """Every run under a folder: model, data, recipe, epochs, delivered accuracy, time, machine kind, status."""
    groups = catalog.by_machine(catalog.select(catalog.find_runs(folder), model, data), sort)
    if as_json:
        typer.echo(json.dumps([run.to_dict() for runs in groups.values() for run in runs], indent=2))
    else:
        if not groups:
            console.print(f"no runs under {folder}")
        for kind, runs in groups.items():
            table = Table(*RUNS_HEADER, title=f"{kind}: {len(runs)} run(s)", title_justify="left")
            for row in runs_table_rows(runs):
                table.add_row(*row)
            print_whole(table)
    if page is not None:
        written = write_runs_page(groups, page, folder)
        (errors if as_json else console).print(f"wrote {written}")
