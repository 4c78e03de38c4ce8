"""Contact sheets of a doctor's first findings, to judge them by eye one by one.

    PYTHONPATH=src python benchmarks/doctor_sheets.py doctor-out/doctor.json --data ../shared/data/cifar10-png.tar.gz \
        --out sheets/

Writes `labels-test.png` (the first `--count` suspected label errors of the test split, each with its given and
suggested class), `copies-within-test.png` (copy pairs within the test split) and `copies-test-train.png` (test
images with a copy in train), each pair side by side, numbered in the doctor's order, with what was measured.
The data flags must be those the doctor examined.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cnnlab.config import DataConfig
from cnnlab.data import load_dataset
from cnnlab.data.dataset import Dataset

SIDE = 96  # pixels per thumbnail
COLUMNS = 5  # findings per row


def thumbnail(dataset: Dataset, image: dict[str, object]) -> Image.Image:
    split = dataset.splits()[image["split"]]
    pixels = np.asarray(split.images[int(image["index"])])
    picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    return picture.resize((SIDE, SIDE), Image.Resampling.NEAREST if picture.width < SIDE else Image.Resampling.LANCZOS)


def sheet(dataset: Dataset, findings: list[dict[str, object]], caption, path: Path) -> None:
    """One cell per finding: its image (and the image it copies, on the left), its number and `caption(finding)`."""
    width = 2 * SIDE + 8
    rows = max(1, -(-len(findings) // COLUMNS))
    out = Image.new("RGB", (COLUMNS * width, rows * (SIDE + 30)), "white")
    draw = ImageDraw.Draw(out)
    for number, finding in enumerate(findings):
        x, y = number % COLUMNS * width, number // COLUMNS * (SIDE + 30)
        if finding.get("other"):
            out.paste(thumbnail(dataset, finding["other"]), (x, y))
        out.paste(thumbnail(dataset, finding["image"]), (x + SIDE, y))
        for line, words in enumerate([f"{number + 1}. {caption(finding)}"[:34], str(finding["detail"])[:34]]):
            draw.text((x, y + SIDE + 2 + 13 * line), words, fill="black")
    out.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("doctor_json", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--labels", help="the data's label file, as the doctor read it")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=50)
    arguments = parser.parse_args()
    dataset = load_dataset(DataConfig(data=arguments.data, labels=arguments.labels))
    findings = json.loads(arguments.doctor_json.read_text())["findings"]
    arguments.out.mkdir(parents=True, exist_ok=True)

    def test_image(finding: dict[str, object]) -> bool:
        return finding["image"]["split"] == "test"

    chosen = {
        "labels-test": [f for f in findings if f["kind"] == "label" and test_image(f)],
        "copies-within-test": [f for f in findings if f["kind"] == "duplicate" and test_image(f)],
        "copies-test-train": [f for f in findings if f["kind"] == "leak" and test_image(f)],
    }
    for name, found in chosen.items():
        sheet(
            dataset,
            found[: arguments.count],
            lambda f: (
                f"{f['image']['label']} -> {f['suggested']}" if f.get("suggested") else f"test #{f['image']['index']}"
            ),
            arguments.out / f"{name}.png",
        )
        print(f"{name}: the first {min(len(found), arguments.count)} of {len(found)}")


if __name__ == "__main__":
    main()
