"""Real faults, not mocks: training processes killed at random moments, then resumed bitwise-exactly."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnnlab.errors import CnnlabError
from cnnlab.recipes import resolve_run_config
from cnnlab.train import fit
from cnnlab.train.checkpoint import CHECKPOINT_FILE, load_checkpoint
from cnnlab.train.progress import LineReporter

RUNS = {
    # the MLP's 3.8M weights make checkpoint writes a large share of its run: kills often land inside one
    "tutorial-mlp": ["--model", "tutorial-mlp", "--epochs", "3"],
    "tutorial-cnn": ["--model", "tutorial-cnn", "--epochs", "10"],
    "fast": ["--recipe", "fast90", "--model", "fast-tiny", "--batch-size", "64", "--epochs", "5"],
}
COMMON = ["--dataset", "digits", "--image-size", "16", "--checkpoint-every", "5", "--seed", "7", "--no-report", "-q"]


def train(out: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "cnnlab", "train", *args]
    command += [] if "--resume" in args else ["--out", str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    finished = {}
    for name, args in RUNS.items():
        out = tmp_path_factory.mktemp("whole") / name
        process = train(out, *args, *COMMON)
        assert process.wait(120) == 0, process.stdout.read()
        finished[name] = weights(out)
    return finished


CASES = [
    ("tutorial-mlp", signal.SIGKILL, 0),
    ("tutorial-mlp", signal.SIGTERM, 1),
    ("tutorial-cnn", signal.SIGKILL, 2),
    ("tutorial-cnn", signal.SIGINT, 3),
    ("fast", signal.SIGKILL, 4),
]


@pytest.mark.parametrize(("name", "signal_number", "seed"), CASES, ids=[f"{n}-{s.name}-{i}" for n, s, i in CASES])
def test_killed_at_a_random_moment_then_resumed_equals_uninterrupted(
    uninterrupted, tmp_path, name, signal_number, seed
):
    out = tmp_path / "run"
    process = train(out, *RUNS[name], *COMMON)
    deadline = time.time() + 60
    while not (out / CHECKPOINT_FILE).exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 0.3))  # seeded: the same moments on every run
    process.send_signal(signal_number)
    code = process.wait(60)
    output = process.stdout.read()
    if signal_number == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 128 + signal_number and "cnnlab train --resume" in output, output
    resumed = train(out, "--resume", str(out), "--no-report", "-q")
    assert resumed.wait(120) == 0, resumed.stdout.read()
    assert not list(out.glob(".*.tmp")), "stray temporaries are cleaned on resume"
    final = weights(out)
    assert all(torch.equal(final[key], uninterrupted[name][key]) for key in final)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    config = resolve_run_config(
        {
            "data": {"dataset": "digits"},
            "train": {"model": "tutorial-mlp", "lr": 1e6, "checkpoint_every": 1, "epochs": 2},
            "out": str(tmp_path / "run"),
        }
    )
    with pytest.raises(CnnlabError, match=r"non-finite (loss|weights) at epoch 1 step \d+"):
        fit(config, reporter=LineReporter())
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())
    assert not (tmp_path / "run" / "model.safetensors").exists()
