"""Real faults, not mocks: training processes killed at random moments, then resumed bitwise-exactly."""

from __future__ import annotations

import os
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
from cnnlab.run_dir import RunDir
from cnnlab.train import fit
from cnnlab.train.reporter import LineReporter
from tests.conftest import wait_for_checkpoint

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
    ("tutorial-cnn", signal.SIGINT, 3),
    ("fast", signal.SIGKILL, 4),
]


@pytest.mark.parametrize(("name", "signal_number", "seed"), CASES, ids=[f"{n}-{s.name}-{i}" for n, s, i in CASES])
def test_killed_at_a_random_moment_then_resumed_equals_uninterrupted(
    uninterrupted, tmp_path, name, signal_number, seed
):
    out = tmp_path / "run"
    process = train(out, *RUNS[name], *COMMON)
    wait_for_checkpoint(out, process, timeout=60)
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
    state = RunDir(tmp_path / "run").load_checkpoint()
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())
    assert not (tmp_path / "run" / "model.safetensors").exists()


class Payload:
    """A pickle that would create a marker file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_never_runs_in_predict_evaluate_serve_or_resume(trained_run, tmp_path):
    import pickle
    import shutil

    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from cnnlab.cli import app

    marker = tmp_path / "marker"
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    (run / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    torch.save({"model": Payload(marker), "epoch": 1}, run / RunDir.CHECKPOINT)
    runner = CliRunner()
    for args in (["predict", run, image], ["evaluate", run], ["train", "--resume", run], ["serve", run]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    with pytest.raises(CnnlabError):
        from cnnlab.models import load_model
        from cnnlab.serve.app import create_app

        TestClient(create_app(load_model(run)))
    assert not marker.exists()


def test_resume_refuses_a_config_that_changes_the_run_and_names_the_keys(trained_run, tmp_path):
    import shutil

    from cnnlab.train import resume

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    text = (run / "config.toml").read_text().replace('model = "tutorial-cnn"', 'model = "tutorial-mlp"')
    (run / "config.toml").write_text(text)
    with pytest.raises(CnnlabError, match=r"differs from the checkpointed run in train\.model"):
        resume(run)


def png_header(width: int, height: int) -> bytes:
    """A PNG signature, IHDR and an empty IDAT: enough for a header read, with no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"")


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    from cnnlab.data.images import ImageError, decode

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(30_000, 30_000))  # 900 M pixels in 45 bytes
    with pytest.raises(ImageError, match="too many pixels"):
        decode(bomb, str(bomb), (32, 32), 3)


def test_an_animated_image_contributes_its_first_frame(tmp_path):
    import numpy as np
    from PIL import Image

    from cnnlab.data.images import decode

    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    pixels = decode(tmp_path / "anim.gif", "anim", None, 3)
    assert pixels.shape == (8, 8, 3) and np.all(pixels[..., 0] > 200) and np.all(pixels[..., 2] < 50)


def test_weights_for_another_class_count_or_a_truncated_file_are_clear_errors(trained_run, tmp_path):
    import json
    import shutil

    from cnnlab.models import load_model

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    info = json.loads((run / "model.json").read_text())
    info["classes"] = info["classes"][:5]
    (run / "model.json").write_text(json.dumps(info))
    with pytest.raises(CnnlabError, match="weights do not fit tutorial-cnn with 5 classes"):
        load_model(run)
    shutil.copy(trained_run / "model.json", run / "model.json")
    weights_file = run / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    with pytest.raises(CnnlabError, match="not a readable safetensors file"):
        load_model(run)


def test_an_unusable_output_folder_is_refused_before_any_training(tmp_path):
    from typer.testing import CliRunner

    from cnnlab.cli import app

    result = CliRunner().invoke(
        app, ["train", "--dataset", "digits", "--out", str(tmp_path / "missing" / "run"), "--epochs", "1"]
    )
    assert result.exit_code == 2 and "parent does not exist" in result.output
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root ignores permission bits; a file in the way still blocks
        locked = tmp_path / "a-file"
        locked.write_text("")
    result = CliRunner().invoke(app, ["train", "--dataset", "digits", "--out", str(locked / "run"), "--epochs", "1"])
    assert result.exit_code == 2 and result.output.startswith("error: ")
