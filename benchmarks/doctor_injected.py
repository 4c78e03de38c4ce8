"""How much of what is planted in a dataset `cnnlab doctor` finds.

    PYTHONPATH=src python benchmarks/doctor_injected.py labels --data ../shared/data/cifar10-png.tar.gz --share 0.02
    PYTHONPATH=src python benchmarks/doctor_injected.py copies --data ../shared/data/cifar10-png.tar.gz
    PYTHONPATH=src python benchmarks/doctor_injected.py label-sets --data scenes/images \
        --labels scenes/miml_labels_1.csv --share 0.05

`labels`: a seeded `share` of the training labels flipped to another class (drawn uniformly among the others);
prints the recall and precision of the doctor's suspected label errors, and of its first 1x and 2x as many as
were flipped. `label-sets` (multi-label data): in a seeded `share` of the training images, one label dropped
(half of them) or swapped for one the image does not carry (the others); prints the recall and precision of the
suspected (image, class) decisions among the doctor's first 1x and 2x as many as were planted.
`copies`: 200 training images copied into the test split, 50 each as exact copies, JPEG at quality 75, shifted
by 2 pixels (the uncovered edge repeating the image's edge) and brightened by 10%; prints the share of them found
as leaks of their original, per way, and how many other copy pairs the doctor reports. The dataset is changed in
memory only; its embeddings come from the cache after the first run.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import replace

import numpy as np
from PIL import Image, ImageEnhance

from cnnlab.config import DataConfig, DoctorConfig
from cnnlab.data import load_dataset
from cnnlab.data.dataset import Split, SplitName
from cnnlab.doctor import Kind, examine
from cnnlab.doctor.stages import Stages


def flipped_labels(labels: np.ndarray, classes: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(len(labels), round(share * len(labels)), replace=False))
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, classes, len(flipped))) % classes
    return noisy, flipped


def planted_copy(image: np.ndarray, way: str) -> np.ndarray:
    height, width, channels = image.shape
    picture = Image.fromarray(image[..., 0] if channels == 1 else image)
    if way == "exact":
        return image.copy()
    if way == "jpeg-75":
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=75)
        copied = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert(picture.mode))
    elif way == "shifted":
        copied = np.roll(image, 2, axis=1)
        copied[:, :2] = copied[:, 2:3]
    else:
        copied = np.asarray(ImageEnhance.Brightness(picture).enhance(1.1))
    return copied.reshape(height, width, channels)


def labels_run(arguments: argparse.Namespace) -> dict[str, object]:
    dataset = load_dataset(DataConfig(data=arguments.data))
    noisy, flipped = flipped_labels(dataset.train.labels, len(dataset.classes), arguments.share, arguments.seed)
    train = Split(dataset.train.images, noisy, dataset.train.names, dataset.train.native_sizes)
    diagnosis = examine(replace(dataset, train=train), DoctorConfig(seed=arguments.seed), stages=Stages())
    # Every split's suspects, in the doctor's order: a suspected test image is a miss.
    suspected = [(f.image.split, f.image.index) for f in diagnosis.of_kind(Kind.LABEL)]
    planted = {(SplitName.TRAIN, index) for index in flipped.tolist()}
    result: dict[str, object] = {"flipped": len(planted), "suspected": len(suspected), "method": diagnosis.label_method}
    for name, first in (("all", len(suspected)), ("1x", len(planted)), ("2x", 2 * len(planted))):
        chosen = suspected[:first]
        hits = sum(image in planted for image in chosen)
        result[name] = {"recall": hits / len(planted), "precision": hits / max(len(chosen), 1), "taken": len(chosen)}
    result["seconds"] = diagnosis.seconds
    return result


def planted_label_sets(targets: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Multi-hot `targets` with one label dropped or swapped in a seeded `share` of the images carrying any, and
    the (image, class) decisions changed."""
    rng = np.random.default_rng(seed)
    carrying = np.flatnonzero(targets.any(1))
    chosen = np.sort(rng.choice(carrying, round(share * len(targets)), replace=False))
    noisy, planted = targets.copy(), set()
    for number, row in enumerate(chosen.tolist()):
        dropped = int(rng.choice(np.flatnonzero(targets[row])))
        noisy[row, dropped] = 0
        planted.add((row, dropped))
        absent = np.flatnonzero(targets[row] == 0)
        if number % 2 and len(absent):
            added = int(rng.choice(absent))
            noisy[row, added] = 1
            planted.add((row, added))
    return noisy, planted


def label_sets_run(arguments: argparse.Namespace) -> dict[str, object]:
    dataset = load_dataset(DataConfig(data=arguments.data, labels=arguments.labels))
    noisy, planted = planted_label_sets(dataset.train.labels, arguments.share, arguments.seed)
    train = Split(dataset.train.images, noisy, dataset.train.names, dataset.train.native_sizes)
    diagnosis = examine(replace(dataset, train=train), DoctorConfig(seed=arguments.seed), stages=Stages())
    classes = list(dataset.classes)
    suspected = []  # (image, class) of each suspect in the doctor's order; a suspect outside train is a miss
    for finding in diagnosis.of_kind(Kind.LABEL):
        given, corrected = set(finding.image.label.split(";")), set((finding.suggested or "").split(";"))
        (changed,) = (given ^ corrected) - {"", "none"}
        suspected.append(
            (finding.image.index if finding.image.split == SplitName.TRAIN else -1, classes.index(changed))
        )
    result: dict[str, object] = {"planted": len(planted), "suspected": len(suspected), "method": diagnosis.label_method}
    for name, first in (("all", len(suspected)), ("1x", len(planted)), ("2x", 2 * len(planted))):
        chosen = suspected[:first]
        hits = sum(pair in planted for pair in chosen)
        result[name] = {"recall": hits / len(planted), "precision": hits / max(len(chosen), 1), "taken": len(chosen)}
    result["agreement"], result["seconds"] = diagnosis.label_agreement, diagnosis.seconds
    return result


def copies_run(arguments: argparse.Namespace) -> dict[str, object]:
    dataset = load_dataset(DataConfig(data=arguments.data))
    rng = np.random.default_rng(arguments.seed)
    sources = rng.choice(len(dataset.train), 200, replace=False)
    ways = ["exact", "jpeg-75", "shifted", "brightened"]
    planted = np.stack(
        [planted_copy(np.asarray(dataset.train.images[int(source)]), ways[i // 50]) for i, source in enumerate(sources)]
    )
    test = dataset.test
    images = np.concatenate([np.asarray(test.images), planted])
    labels = np.concatenate([test.labels, dataset.train.labels[sources]])
    diagnosis = examine(
        replace(dataset, test=Split(images, labels)), DoctorConfig(seed=arguments.seed), stages=Stages()
    )
    leaks = {
        (f.image.index, f.other.index)
        for f in diagnosis.of_kind(Kind.LEAK)
        if f.image.split == SplitName.TEST and f.other is not None and f.other.split == SplitName.TRAIN
    }
    found = [(len(test) + i, int(source)) in leaks for i, source in enumerate(sources)]
    copy_kinds = (Kind.LEAK, Kind.DUPLICATE)
    others = sum(f.kind in copy_kinds for f in diagnosis.findings) - sum(found)
    return {
        "recall": float(np.mean(found)),
        "recall_per_way": {way: float(np.mean(found[i * 50 : (i + 1) * 50])) for i, way in enumerate(ways)},
        "other_pairs_reported": others,
        "threshold": diagnosis.calibration.threshold,
        "seconds": diagnosis.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["labels", "label-sets", "copies"])
    parser.add_argument("--data", required=True)
    parser.add_argument("--labels", help="label-sets: the data's label file")
    parser.add_argument("--share", type=float, default=0.02, help="labels: the share of training labels flipped")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    runs = {"labels": labels_run, "label-sets": label_sets_run, "copies": copies_run}
    result = runs[arguments.what](arguments)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
