"""A dataset larger than the memory it should need: peak RSS and training speed from disk against from memory.

Builds a synthetic image folder whose decoded cache is several GB (by default 20,000 JPEGs decoded at 224 px:
2.8 GiB of uint8 pixels), decodes it once into the cache, then trains the same short run twice, each in its
own process: `--loader memory` (the train split read into memory) and `--loader disk` (batches read from the
cache file, one step ahead). It prints the cache size, each process's peak RSS and each run's images/s.

    .venv/bin/python benchmarks/larger_than_memory.py [--images 20000] [--size 224] [--steps 40]

Everything goes into a temporary folder (or --work), removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10


def write_images(folder: Path, first: int, count: int, size: int) -> None:
    """JPEGs of smooth random colour fields with a class-dependent tint: small files, quick to decode."""
    rng = np.random.default_rng(first)
    for index in range(first, first + count):
        label = index % CLASSES
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        coarse[..., label % 3] = np.maximum(coarse[..., label % 3], 40 + 20 * label)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
        image.save(folder / f"class{label}" / f"{index:06d}.jpg", quality=85)


def build_folder(folder: Path, images: int, size: int) -> None:
    for label in range(CLASSES):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
    workers = len(os.sched_getaffinity(0))
    share = -(-images // workers)
    with ProcessPoolExecutor(workers) as pool:
        jobs = [
            pool.submit(write_images, folder, start, min(share, images - start), size)
            for start in range(0, images, share)
        ]
        for job in jobs:
            job.result()


def measured(command: list[str]) -> tuple[float, float]:
    """Run `command`; (wall seconds, its peak RSS in MB)."""
    started = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(command)}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=224, help="pixels per side of the photos and the cache")
    parser.add_argument("--steps", type=int, default=40, help="training steps of each run (batch 64)")
    parser.add_argument("--model", default="fast-tiny")
    parser.add_argument("--work", type=Path, help="folder for the photos, cache and runs (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="cnnlab-ltm-"))
    cnnlab = [sys.executable, "-m", "cnnlab"]
    try:
        photos, cache = work / "photos", work / "cache"
        started = time.perf_counter()
        build_folder(photos, args.images, args.size)
        print(f"wrote {args.images:,} JPEGs of {args.size}x{args.size} in {time.perf_counter() - started:.0f}s")
        data = ["--data", str(photos), "--cache-dir", str(cache), "--image-size", str(args.size)]
        seconds, rss = measured([*cnnlab, "data", "show", *data, "--out", str(work / "show.png")])
        (images_file,) = (cache / "decoded").glob("*.images.npy")
        print(
            f"decoded into the cache in {seconds:.0f}s: {images_file.stat().st_size / 2**30:.2f} GiB of pixels, "
            f"peak RSS {rss:,.0f} MB"
        )
        train_images = int(args.images * 0.8)
        epochs = f"{args.steps * 64 / train_images:.6f}"
        results = {}
        for loader in ("memory", "disk"):
            out = work / f"run-{loader}"
            train = ["--model", args.model, "--recipe", "fast70", "--batch-size", "64", "--epochs", epochs]
            command = [*cnnlab, "train", *data, *train, "--loader", loader, "--out", str(out), "-q", "--no-report"]
            seconds, rss = measured(command)
            metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
            results[loader] = (rss, metrics["images_per_s"])
            print(
                f"--loader {loader:6}: peak RSS {rss:6,.0f} MB, {metrics['images_per_s']:5.1f} images/s of "
                f"training ({args.steps} steps), {seconds:.0f}s in all with loading and evaluating"
            )
        (memory_rss, memory_speed), (disk_rss, disk_speed) = results["memory"], results["disk"]
        ratios = f"{disk_rss / memory_rss:.2f}x the peak RSS, {disk_speed / memory_speed:.2f}x the speed"
        print(f"disk against memory: {ratios}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
