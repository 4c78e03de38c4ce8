"""The doctor: what is wrong with a dataset — suspected label errors, exact and near copies within a split and
across splits (leakage), outliers and odd images, class balance — as one typed `Diagnosis`.

from cnnlab.config import DataConfig, DoctorConfig
from cnnlab.data import load_dataset
from cnnlab.doctor import examine
diagnosis = examine(load_dataset(DataConfig(data="photos/")), DoctorConfig())
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.config import DoctorConfig, check_ranges
from cnnlab.data.cache import cache_root
from cnnlab.data.dataset import Dataset, Pixels, SplitName, concatenate_images
from cnnlab.data.exclude import FORMAT, Kind, split_fingerprint
from cnnlab.data.loader import in_order
from cnnlab.doctor import duplicates, labels, odd
from cnnlab.doctor.embeddings import digests_of, embed, embedding_size
from cnnlab.doctor.stages import Stages
from cnnlab.evaluate import evaluate, test_split_of
from cnnlab.models import load_model
from cnnlab.progress import Advance

__all__ = ["Diagnosis", "DoctorConfig", "Finding", "ImageRef", "Kind", "Leakage", "examine"]


@dataclass(frozen=True)
class ImageRef:
    split: SplitName
    index: int  # in its split, as cnnlab loads it with the same data flags
    label: str  # its given class (multi-label data: its classes, separated by ";")
    path: str | None  # inside the dataset, for sources made of files


@dataclass(frozen=True)
class Finding:
    kind: Kind
    image: ImageRef
    score: float  # how strongly; its meaning per kind is in `detail`
    detail: str
    suggested: str | None = None  # label issues: the class it most probably is (multi-label: its probable classes)
    other: ImageRef | None = None  # copies: the image it copies


@dataclass(frozen=True)
class Leakage:
    test_images: int
    leaked: int  # test images with an exact or near copy in train
    delivered_accuracy: float | None = None  # of the examined run (`run`) on the whole test split
    delivered_accuracy_without_copies: float | None = None  # and on the test images without a copy in train
    run: str | None = None

    @property
    def share(self) -> float:
        return self.leaked / self.test_images if self.test_images else 0.0


@dataclass
class Diagnosis:
    data: str  # the dataset, in words
    classes: list[str]
    class_counts: dict[str, list[int]]  # per split, images per class
    fingerprints: dict[str, str]  # per split: what `train --exclude` checks it is given the same data
    label_method: str  # which out-of-sample probabilities ranked the label issues, and why
    label_agreement: float  # how often those probabilities' top class is the given label
    calibration: duplicates.Calibration
    leakage: Leakage
    findings: list[Finding]
    seconds: dict[str, float] = field(default_factory=dict)  # each step's wall time

    def count(self, kind: Kind) -> int:
        return sum(finding.kind == kind for finding in self.findings)

    def of_kind(self, kind: Kind) -> list[Finding]:
        return [finding for finding in self.findings if finding.kind == kind]

    def summary(self) -> list[str]:
        """What it found, how many, and what it suggests: a few lines."""
        images = sum(sum(counts) for counts in self.class_counts.values())
        lines = [f"examined {images:,} images of {self.data} in {sum(self.seconds.values()):.0f}s"]
        lines.append(
            f"  label issues: {self.count(Kind.LABEL):,} suspected ({self.label_method}; its out-of-sample "
            f"agreement with the given labels {self.label_agreement:.1%})"
        )
        lines.append(
            f"  copies: {self.count(Kind.DUPLICATE):,} within a split, {self.count(Kind.LEAK):,} across splits "
            f"(near copies: aligned correlation >= {self.calibration.threshold:.3f}, calibrated on measured copies)"
        )
        leak = self.leakage
        line = f"  leakage: {leak.leaked:,} of {leak.test_images:,} test images ({leak.share:.2%}) have a copy in train"
        if leak.delivered_accuracy is not None and leak.delivered_accuracy_without_copies is not None:
            line += (
                f"; {leak.run} scores {leak.delivered_accuracy:.4f} on all of them, "
                f"{leak.delivered_accuracy_without_copies:.4f} without"
            )
        lines.append(line)
        lines.append(f"  outliers: {self.count(Kind.OUTLIER):,}; odd images: {self.count(Kind.ODD):,}")
        train = np.array(self.class_counts.get(SplitName.TRAIN.value, [0]))
        if train.min() > 0 and train.max() / train.min() > 2:
            lines.append(
                f"  class balance: train's largest class has {train.max() / train.min():.1f}x its smallest's "
                "images; consider --class-weights auto"
            )
        if self.findings:
            lines.append("  to train without them: cnnlab train ... --exclude doctor.json (or doctor.json:label,leak)")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "data": self.data,
            "classes": self.classes,
            "class_counts": self.class_counts,
            "fingerprints": self.fingerprints,
            "label_method": self.label_method,
            "label_agreement": self.label_agreement,
            "near_copy_threshold": self.calibration.threshold,
            "calibration": {"sample": self.calibration.sample, "similarities": self.calibration.similarities},
            "leakage": {**vars(self.leakage), "share": self.leakage.share},
            "counts": {kind.value: self.count(kind) for kind in Kind},
            "seconds": self.seconds,
            "findings": [_finding_dict(finding) for finding in self.findings],
        }


def _finding_dict(finding: Finding) -> dict[str, Any]:
    record: dict[str, Any] = {
        "kind": finding.kind.value,
        "image": vars(finding.image),
        "score": round(finding.score, 5),
        "detail": finding.detail,
    }
    if finding.suggested is not None:
        record["suggested"] = finding.suggested
    if finding.other is not None:
        record["other"] = vars(finding.other)
    return record


@dataclass(frozen=True)
class _Rows:
    """All splits' images as one sequence of rows: train, then val, then test."""

    names: list[SplitName]
    starts: list[int]
    dataset: Dataset

    def ref(self, row: int) -> ImageRef:
        position = int(np.searchsorted(self.starts, row, side="right")) - 1
        name = self.names[position]
        split = self.dataset.splits()[name]
        index = row - self.starts[position]
        return ImageRef(name, index, self.label_of(split.labels[index]), split.name_of(index))

    def label_of(self, given: np.ndarray) -> str:
        """A class index as its name; multi-hot classes as their names, separated by ";"."""
        classes = self.dataset.classes
        return ";".join(classes[k] for k in np.flatnonzero(given)) if given.ndim else classes[int(given)]


def examine(
    dataset: Dataset, config: DoctorConfig, cache: Path | None = None, stages: Stages | None = None
) -> Diagnosis:
    """Examine every split of `dataset`; with `config.run`, that run's test accuracy with and without leaks.
    Embeddings are cached in `cache` (default: cnnlab's cache folder)."""
    check_ranges(config, "doctor")
    stages = stages or Stages(quiet=True)
    root = cache or cache_root(None)
    splits = dataset.splits()
    names = list(splits)
    sizes = [len(split) for split in splits.values()]
    rows = _Rows(names, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist(), dataset)
    images = concatenate_images([split.images for split in splits.values()])
    given = np.concatenate([split.labels for split in splits.values()])
    total = len(given)

    with stages.step("pixels read", total) as advance:
        digests, statistics, descriptors, views = _read_pixels(images, advance)
    with stages.step(f"embeddings at {embedding_size(dataset.image_shape)} px", total) as advance:
        embeddings = embed(images, digests, root, advance)

    probabilities, method = _label_probabilities(images, embeddings, given, dataset, config, stages)
    if dataset.multi_label:
        method += "; each class against the rest, a suspect being one image's class given wrongly or missing"
    findings, agreement = _suspected_labels(probabilities, given, rows)

    # Copies of a nearly constant image correlate with nothing: the calibration copies the others.
    textured = np.flatnonzero(statistics.std[: sizes[0]] >= odd.CONSTANT_STD)
    sample = np.sort(
        np.random.default_rng(config.seed).choice(
            textured, min(duplicates.CALIBRATION_IMAGES, len(textured)), replace=False
        )
    )
    with stages.step("near-copy calibration", len(sample)) as advance:
        calibration = duplicates.calibrate(np.asarray(splits[SplitName.TRAIN].images[sample]), views[sample])
        advance(len(sample))
    with stages.step("nearest neighbours by embedding", total) as advance:
        neighbours = duplicates.nearest_neighbours(duplicates.reduced(embeddings), advance)
    with stages.step("nearest neighbours by pixels", total) as advance:
        alike = duplicates.nearest_neighbours(descriptors, advance)
    pairs = duplicates.candidate_pairs(neighbours, alike)
    with stages.step("candidate pairs compared", len(pairs)) as advance:
        near = duplicates.near_pairs(pairs, views, calibration.threshold, advance)

    copy_findings, test_copies = _copy_findings(digests, near, rows)
    findings += copy_findings
    findings += _odd_findings(statistics, neighbours, images, splits, rows, dataset)
    leakage = _leakage(config.run, dataset, test_copies, sizes[-1])
    return Diagnosis(
        data=f"{dataset.name}" + (f" ({dataset.layout})" if dataset.layout else ""),
        classes=list(dataset.classes),
        class_counts={name.value: counts.tolist() for name, counts in dataset.class_counts().items()},
        fingerprints={name.value: split_fingerprint(split) for name, split in splits.items()},
        label_method=method,
        label_agreement=agreement,
        calibration=calibration,
        leakage=leakage,
        findings=findings,
        seconds=dict(stages.seconds),
    )


def _read_pixels(images: Pixels, advance: Advance) -> tuple[np.ndarray, odd.PixelStatistics, np.ndarray, np.ndarray]:
    """In one pass over the images (a disk-backed split is read once): their digests, their statistics for the
    odd-image checks, and their pixel descriptors and views for the copy search."""
    digests, statistics, descriptors, views = [], [], [], []
    for batch in in_order(images, 1000):
        digests.append(digests_of(batch))
        statistics.append(odd.PixelStatistics.of(batch))
        descriptor, view = duplicates.views_of(batch)
        descriptors.append(descriptor)
        views.append(view)
        advance(len(batch))
    return (
        np.concatenate(digests),
        odd.PixelStatistics.joined(statistics),
        np.concatenate(descriptors),
        np.concatenate(views),
    )


def _label_probabilities(
    images: Pixels, embeddings: np.ndarray, given: np.ndarray, dataset: Dataset, config: DoctorConfig, stages: Stages
) -> tuple[np.ndarray, str]:
    """Out-of-sample probabilities of every image's class, and which model gave them (and why)."""
    classes, folds = len(dataset.classes), config.folds
    wanted = config.label_model
    if wanted == "auto":
        wanted = "both" if labels.trains_on(dataset.image_shape) else "embeddings"
    candidates: dict[str, np.ndarray] = {}
    if wanted in ("embeddings", "both"):
        with stages.step(f"linear model on embeddings, {folds}-fold", folds) as advance:
            found = labels.out_of_sample_probabilities(embeddings, given, classes, folds, config.seed)
            advance(folds)
        candidates[f"a linear model on embeddings, {folds}-fold"] = found
    if wanted in ("training", "both"):
        with (
            stages.step(f"{labels.TRAINED_RECIPE} trainings, {folds}-fold", folds) as advance,
            tempfile.TemporaryDirectory(prefix="cnnlab-doctor-") as scratch,
        ):
            found = labels.trained_probabilities(images, given, dataset, folds, config.seed, Path(scratch), advance)
        candidates[f"{folds}-fold {labels.TRAINED_RECIPE} trainings"] = found
    if len(candidates) == 1:
        return next(iter(candidates.values())), next(iter(candidates))
    candidates["the mean of both"] = np.mean(np.stack(list(candidates.values())), 0)
    # Chosen by how often each one's top class is the given label: the log loss would favour the better
    # calibrated, while what ranks mislabelled images well is the more accurate.
    agreement = {name: labels.agreement(found, given) for name, found in candidates.items()}
    chosen = max(agreement, key=agreement.__getitem__)
    said = "; ".join(f"{name} {share:.1%}" for name, share in agreement.items())
    return candidates[chosen], f"{chosen}, the most often agreeing with the given labels out of sample ({said})"


def _suspected_labels(probabilities: np.ndarray, given: np.ndarray, rows: _Rows) -> tuple[list[Finding], float]:
    """The label findings by confident learning (of multi-label data, each class against the rest), and how often
    the out-of-sample probabilities agree with the given labels."""
    if given.ndim == 2:
        label_sets = labels.label_set_issues(probabilities, given)
        return _label_set_findings(label_sets, rows, given), label_sets.agreement
    issues = labels.confident_learning(probabilities, given)
    return _label_findings(issues, rows, rows.dataset.classes), issues.agreement


def _label_findings(issues: labels.LabelIssues, rows: _Rows, classes: tuple[str, ...]) -> list[Finding]:
    found = []
    for row, suggested, confidence in zip(issues.issues, issues.suggested, issues.self_confidence, strict=True):
        image = rows.ref(int(row))
        probability = float(issues.probabilities[row, suggested])
        found.append(
            Finding(
                Kind.LABEL,
                image,
                1 - float(confidence),
                f"given {image.label} (p={confidence:.3f}), most probably {classes[suggested]} (p={probability:.3f}); "
                "score: 1 - p(given)",
                suggested=classes[suggested],
            )
        )
    return found


def _label_set_findings(issues: labels.LabelSetIssues, rows: _Rows, given: np.ndarray) -> list[Finding]:
    """A finding per suspected (image, class) decision of multi-label data, suggesting the corrected label set."""
    found, classes = [], rows.dataset.classes
    for row, k, was_given, confidence in zip(
        issues.rows, issues.classes, issues.given, issues.self_confidence, strict=True
    ):
        corrected = given[row].copy()
        corrected[k] = 1 - corrected[k]
        chance = float(issues.probabilities[row, k])
        what = (
            f"{classes[k]} given (p={chance:.3f}), likely wrongly"
            if was_given
            else f"{classes[k]} missing (p={chance:.3f})"
        )
        detail = f"{what}; score: 1 - p(as given)"
        found.append(
            Finding(Kind.LABEL, rows.ref(int(row)), 1 - float(confidence), detail, rows.label_of(corrected) or "none")
        )
    return found


def _copy_findings(
    digests: np.ndarray, near: list[tuple[int, int, float]], rows: _Rows
) -> tuple[list[Finding], set[int]]:
    """A finding per copy (on the later image of each pair), and the test split's rows with a copy in train."""
    pairs: dict[tuple[int, int], tuple[float, str]] = {}
    for group in duplicates.exact_groups(digests):
        for row in group[1:].tolist():
            pairs[(int(group[0]), row)] = (1.0, "exact copy (the same pixels)")
    for first, second, similarity in near:
        pairs.setdefault((first, second), (similarity, f"near copy (aligned correlation {similarity:.3f})"))
    found, test_copies = [], set()
    for (first, second), (similarity, words) in sorted(pairs.items(), key=lambda item: -item[1][0]):
        image, other = rows.ref(second), rows.ref(first)
        across = image.split != other.split
        if image.split == SplitName.TEST and other.split == SplitName.TRAIN:
            test_copies.add(image.index)
        kind = Kind.LEAK if across else Kind.DUPLICATE
        found.append(Finding(kind, image, similarity, f"{words} of {other.split.value} #{other.index}", other=other))
    return found, test_copies


def _odd_findings(
    statistics: odd.PixelStatistics,
    neighbours: duplicates.Neighbours,
    images: Any,
    splits: Any,
    rows: _Rows,
    dataset: Dataset,
) -> list[Finding]:
    native = [split.native_sizes for split in splits.values()]
    native_sizes = np.concatenate(native) if all(sizes is not None for sizes in native) else None
    reasons = odd.odd_reasons(statistics, dataset.image_shape.channels == 3, native_sizes, dataset.image_shape.size)
    found = []
    for row, said in enumerate(reasons):
        if said:
            detail = "; ".join(f"{name} ({value:.3g})" for name, value in said)
            found.append(Finding(Kind.ODD, rows.ref(row), float(len(said)), detail))
    outliers = odd.outlier_scores(neighbours.similarities, neighbours.indices)
    for row in np.flatnonzero(outliers > odd.ROBUST_Z)[np.argsort(-outliers[outliers > odd.ROBUST_Z])].tolist():
        found.append(
            Finding(
                Kind.OUTLIER,
                rows.ref(row),
                float(outliers[row]),
                f"far from its nearest images (robust z {outliers[row]:.1f} of its mean embedding cosine to its "
                f"{duplicates.NEIGHBOURS} nearest)",
            )
        )
    return found


def _leakage(run: str | None, dataset: Dataset, test_copies: set[int], test_images: int) -> Leakage:
    if run is None:
        return Leakage(test_images, len(test_copies))
    model = load_model(Path(run).expanduser())
    test = test_split_of(model, dataset)
    evaluation = evaluate(model, test)
    given = test.labels.astype(bool) if test.labels.ndim == 2 else np.eye(len(dataset.classes), dtype=bool)[test.labels]
    right = (evaluation.answered == given).all(1)  # the top class, or the whole label set
    clean = np.ones(len(right), bool)
    clean[sorted(test_copies)] = False
    return Leakage(
        test_images, len(test_copies), float(right.mean()), float(right[clean].mean()) if clean.any() else None, run
    )
