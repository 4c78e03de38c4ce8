"""Shared fixtures: tiny datasets written by the tests themselves, and a model trained on one."""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cnnlab.config import RunConfig
from cnnlab.recipes import resolve_run_config
from cnnlab.run_dir import RunDir
from cnnlab.train import fit
from cnnlab.train.reporter import LineReporter

SHARED_CIFAR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-png.tar.gz"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # screenshots and load figures, kept by CI
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def browser_page():
    """A page in Debian's headless Chromium driven by Playwright (never a downloaded browser), with the
    console errors it logs collected on `page.errors`. Outside CI, skipped when chromium is absent."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium: .ci/run installs it")
        pytest.skip("Debian's chromium is not installed here; .ci/run installs it")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        page = browser.new_page()
        page.errors = []
        page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        yield page
        browser.close()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache folder; nothing is written to the user's ~/.cache."""
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path_factory.mktemp("cache")))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, timeout: float) -> None:
    """Return once `process` has written its first checkpoint into `run_dir` (or ended, or `timeout` passed)."""
    deadline = time.time() + timeout
    while not (run_dir / RunDir.CHECKPOINT).exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)


def pattern_image(label: int, size: int = 12, seed: int = 0) -> np.ndarray:
    """An RGB image whose class is visible: a bright bar in one of four positions, on noise."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    third = size // 3
    rows = slice(0, size) if label % 2 == 0 else slice(third, 2 * third)
    cols = slice(third, 2 * third) if label % 2 == 0 else slice(0, size)
    image[rows, cols, label // 2 % 3] = 250
    return image


def write_image_folder(
    root: Path, classes: int = 2, per_class: int = 12, size: int = 12, split: bool = True, fmt: str = "png"
) -> Path:
    """train/<class>/*.png and test/<class>/*.png (or only <class>/*) of learnable patterns."""
    for label in range(classes):
        for i in range(per_class):
            subsets = ["train", "test"] if split else [""]
            for subset in subsets:
                folder = root / subset / f"class{label}"
                folder.mkdir(parents=True, exist_ok=True)
                seed = i * 7 + label + (1000 if subset == "test" else 0)
                Image.fromarray(pattern_image(label, size, seed)).save(folder / f"{i:03d}.{fmt}")
    return root


def cifar_batch(n: int, seed: int, classes: int = 10, label_key: bytes = b"labels") -> bytes:
    rng = np.random.default_rng(seed)
    return pickle.dumps(
        {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: [int(x) for x in rng.integers(0, classes, n)],
        }
    )


def write_cifar10_archive(path: Path, per_batch: int = 20) -> Path:
    """A small archive in the official cifar-10-python.tar.gz format."""
    members = {f"data_batch_{i}": cifar_batch(per_batch, i) for i in range(1, 6)}
    members["test_batch"] = cifar_batch(per_batch, 99)
    members["batches.meta"] = pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]})
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tutorial-cnn trained for 2 epochs on digits at 12x12: a real model in seconds."""
    out = tmp_path_factory.mktemp("runs") / "digits-cnn"
    config: RunConfig = resolve_run_config(
        {
            "data": {"dataset": "digits", "image_size": 12},
            "train": {"model": "tutorial-cnn", "epochs": 2},
            "out": str(out),
        }
    )
    fit(config, reporter=LineReporter())
    return out


@contextlib.contextmanager
def served(run: Path) -> Iterator[str]:
    """`cnnlab serve RUN` in its own process on a free port of 127.0.0.1, as a user would run it; yields its URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "serve", str(run), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"cnnlab serve did not start: {process.stdout.read().decode()[-500:]}")
    try:
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over tmp_path/www; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path.endswith("truncated.tar.gz"):
                data = (root / "good.tar.gz").read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])  # the connection closes early
                return
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
