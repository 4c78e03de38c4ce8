"""The same images in class folders and flattened into one folder with a labels.csv: the same arrays in the same
order, and the same weights after training (SHA-256 of every trained tensor), on a whole dataset.

    PYTHONPATH=src python benchmarks/label_file_flatten.py ../shared/data/cifar10-png.tar.gz --recipe fast70

tests/test_labels.py checks the same on 800 CIFAR-10 images; this runs it on all of them.
"""

from __future__ import annotations

import argparse
import csv
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from weights_digest import weights_digest  # beside this file

from cnnlab.data import DataConfig, load_dataset
from cnnlab.recipes import resolve_run_config
from cnnlab.train import fit
from cnnlab.train.reporter import LineReporter


def flatten(archive: Path, folders: Path, flat: Path) -> Path:
    """Extract `archive` (<split>/<class>/<file>) into `folders`, and copy each image into `flat` as
    <split>-<class>-<file> with a labels.csv of file, label and split in the order the folder layout reads them."""
    with tarfile.open(archive) as tar:
        tar.extractall(folders, filter="data")
    flat.mkdir()
    rows = []
    for image in sorted(path for path in folders.rglob("*") if path.is_file()):
        split, label = image.parent.parent.name, image.parent.name
        name = f"{split}-{label}-{image.name}"
        (flat / name).write_bytes(image.read_bytes())
        rows.append((name, label, split))
    with open(flat.parent / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("file", "label", "split"), *rows])
    return flat.parent / "labels.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path)
    parser.add_argument("--recipe", default="fast70")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        started = time.perf_counter()
        labels = flatten(args.archive, root / "folders", root / "flat")
        print(f"flattened in {time.perf_counter() - started:.0f}s")
        folder = root / "folders"  # the layout looks through a single wrapping folder, as the label file does
        configs = {
            "folders": DataConfig(data=str(folder)),
            "label file": DataConfig(data=str(root / "flat"), labels=str(labels)),
        }
        datasets = {name: load_dataset(config) for name, config in configs.items()}
        for split in ("train", "test"):
            one, other = (getattr(dataset, split) for dataset in datasets.values())
            same = np.array_equal(np.asarray(one.images), np.asarray(other.images))
            same &= np.array_equal(one.labels, other.labels)
            print(f"{split}: {len(one):,} images, arrays and labels {'identical' if same else 'DIFFERENT'}")
        for name, config in configs.items():
            out = root / name.replace(" ", "-")
            layer = {"data": vars(config), "train": {"recipe": args.recipe, "seed": args.seed}, "out": str(out)}
            fit(resolve_run_config(layer), datasets[name], LineReporter())
            print(f"{name}: {args.recipe} seed {args.seed}: {weights_digest(out)}")


if __name__ == "__main__":
    main()
