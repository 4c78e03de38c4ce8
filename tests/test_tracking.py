"""Runs at a glance (`cnnlab runs`), TensorBoard event files and MLflow runs read back with each tool's own reader."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cnnlab import progress
from cnnlab.cli import app
from cnnlab.recipes import resolve_run_config
from cnnlab.run_dir import RunDir
from cnnlab.train import fit
from cnnlab.train.reporter import LineReporter
from tests.conftest import free_port, wait_for_checkpoint

runner = CliRunner()
TINY = ["--dataset", "digits", "--image-size", "12", "-q"]


def train(out: Path, *flags: str) -> None:
    result = runner.invoke(app, ["train", *TINY, "--out", str(out), *flags])
    assert result.exit_code == 0, result.output


def train_in_background(out: Path, epochs: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "cnnlab",
        "train",
        *TINY,
        "--model",
        "tutorial-mlp",
        "--epochs",
        str(epochs),
        "--out",
        str(out),
        "--no-report",
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_runs_lists_every_run_with_its_status_and_keeps_machine_kinds_apart(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    train(runs / "cnn", "--model", "tutorial-cnn", "--epochs", "2")
    train(runs / "mlp", "--model", "tutorial-mlp", "--epochs", "1")
    (runs / "compare").mkdir()
    train(runs / "compare" / "cnn-elsewhere", "--model", "tutorial-cnn", "--epochs", "1")
    # A run copied from another machine: its sessions say so.
    sessions = RunDir(runs / "compare" / "cnn-elsewhere") / RunDir.SESSIONS
    line = json.loads(sessions.read_text())
    sessions.write_text(json.dumps({**line, "machine_kind": "NVIDIA H100 80GB HBM3"}) + "\n")
    stopped = train_in_background(runs / "stopped", 10_000)
    wait_for_checkpoint(runs / "stopped", stopped, timeout=60)
    stopped.send_signal(signal.SIGINT)
    assert stopped.wait(60) == 128 + signal.SIGINT, stopped.stdout.read()
    running = train_in_background(runs / "running", 10_000)
    try:
        wait_for_checkpoint(runs / "running", running, timeout=60)
        listed = runner.invoke(app, ["runs", str(runs), "--sort", "accuracy", "--json"])
        page = runner.invoke(app, ["runs", str(runs), "--html", str(tmp_path / "runs.html")])
    finally:
        running.send_signal(signal.SIGINT)
        running.wait(60)
    assert listed.exit_code == 0 and page.exit_code == 0, listed.output + page.output
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert set(rows) == {"cnn", "mlp", "compare/cnn-elsewhere", "stopped", "running"}
    assert rows["running"]["status"] == "running" and rows["stopped"]["status"] == "stopped"
    assert all(rows[name]["status"] == "finished" for name in ("cnn", "mlp", "compare/cnn-elsewhere"))
    assert rows["cnn"]["epochs"] == 2 and rows["cnn"]["epochs_planned"] == 2 and rows["stopped"]["epochs"] >= 1
    recorded = json.loads((runs / "cnn" / RunDir.METRICS).read_text().splitlines()[-1])
    assert rows["cnn"]["delivered_accuracy"] == pytest.approx(recorded["test_delivered_accuracy"])
    assert rows["cnn"]["machine_kind"] != "NVIDIA H100 80GB HBM3" == rows["compare/cnn-elsewhere"]["machine_kind"]
    # Sorted by accuracy within each machine kind, the kind with the most runs first.
    here = [row for row in json.loads(listed.stdout) if row["machine_kind"] == rows["cnn"]["machine_kind"]]
    assert [row["name"] for row in json.loads(listed.stdout)][: len(here)] == [row["name"] for row in here]
    scored = [row["delivered_accuracy"] for row in here if row["delivered_accuracy"] is not None]
    assert scored == sorted(scored, reverse=True)
    assert "NVIDIA H100 80GB HBM3: 1 run(s)" in page.stdout and "running" in page.stdout
    html = (tmp_path / "runs.html").read_text()
    assert html.count("<table") == 2 and html.count('src="data:image/png;base64,') == 2
    only = runner.invoke(app, ["runs", str(runs), "--model", "mlp", "--json"])
    assert {row["name"] for row in json.loads(only.stdout)} == {"mlp", "stopped", "running"}


def test_runs_refuses_a_missing_folder_and_an_unknown_sort_in_one_line(tmp_path):
    missing = runner.invoke(app, ["runs", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no such folder of runs" in missing.output
    (tmp_path / "empty").mkdir()
    unknown = runner.invoke(app, ["runs", str(tmp_path / "empty"), "--sort", "colour"])
    assert unknown.exit_code == 2 and "--sort colour" in unknown.output


def test_tensorboard_event_files_hold_steps_epochs_images_and_hyperparameters(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(out, "--model", "tutorial-cnn", "--epochs", "2", "--batch-size", "64", "--log", "tensorboard")
    events = EventAccumulator(str(out / RunDir.TENSORBOARD), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    history = [json.loads(line) for line in (out / RunDir.METRICS).read_text().splitlines()]
    steps = events.Scalars("step/loss")
    assert [event.step for event in steps] == list(range(1, 2 * 23 + 1))  # 1,437 images at batch 64: 23 steps
    assert [event.step for event in events.Scalars("step/lr")] == [event.step for event in steps]
    assert [event.value for event in events.Scalars("epoch/test_plain_accuracy")] == pytest.approx(
        [m["test_plain_accuracy"] for m in history]
    )
    assert {"confusion matrix", "sample predictions"} <= set(events.Tags()["images"])
    image = events.Images("confusion matrix")[0]
    assert image.width > 300 and image.height > 200
    final = events.Scalars("final/test_delivered_accuracy")[0].value
    assert final == pytest.approx(history[-1]["test_delivered_accuracy"])
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    assert "tutorial-cnn" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on localhost, with a SQLite store and its own artifact folder."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination",
        str(tmp_path / "artifacts"),
    ]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115  # the server's, closed below
    # In a session of its own: the server runs its workers as children, and they all go with the group.
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(how: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, how)
        server.wait(30)

    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield uri, stop
    stop(signal.SIGTERM)
    log.close()


def test_mlflow_logs_params_metrics_tags_and_files_to_a_real_server(tmp_path, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri, _ = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "run"
    train(out, "--model", "tutorial-cnn", "--epochs", "2", "--log", "mlflow")
    run_id = json.loads((out / RunDir.TRACKING).read_text())["mlflow"]["run_id"]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    history = [json.loads(line) for line in (out / RunDir.METRICS).read_text().splitlines()]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.model"] == "tutorial-cnn" and run.data.params["train.optim.epochs"] == "2.0"
    assert run.data.tags["precision"] == history[0]["precision"] and run.data.tags["machine_kind"]
    logged = client.get_metric_history(run_id, "test_plain_accuracy")
    assert [m.step for m in logged] == [m["epoch"] for m in history]
    assert [m.value for m in logged] == pytest.approx([m["test_plain_accuracy"] for m in history])
    assert run.data.metrics["final_test_delivered_accuracy"] == pytest.approx(history[-1]["test_delivered_accuracy"])
    assert len(client.get_metric_history(run_id, "step_loss")) == 2 * 45  # 1,437 images at batch 32
    files = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert {"model.safetensors", "model.json", "report.html", "figures"} <= files
    figures = {artifact.path for artifact in client.list_artifacts(run_id, "figures")}
    assert "figures/confusion_matrix.png" in figures


def test_an_mlflow_server_gone_mid_run_costs_a_warning_not_the_run(tmp_path, mlflow_server, monkeypatch, caplog):
    uri, stop = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    class KillsTheServer(LineReporter):
        def epoch_done(self, metrics):
            super().epoch_done(metrics)
            if metrics["epoch"] == 1:
                stop(signal.SIGKILL)

    config = resolve_run_config(
        {
            "data": {"dataset": "digits", "image_size": 12},
            "train": {"model": "tutorial-cnn", "epochs": 3, "log": "mlflow"},
            "out": str(tmp_path / "run"),
        }
    )
    logger = logging.getLogger("cnnlab")  # the CLI's tests leave it unpropagated: caplog listens on it directly
    logger.addHandler(caplog.handler)
    try:
        result = fit(config, reporter=KillsTheServer())
    finally:
        logger.removeHandler(caplog.handler)
    assert len(result.history) == 3 and (tmp_path / "run" / RunDir.WEIGHTS).is_file()
    warnings = [r.getMessage() for r in caplog.records if r.name == "cnnlab"]
    assert len(warnings) == 1 and warnings[0].startswith("mlflow: ") and "goes on without mlflow" in warnings[0]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_long_steps_show_a_bar_with_time_left_on_a_terminal_and_plain_lines_elsewhere(monkeypatch):
    monkeypatch.setattr(progress, "LINE_AFTER_S", 0.0)
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    with progress.step("decoding", 10) as advance:
        advance(10)
    assert "decoding" in screen.getvalue() and "left" in screen.getvalue()
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    with progress.plain_lines(), progress.step("decoding", 10) as advance:
        advance(10)
    assert re.fullmatch(r"decoding: 10 images in \d+\.\ds\n", quiet.getvalue())
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    assert sum(len(batch) for batch in progress.tracked([torch.zeros(4), torch.zeros(3)], 7, "evaluating")) == 7
    assert re.fullmatch(r"evaluating: 7 images in \d+\.\ds\n", log.getvalue())
