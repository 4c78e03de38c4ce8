"""The CLI end to end through typer's runner, on tiny data in tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from tests.conftest import pattern_image, write_image_folder

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_models_lists_every_model_with_its_cifar10_parameter_count():
    result = invoke("models")
    assert result.exit_code == 0
    assert "12,230,010" in result.output and "167,562" in result.output


def test_train_evaluate_predict_on_an_image_folder(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=2, per_class=16, size=12)
    run = tmp_path / "run"
    result = invoke(
        "train", "--model", "tutorial-cnn", "--data", data, "--epochs", "8", "--lr", "0.01", "--out", run, "-q"
    )
    assert result.exit_code == 0, result.output
    assert "epoch 8/8" in result.output and (run / "model.safetensors").is_file()
    assert "epochs = 8" in (run / "config.toml").read_text()

    result = invoke("evaluate", run, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["delivered_accuracy"] >= 0.9 and set(report["per_class"]) == {"class0", "class1"}
    assert json.loads((run / "report.json").read_text())["delivered_accuracy"] == report["delivered_accuracy"]
    assert (run / "confusion_matrix.csv").read_text().splitlines()[0] == "true \\ predicted,class0,class1"

    table = invoke("evaluate", run)
    assert table.exit_code == 0 and "macro avg" in table.output and "precision" in table.output

    images = tmp_path / "inputs"
    images.mkdir()
    Image.fromarray(pattern_image(1, 24, seed=5)).save(images / "good.png")  # other size: resized like training
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (images / "notes.txt").write_text("not an image")
    result = invoke("predict", run, images, "--top-k", "2")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert any(line.startswith(str(images / "good.png")) and "class1" in line for line in lines)
    assert sum("error:" in line for line in lines) == 2 and "Traceback" not in result.output


def test_predict_json_gives_top_k_probabilities(trained_run, tmp_path):
    Image.fromarray(np.full((8, 8), 200, np.uint8), "L").save(tmp_path / "digit.png")
    result = invoke("predict", trained_run, tmp_path / "digit.png", "--json", "--top-k", "3")
    assert result.exit_code == 0, result.output
    [prediction] = json.loads(result.output)
    assert len(prediction["top"]) == 3 and prediction["error"] is None
    probabilities = [p for _, p in prediction["top"]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6


def test_compare_writes_markdown_and_json_tables(tmp_path):
    result = invoke(
        "compare",
        "--models",
        "tutorial-mlp,tutorial-cnn",
        "--dataset",
        "digits",
        "--image-size",
        "12",
        "--epochs",
        "1",
        "--out",
        tmp_path / "cmp",
        "-q",
    )
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [r["model"] for r in table["results"]] == ["tutorial-mlp", "tutorial-cnn"]
    assert all(0 < r["delivered_accuracy"] <= 1 and r["parameters"] > 0 for r in table["results"])
    assert "| tutorial-cnn |" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_errors_are_one_line_without_traceback(tmp_path):
    cases = [
        ("train", "--model", "tutorial-cnn", "--data", tmp_path / "missing", "--out", tmp_path / "r"),
        ("train", "--model", "nope", "--dataset", "digits", "--out", tmp_path / "r2"),
        ("train", "--model", "tutorial-cnn", "--dataset", "digits", "--image-size", "8", "--out", tmp_path / "r3"),
        ("evaluate", tmp_path / "missing-run"),
        ("train", "--resume", tmp_path / "missing-run"),
        ("train", "--resume", tmp_path / "[bold]run[/]"),  # brackets are printed as they are, not as markup
        ("train", "--model", "tutorial-cnn", "--dataset", "digits", "--max-restarts", "1"),
    ]
    for args in cases:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.count("\n") == 1 and result.output.startswith("error: "), result.output
    assert "at least 10x10" in invoke(*cases[2]).output
    assert "[bold]run[/]" in invoke(*cases[5]).output


def test_resume_takes_only_epochs(trained_run):
    result = invoke("train", "--resume", trained_run, "--lr", "0.5")
    assert result.exit_code == 2 and "lr" in result.output


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "cnnlab", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "train" in result.stdout


def test_train_and_evaluate_report_the_same_delivered_accuracy(tmp_path):
    run = tmp_path / "run"
    args = ("--dataset", "digits", "--image-size", "16", "--epochs", "1", "--batch-size", "256", "--out", run)
    trained = invoke("train", "--recipe", "fast70", *args, "-q", "--no-report")
    assert trained.exit_code == 0, trained.output
    line = trained.output.split("test accuracy ")[1].split(")")[0] + ")"
    assert "with flip TTA" in line and "without" in line
    evaluated = json.loads(invoke("evaluate", run, "--json").output)
    share = "" if evaluated["tta_share"] == 1 else f" on the {evaluated['tta_share']:.0%} least sure"
    assert (
        f"{evaluated['delivered_accuracy']:.4f} (with flip TTA{share}; {evaluated['plain_accuracy']:.4f} without)"
        == line
    )
    assert f"test accuracy {line}" in invoke("evaluate", run).output
