"""What a run refuses before it starts, and what it keeps while it runs: a folder another process writes, a
finished run's folder, settings out of range, an image size that cannot fit, and early stopping's best epoch
across an interruption."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from cnnlab.errors import CnnlabError, ConfigError
from cnnlab.recipes import resolve_run_config
from cnnlab.run_dir import RunDir
from cnnlab.train import fit, resume
from cnnlab.train.reporter import LineReporter
from tests.test_train import Interrupt, InterruptAfter, digits_config


def test_a_folder_another_process_writes_is_refused_naming_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    refused = rf"another cnnlab run \(pid {os.getpid()}\) is writing this folder"
    # as the first of two runs started into one folder holds it
    with RunDir(out).locked(), pytest.raises(CnnlabError, match=refused):
        fit(digits_config(out, epochs=1), reporter=LineReporter())
    assert not (out / "model.safetensors").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / RunDir.LOCK).write_text("999999\n")  # its flock died with its process; the pid stayed
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        fit(digits_config(out, epochs=1), reporter=LineReporter())
    assert "took over the lock left by pid 999999" in caplog.text
    assert (out / "model.safetensors").exists() and not (out / RunDir.LOCK).exists()


def test_a_finished_run_without_its_checkpoint_is_not_trained_over(tmp_path):
    out = tmp_path / "run"
    fit(digits_config(out, epochs=1), reporter=LineReporter())
    (out / RunDir.CHECKPOINT).unlink()
    with pytest.raises(CnnlabError, match="already holds a finished run"):
        fit(digits_config(out, epochs=1), reporter=LineReporter())


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({"train": {"lr": -1.0}}, "train.lr must be more than 0, not -1"),
        ({"train": {"lr": 0.0}}, "train.lr must be more than 0, not 0"),
        ({"train": {"batch_size": 0}}, "train.batch_size must be at least 1, not 0"),
        ({"train": {"epochs": 0}}, "train.epochs must be more than 0, not 0"),
        ({"train": {"tta_below": 1.5}}, "train.tta_below must be more than 0 and at most 1, not 1.5"),
        ({"data": {"image_size": 0}}, "data.image_size must be at least 1, not 0"),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction must be at least 0 and less than 1, not 1"),
    ],
)
def test_settings_out_of_range_are_refused_before_anything_is_written(tmp_path, layer, message):
    base = {"data": {"dataset": "digits"}, "train": {"model": "tutorial-cnn"}, "out": str(tmp_path / "run")}
    config = resolve_run_config(base, layer)
    with pytest.raises(ConfigError, match=message):
        fit(config, reporter=LineReporter())
    assert not (tmp_path / "run").exists()


def test_an_image_size_whose_first_step_cannot_fit_is_refused_with_the_estimate(tmp_path):
    config = resolve_run_config(
        {"data": {"dataset": "digits", "image_size": 100_000}, "train": {"model": "tutorial-cnn"}, "out": str(tmp_path)}
    )
    with pytest.raises(
        ConfigError,
        match=r"one training step of tutorial-cnn on 32 images of 100000x100000 takes "
        r"at least [\d,.]+ GB, more than the [\d,.]+ GB of memory here",
    ):
        fit(config, reporter=LineReporter())


def test_a_run_interrupted_after_its_best_epoch_still_ends_on_it(tmp_path):
    def config(out):  # a high rate, so that the validation loss wavers and the best epoch is not the last
        return digits_config(out, epochs=6, patience=6, lr=0.02, seed=1)

    whole = fit(config(tmp_path / "whole"), reporter=LineReporter())
    best = whole.model.info.metrics["best_epoch"]
    assert best < 6, "the test needs a best epoch before the last"
    with pytest.raises(Interrupt):  # after the epoch that follows the best: the weights on hand are not the best
        fit(config(tmp_path / "cut"), reporter=InterruptAfter(best + 1))
    resumed = resume(tmp_path / "cut", reporter=LineReporter())
    assert resumed.model.info.metrics["best_epoch"] == best
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
