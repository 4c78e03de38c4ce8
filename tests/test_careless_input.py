"""Careless and hostile input to the commands, each answered in cnnlab's own line: a doctor setting out of
range, a port in use, a metrics log a crash cut short, more calibration images than there are."""

from __future__ import annotations

import json
import logging
import shutil
import socket

import pytest
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import DoctorConfig
from cnnlab.data import DataConfig, load_dataset
from cnnlab.doctor import examine
from cnnlab.errors import ConfigError
from cnnlab.quantize import Int8Settings, calibration_sample
from tests.conftest import free_port

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [("--folds", "1", "--folds must be at least 2, not 1"), ("--folds", "0", "--folds must be at least 2, not 0")],
)
def test_a_doctor_setting_out_of_range_is_refused_in_one_line_before_the_data_is_read(tmp_path, flag, value, said):
    result = invoke("doctor", "--data", tmp_path / "not-read", flag, value, "--out", tmp_path / "doctor")
    assert result.exit_code == 2, result.output
    assert result.output == f"error: {said}\n"
    assert not (tmp_path / "doctor").exists()


def test_the_library_doctor_checks_its_settings_too():
    digits = load_dataset(DataConfig(dataset="digits"))
    with pytest.raises(ConfigError, match=r"^doctor\.folds must be at least 2, not 1$"):
        examine(digits, DoctorConfig(folds=1))


def test_serve_on_a_port_in_use_says_so_in_one_line_before_loading_the_model(tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        # A folder that is no model: had the model been loaded first, the error would be about it.
        result = invoke("serve", tmp_path, "--port", port)
    assert result.exit_code == 2, result.output
    assert result.output == f"error: port {port} on 127.0.0.1 is in use; choose another with --port\n"


def test_runs_lists_a_run_whose_metrics_log_ends_in_a_half_written_line(trained_run, tmp_path):
    run = tmp_path / "runs" / "cut"
    shutil.copytree(trained_run, run)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 3, "train_loss": 0.4')  # a crash mid-append
    result = invoke("runs", tmp_path / "runs", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["name"] == "cut" and row["epochs"] == 2, row
    assert "warning" not in result.output


def test_runs_still_refuses_a_metrics_log_broken_before_its_last_line(trained_run, tmp_path):
    run = tmp_path / "runs" / "broken"
    shutil.copytree(trained_run, run)
    metrics = run / "metrics.jsonl"
    first, second = metrics.read_text().splitlines()
    metrics.write_text(f"{first[:20]}\n{second}\n")
    result = invoke("runs", tmp_path / "runs", "--json")
    assert json.loads(result.stdout) == [] and "not read as a run" in result.output


def test_int8_calibration_beyond_the_training_split_says_so(caplog):
    train = load_dataset(DataConfig(dataset="digits")).train
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        chosen = calibration_sample(train, Int8Settings(calibration_images=99_999_999))
    assert list(chosen) == list(range(len(train)))  # all of them, once each
    assert f"calibrating on all {len(train):,} training images: 99,999,999 were asked" in caplog.text
    caplog.clear()
    assert len(calibration_sample(train, Int8Settings(calibration_images=64))) == 64 and not caplog.text
