"""How much of what is planted in a dataset `cnnlab doctor` finds.

    PYTHONPATH=src python benchmarks/doctor_injected.py labels --data ../shared/data/cifar10-png.tar.gz --share 0.02
    PYTHONPATH=src python benchmarks/doctor_injected.py copies --data ../shared/data/cifar10-png.tar.gz
    PYTHONPATH=src python benchmarks/doctor_injected.py both --data ../shared/data/cifar10-png.tar.gz --pick ambiguous
    PYTHONPATH=src python benchmarks/doctor_injected.py label-sets --data scenes/images \
        --labels scenes/miml_labels_1.csv --share 0.05

`labels`: a seeded `share` of the training labels flipped. `--pick uniform` flips images drawn uniformly to a
class drawn uniformly among the others; `--pick ambiguous` flips the images a model finds most ambiguous — the
`share` of them whose two most probable classes (out of sample, by a linear model on the pretrained embeddings)
are the given label and another at the closest probabilities — each to that other class: the mistakes a person
makes. Prints the recall and precision of the doctor's suspected label errors, and of its first 1x and 2x as
many as were flipped, in the doctor's order and in each ranking's (`labels.suspicion`), of confident learning's
suspects and of every image. `label-sets`
(multi-label data): in a seeded `share` of the training images, one label dropped (half of them) or swapped for
one the image does not carry (the others); prints the recall and precision of the suspected (image, class)
decisions among the doctor's first 1x and 2x as many as were planted. `copies`: 200 training images per
realistic way of copying (`cnnlab.doctor.copies.REALISTIC`: a crop, a scale, a turn, a colour shift, a JPEG),
each copy in the test split; prints the share of them found as leaks of their original, per way and per tier,
and how many other copy pairs the doctor reports. `both`: the flips and the copies in one run of the doctor.
The dataset is changed in memory only; its embeddings come from the cache after the first run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np

from cnnlab.config import DataConfig, DoctorConfig
from cnnlab.data import load_dataset
from cnnlab.data.cache import cache_root
from cnnlab.data.dataset import Dataset, Split, SplitName
from cnnlab.doctor import Diagnosis, Kind, examine
from cnnlab.doctor.copies import REALISTIC, realistic_copy
from cnnlab.doctor.embeddings import embed, pixel_digests
from cnnlab.doctor.labels import confident_learning, out_of_sample_probabilities, suspicion
from cnnlab.doctor.stages import Stages

COPIES_PER_WAY = 200


def flipped_labels(labels: np.ndarray, classes: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(len(labels), round(share * len(labels)), replace=False))
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, classes, len(flipped))) % classes
    return noisy, flipped


def ambiguous_flips(split: Split, classes: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The `share` of `split`'s images whose two most probable classes out of sample are their label and another
    at the closest probabilities, each relabelled as that other class."""
    embeddings = embed(split.images, pixel_digests(split.images), cache_root(None))
    probabilities = out_of_sample_probabilities(embeddings, split.labels, classes, 3, seed)
    top = np.argsort(-probabilities, axis=1)[:, :2]
    rows = np.arange(len(split.labels))
    other = np.where(top[:, 0] == split.labels, top[:, 1], top[:, 0])
    gap = np.abs(probabilities[rows, split.labels] - probabilities[rows, other])
    eligible = (top == split.labels[:, None]).any(1)
    order = np.argsort(np.where(eligible, gap, np.inf), kind="stable")
    flipped = np.sort(order[: round(share * len(rows))])
    noisy = split.labels.copy()
    noisy[flipped] = other[flipped]
    return noisy, flipped


def flipped_train(dataset: Dataset, arguments: argparse.Namespace) -> tuple[Dataset, np.ndarray]:
    classes, share, seed = len(dataset.classes), arguments.share, arguments.seed
    if arguments.pick == "ambiguous":
        noisy, flipped = ambiguous_flips(dataset.train, classes, share, seed)
    else:
        noisy, flipped = flipped_labels(dataset.train.labels, classes, share, seed)
    train = Split(dataset.train.images, noisy, dataset.train.names, dataset.train.native_sizes)
    return replace(dataset, train=train), flipped


def found_flips(diagnosis: Diagnosis, dataset: Dataset, flipped: np.ndarray) -> dict[str, object]:
    """Recall and precision of the suspects in the doctor's order and in each ranking's: train rows come first
    among the doctor's rows, so a train row's number is its index; a suspect of another split is a miss."""
    given = np.concatenate([split.labels for split in dataset.splits().values()])
    assert diagnosis.label_probabilities is not None
    orders = {
        "doctor": [f.image.index if f.image.split == SplitName.TRAIN else -1 for f in diagnosis.of_kind(Kind.LABEL)]
    }
    for ranking in ("self-confidence", "margin"):
        issues = confident_learning(diagnosis.label_probabilities, given, ranking).issues
        orders[ranking] = [row if row < len(dataset.train) else -1 for row in issues.tolist()]
        # Every image in the ranking's order, beyond the confident joint's estimate: how well it ranks alone.
        everything = np.argsort(-suspicion(diagnosis.label_probabilities, given, ranking), kind="stable")
        orders[f"{ranking}, every image"] = [row if row < len(dataset.train) else -1 for row in everything.tolist()]
    planted = set(flipped.tolist())
    result: dict[str, object] = {"flipped": len(planted), "method": diagnosis.label_method}
    for name, suspected in orders.items():
        measured: dict[str, object] = {"suspected": len(suspected) if "every" not in name else None}
        for first_name, first in (("all", len(suspected)), ("1x", len(planted)), ("2x", 2 * len(planted))):
            chosen = suspected[:first]
            hits = sum(index in planted for index in chosen)
            measured[first_name] = {"recall": hits / len(planted), "precision": hits / max(len(chosen), 1)}
        result[name] = measured
    result["agreement"] = diagnosis.label_agreement
    return result


def labels_run(arguments: argparse.Namespace) -> dict[str, object]:
    dataset, flipped = flipped_train(load_dataset(DataConfig(data=arguments.data)), arguments)
    diagnosis = examine(dataset, DoctorConfig(seed=arguments.seed), stages=Stages())
    return {**found_flips(diagnosis, dataset, flipped), "seconds": diagnosis.seconds}


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


def with_copies(dataset: Dataset, seed: int) -> tuple[Dataset, np.ndarray]:
    """`dataset` with COPIES_PER_WAY training images copied into its test split per realistic way, and the
    training image each copies."""
    rng = np.random.default_rng(seed)
    sources = rng.choice(len(dataset.train), COPIES_PER_WAY * len(REALISTIC), replace=False)
    ways = [way for way in REALISTIC for _ in range(COPIES_PER_WAY)]
    planted = np.stack(
        [
            realistic_copy(np.asarray(dataset.train.images[int(source)]), way, rng)
            for source, way in zip(sources, ways, strict=True)
        ]
    )
    test = dataset.test
    images = np.concatenate([np.asarray(test.images), planted])
    labels = np.concatenate([test.labels, dataset.train.labels[sources]])
    return replace(dataset, test=Split(images, labels)), sources


def found_copies(diagnosis: Diagnosis, dataset: Dataset, sources: np.ndarray) -> dict[str, object]:
    first = len(dataset.test) - len(sources)  # the planted copies close the test split
    leaks = {
        (f.image.index, f.other.index): f.detail.split(" (")[0]
        for f in diagnosis.of_kind(Kind.LEAK)
        if f.image.split == SplitName.TEST and f.other is not None and f.other.split == SplitName.TRAIN
    }
    tiers = [leaks.get((first + i, int(source))) for i, source in enumerate(sources)]
    found = np.array([tier is not None for tier in tiers])
    per_way = {}
    for number, way in enumerate(REALISTIC):
        chosen = slice(number * COPIES_PER_WAY, (number + 1) * COPIES_PER_WAY)
        named = [tier for tier in tiers[chosen] if tier]
        per_way[way] = {"recall": float(found[chosen].mean()), "tiers": {t: named.count(t) for t in sorted(set(named))}}
    copy_kinds = (Kind.LEAK, Kind.DUPLICATE)
    calibration = diagnosis.calibration
    return {
        "recall": float(found.mean()),
        "per_way": per_way,
        "other_pairs_reported": sum(f.kind in copy_kinds for f in diagnosis.findings) - int(found.sum()),
        "thresholds": {"near-exact": calibration.threshold, "near duplicate": calibration.registered_threshold},
        "unrelated_above": f"{calibration.unrelated_above} of {calibration.unrelated}",
        "registered_recall_of_calibration_copies": calibration.registered_recall,
    }


def copies_run(arguments: argparse.Namespace) -> dict[str, object]:
    dataset, sources = with_copies(load_dataset(DataConfig(data=arguments.data)), arguments.seed)
    diagnosis = examine(dataset, DoctorConfig(seed=arguments.seed), stages=Stages())
    return {**found_copies(diagnosis, dataset, sources), "seconds": diagnosis.seconds}


def both_run(arguments: argparse.Namespace) -> dict[str, object]:
    dataset, flipped = flipped_train(load_dataset(DataConfig(data=arguments.data)), arguments)
    dataset, sources = with_copies(dataset, arguments.seed)
    diagnosis = examine(dataset, DoctorConfig(seed=arguments.seed), stages=Stages())
    return {
        "labels": found_flips(diagnosis, dataset, flipped),
        "copies": found_copies(diagnosis, dataset, sources),
        "seconds": diagnosis.seconds,
        "peak_rss_mb": diagnosis.peak_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["labels", "label-sets", "copies", "both"])
    parser.add_argument("--data", required=True)
    parser.add_argument("--labels", help="label-sets: the data's label file")
    parser.add_argument("--share", type=float, default=0.02, help="labels: the share of training labels flipped")
    parser.add_argument("--pick", choices=["uniform", "ambiguous"], default="uniform", help="labels: which flipped")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    runs = {"labels": labels_run, "label-sets": label_sets_run, "copies": copies_run, "both": both_run}
    result = runs[arguments.what](arguments)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
