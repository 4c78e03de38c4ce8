"""Every CLI command under file-system faults ends in one line, never a traceback, and loses nothing.

The battery: a folder with a symbolic-link loop, a dangling link, a link leading outside it, a FIFO, and
EPS/PDF/PSD/FITS files named as PNGs; a full disk (a 3 MB tmpfs, where this process may mount one, and a
monkeypatched write failure everywhere); a read-only output folder; and a reader that closes our output.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnnlab.atomic import WriteError
from cnnlab.cli import app
from cnnlab.data import images as image_io
from cnnlab.data.walk import walk_files
from tests.conftest import pattern_image, write_image_folder

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def cnnlab(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cnnlab", *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd
    )


def assert_one_line(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """Exit `code`, no traceback anywhere, and exactly one `error:` line holding every fragment."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output and "Exception ignored" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def assert_clean(result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output and "error:" not in output, output


def foreign_files(folder: Path) -> dict[str, Path]:
    """Files whose content is not an accepted image format, each named like one."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(pattern_image(0))
    picture.save(folder / "eps.png", format="EPS")
    picture.save(folder / "pdf.png", format="PDF")
    (folder / "psd.png").write_bytes(b"8BPS\x00\x01" + bytes(20) + b"\x00\x03" + bytes(64))
    (folder / "fits.png").write_bytes(b"SIMPLE  =                    T" + b" " * 50 + b"END" + b" " * 2797)
    return {name: folder / f"{name.lower()}.png" for name in ("EPS", "PDF", "PSD", "FITS")}


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> Path:
    """train/<class>/ and test/<class>/ images with every folder fault of the battery planted among them."""
    root = write_image_folder(tmp_path_factory.mktemp("faulty") / "data", classes=2, per_class=16, size=12)
    cat = root / "train" / "class0"
    (cat / "loop").symlink_to("../..")  # back up to the root: a loop
    (cat / "gone.png").symlink_to(root / "no-such-file.png")  # dangling
    outside = root.parent / "outside.png"
    Image.fromarray(pattern_image(1)).save(outside)
    (cat / "outside.png").symlink_to(outside)  # a real image, but outside the dataset
    (root / "train" / "class1" / "self").symlink_to("self")  # a link to itself
    os.mkfifo(cat / "pipe.png")  # reading it would block forever
    foreign_files(root / "train" / "class1")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, faulty) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    result = cnnlab("train", "--model", "tutorial-cnn", "--data", faulty, "--epochs", "2", "--out", run, "-q")
    assert_clean(result)
    return run


def test_the_walk_skips_loops_links_and_fifos_and_says_why(faulty):
    listing = walk_files(faulty)
    names = {"/".join(found.parts) for found in listing.files}
    assert "train/class0/000.png" in names and not any("loop" in name or "outside" in name for name in names)
    reasons = "\n".join(listing.skipped)
    assert "gone.png: a dangling or looping symbolic link" in reasons
    assert "self: a dangling or looping symbolic link" in reasons
    assert "outside.png: a symbolic link to" in reasons and "outside the folder" in reasons
    assert "loop: a link back to a folder already listed" in reasons
    assert "pipe.png: not a regular file" in reasons
    assert len(listing.skipped) == 5


def test_an_unreadable_folder_or_a_file_that_vanishes_is_skipped(faulty, monkeypatch):
    real_scandir, real_stat = os.scandir, os.stat

    def scandir(path):
        if str(path).endswith("test/class1"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    def stat(path, *args, **kwargs):
        if str(path).endswith("train/class0/003.png"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "stat", stat)
    reasons = "\n".join(walk_files(faulty).skipped)
    assert "test/class1: unreadable folder (Permission denied)" in reasons
    assert "003.png: vanished during the scan (No such file or directory)" in reasons


@pytest.mark.parametrize("name", ["EPS", "PDF", "PSD", "FITS"])
def test_every_decode_refuses_other_formats_by_content_naming_what_it_found(tmp_path, name):
    path = foreign_files(tmp_path)[name]
    with pytest.raises(image_io.ImageError, match=f"refused, a {name} file is not an accepted format"):
        image_io.decode(path, str(path), (12, 12), 3)
    with pytest.raises(image_io.ImageError, match=f"a {name} file"):
        image_io.header(path.read_bytes(), path.name)  # serve's path: the bytes of an upload


def test_a_camera_jpeg_with_a_second_picture_still_opens(tmp_path):
    picture = Image.fromarray(pattern_image(0))
    picture.save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[picture])
    assert image_io.header(tmp_path / "camera.jpg", "camera.jpg").format == "MPO"
    assert image_io.decode(tmp_path / "camera.jpg", "camera.jpg", (6, 6), 3).shape == (6, 6, 3)


def test_training_on_the_faulty_folder_skips_every_fault_in_one_warning(faulty, trained):
    # `trained` trained on it already; train again to read its output
    result = cnnlab("train", "--model", "tutorial-cnn", "--data", faulty, "--epochs", "1", "--no-report", "-q")
    assert_clean(result)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "skipped 9 of" in warnings[0], result.stderr
    strict = cnnlab("train", "--model", "tutorial-cnn", "--data", faulty, "--strict", "--epochs", "1")
    assert_one_line(strict, 2, "(--strict)")


def test_every_command_reading_the_faulty_folder_ends_cleanly(faulty, trained, tmp_path):
    assert_clean(cnnlab("evaluate", trained, "--data", faulty))
    assert_clean(cnnlab("report", trained, "--data", faulty))
    assert_clean(cnnlab("data", "show", "--data", faulty, "--out", tmp_path / "grid.png"))
    assert_clean(
        cnnlab(
            "compare",
            "--models",
            "tutorial-mlp,tutorial-cnn",
            "--data",
            faulty,
            "--epochs",
            "1",
            "--out",
            tmp_path / "compare",
            "-q",
        )
    )
    archive = tmp_path / "faulty.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # links become link members; the FIFO is left out
        tar.add(faulty, arcname="data", filter=lambda member: None if member.isfifo() else member)
    assert_clean(cnnlab("train", "--model", "tutorial-cnn", "--data", archive, "--epochs", "1", "--no-report", "-q"))


def test_predict_names_each_foreign_file_and_explain_refuses_it(faulty, trained, tmp_path):
    result = cnnlab("predict", trained, faulty / "train")
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output
    refused = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(refused) == 4 and all("is not an accepted format" in line for line in refused)
    assert sum(line.startswith("warning: skipped 5 entries") for line in result.stderr.splitlines()) == 1
    assert len(result.stdout.splitlines()) == 32  # every real image predicted
    eps = faulty / "train" / "class1" / "eps.png"
    assert_one_line(cnnlab("explain", trained, eps, "--out", tmp_path / "x"), 2, "a EPS file is not an accepted")


def test_a_closed_pipe_ends_predict_quietly(faulty, trained):
    # 60 times the 32 test images: ~170 KB of lines, more than a pipe holds, so predict outlives head
    folders = " ".join([str(faulty / "test")] * 60)
    pipeline = f"{sys.executable} -m cnnlab predict {trained} {folders} | head -1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, text=True, env=ENV)
    assert len(result.stdout.splitlines()) == 1
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    assert result.returncode != 0  # pipefail: predict says it did not deliver everything


@contextlib.contextmanager
def tmpfs(folder: Path, size: str, read_only: bool = False):
    folder.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN); the monkeypatched test covers it")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_keeps_the_last_checkpoint_and_says_how_to_resume(tmp_path):
    with tmpfs(tmp_path / "small", "3m") as disk:  # one tutorial-cnn checkpoint fits (2 MB), not two
        run = disk / "run"
        result = cnnlab("train", "--model", "tutorial-cnn", "--dataset", "digits", "--epochs", "3", "--out", run, "-q")
        line = assert_one_line(result, 74, f"cannot write {run / 'checkpoint.pt'}: No space left on device")
        assert f"the checkpoint of epoch 1 in {run} is intact" in line and f"cnnlab train --resume {run}" in line
        assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        assert state["epoch"] == 1
        moved = tmp_path / "moved"
        shutil.copytree(run, moved)
    assert_clean(cnnlab("train", "--resume", moved, "--no-report", "-q"))  # where there is room, it goes on
    assert (moved / "model.safetensors").is_file()


def test_a_read_only_folder_is_one_line_for_evaluate_report_and_the_cache(trained, faulty, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        result = cnnlab("evaluate", trained, "--data", faulty, "--cache-dir", read_only / "cache")
        assert_one_line(result, 74, "Read-only file system")
        result = cnnlab("train", "--model", "tutorial-cnn", "--dataset", "digits", "--out", read_only / "run")
        assert_one_line(result, 2, "cannot write the run folder (Read-only file system)")


def test_a_write_failure_in_process_names_the_file_and_the_intact_checkpoint(tmp_path, monkeypatch):
    """The same as the full tmpfs, with the second checkpoint's write failing by monkeypatch."""
    import cnnlab.run_dir as checkpoint_module

    real_write, calls = checkpoint_module.atomic_write, []

    def failing_write(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise WriteError.of(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        real_write(path, data)

    monkeypatch.setattr(checkpoint_module, "atomic_write", failing_write)
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            "tutorial-cnn",
            "--dataset",
            "digits",
            "--image-size",
            "12",
            "--epochs",
            "3",
            "--out",
            str(run),
            "-q",
        ],
    )
    assert (result.exit_code == 74 and result.exception is None) or isinstance(result.exception, SystemExit)
    assert f"cannot write {run / 'checkpoint.pt'}: No space left on device; the checkpoint of epoch 1" in result.output
