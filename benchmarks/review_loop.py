"""The review loop end to end: flipped labels, the doctor, a person (a Playwright script in Debian's Chromium)
fixing what the labelling page's review queue shows, and training before and after.

    PYTHONPATH=src python benchmarks/review_loop.py --data ../shared/data/cifar10-png.tar.gz --work /tmp/review

The archive (CIFAR-10 png's layout, train/<class>/*.png and test/<class>/*.png) is extracted into WORK/images and
its labels written to WORK/labels.csv (path,label,split) with a seeded `share` of the training labels flipped, each
to a class drawn uniformly among the others. `cnnlab doctor` examines it; `cnnlab label --doctor` serves the
page; the script plays a person who knows the true labels: for each suspected label error the review queue shows,
it presses the true class's key when the shown label is wrong and `k` (keep) when it is right, and moves past
copies with the arrow key. The label file must then differ from the flipped one by exactly those corrections.
Then `cnnlab train --labels` on the flipped and the corrected files (the same recipe, seeds 0, 1, 2) and their test
accuracy. Prints every figure; steps already done in WORK (extraction, the doctor, the trainings) are reused.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import numpy as np

KEYS = "1234567890qwtyuiopasdfhjlcvbm"  # the page's class keys, in class order


def extracted(archive: Path, work: Path) -> Path:
    images = work / "images"
    if not (images / "train").is_dir():
        with tarfile.open(archive) as tar:
            tar.extractall(images, filter="data")
    return images


def flipped_labels(images: Path, out: Path, share: float, seed: int) -> dict[str, str]:
    """Write `out` with `share` of the training labels flipped; the true label of each image."""
    truth = {str(path.relative_to(images)): path.parent.name for path in sorted(images.glob("*/*/*.png"))}
    classes = sorted({label for label in truth.values()})
    train = [path for path in truth if path.startswith("train/")]
    rng = np.random.default_rng(seed)
    flipped = set(rng.choice(train, round(share * len(train)), replace=False).tolist())
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "split"])
        for path, label in truth.items():
            if path in flipped:
                label = classes[(classes.index(label) + rng.integers(1, len(classes))) % len(classes)]
            writer.writerow([path, label, path.split("/")[0]])
    print(f"{len(flipped):,} of {len(train):,} training labels flipped ({share:.0%}, seed {seed})")
    return truth


def read_labels(path: Path) -> dict[str, str]:
    with open(path, newline="") as handle:
        return {row["path"]: row["label"] for row in csv.DictReader(handle) if row.get("excluded", "0") != "1"}


def cnnlab(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cnnlab", *args], check=True)


@contextlib.contextmanager
def label_page(images: Path, labels: Path, doctor: Path, port: int):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cnnlab",
            "label",
            str(images),
            "--labels",
            str(labels),
            "--doctor",
            str(doctor),
            "--port",
            str(port),
        ]
    )
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    while True:
        with contextlib.suppress(httpx.TransportError):
            if "label next" in httpx.get(f"{url}/api/state", timeout=2).json()["status"]:
                break
        if process.poll() is not None:
            raise SystemExit("cnnlab label ended")
        time.sleep(1)
    print(f"the page was ready in {time.perf_counter() - started:.0f} s")
    httpx.post(f"{url}/api/retrain?auto=false")  # reviewing needs no retraining
    try:
        yield url
    finally:
        process.terminate()
        process.wait(30)


def review(url: str, truth: dict[str, str], classes: list[str], limit: int) -> tuple[dict[str, str], int, float]:
    """Play the person; the corrections made, the label findings seen and the seconds taken."""
    from playwright.sync_api import sync_playwright

    corrections, seen, number = {}, 0, 0
    started = time.perf_counter()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page()
        page.on("dialog", lambda dialog: dialog.accept("reviewer"))
        page.goto(url)
        page.wait_for_selector("#classes button")
        total = int(page.text_content("#position").split(" of ")[1].replace(",", ""))
        for _ in range(min(total, limit)):
            finding = page.text_content("#finding")
            if not finding.startswith("label"):
                page.keyboard.press("ArrowRight")
                page.wait_for_timeout(50)
                continue
            path, shown = page.text_content("#viewer .path"), page.text_content("#current-label")
            seen += 1
            number += 1
            if shown != truth[path]:
                corrections[path] = truth[path]
                page.keyboard.press(KEYS[classes.index(truth[path])])
            else:
                page.keyboard.press("k")
            page.wait_for_function(f"document.getElementById('saved').dataset.number === '{number}'")
        browser.close()
    return corrections, seen, time.perf_counter() - started


def trained_accuracy(images: Path, labels: Path, runs: Path, recipe: str, seed: int) -> float:
    run = runs / f"{labels.stem}-{recipe}-seed{seed}"
    if not (run / "model.json").exists():
        shutil.rmtree(run, ignore_errors=True)
        cnnlab(
            "train",
            "--data",
            str(images),
            "--labels",
            str(labels),
            "--recipe",
            recipe,
            "--seed",
            str(seed),
            "--out",
            str(run),
        )
    listed = subprocess.run(
        [sys.executable, "-m", "cnnlab", "runs", str(run), "--json"], capture_output=True, text=True
    )
    return float(json.loads(listed.stdout)[0]["delivered_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--share", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=10_000, help="review queue items looked at, at most")
    parser.add_argument("--recipe", default="fast94")
    parser.add_argument("--train-seeds", type=int, default=3, help="trainings on each label file, seeds 0, 1, ...")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    images = extracted(args.data, args.work)
    flipped = args.work / "flipped.csv"
    truth = flipped_labels(images, flipped, args.share, args.seed)
    classes = sorted(set(truth.values()))
    doctor = args.work / "doctor" / "doctor.json"
    if not doctor.exists():
        started = time.perf_counter()
        cnnlab("doctor", "--data", str(images), "--labels", str(flipped), "--out", str(doctor.parent), "--quiet")
        print(f"the doctor took {time.perf_counter() - started:.0f} s")
    corrected = args.work / "corrected.csv"
    shutil.copy(flipped, corrected)
    for stale in (args.work / "corrected.csv.history.jsonl",):
        stale.unlink(missing_ok=True)
    with label_page(images, corrected, doctor, args.port) as url:
        corrections, seen, seconds = review(url, truth, classes, args.limit)
    before, after = read_labels(flipped), read_labels(corrected)
    changed = {path: label for path, label in after.items() if before.get(path) != label}
    wrong_before = sum(before[path] != truth[path] for path in before)
    wrong_after = sum(after[path] != truth[path] for path in after)
    print(f"reviewed {seen:,} suspected label errors in {seconds:.0f} s; corrected {len(corrections):,}")
    print(f"the label file differs from the flipped one by exactly those corrections: {changed == corrections}")
    print(f"wrong labels: {wrong_before:,} before, {wrong_after:,} after")
    runs = args.work / "runs"
    runs.mkdir(exist_ok=True)
    for name, labels in (("flipped", flipped), ("corrected", corrected)):
        accuracies = [trained_accuracy(images, labels, runs, args.recipe, seed) for seed in range(args.train_seeds)]
        listed = " ".join(f"{accuracy:.2%}" for accuracy in accuracies)
        print(
            f"{args.recipe} trained on the {name} labels: test accuracy {np.mean(accuracies):.2%} ± "
            f"{np.std(accuracies, ddof=1) if len(accuracies) > 1 else 0:.2%} (seeds {listed})",
            flush=True,
        )


if __name__ == "__main__":
    main()
