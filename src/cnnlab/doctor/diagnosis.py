"""The doctor's result, typed: each finding with the image it concerns, the leakage measured, and the whole
`Diagnosis` with its summary and the doctor.json it writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnlab.data.dataset import Dataset, SplitName
from cnnlab.data.exclude import FORMAT, Kind
from cnnlab.doctor import duplicates


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
    images: int  # examined, every split's
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
    peak_mb: dict[str, float] = field(default_factory=dict)  # the peak resident memory when each step ended, MB
    # (rows, classes) the out-of-sample probabilities the label findings came from, rows as `Rows` numbers them
    # (train, val, test); kept in memory only
    label_probabilities: np.ndarray | None = field(default=None, repr=False)

    def count(self, kind: Kind) -> int:
        return sum(finding.kind == kind for finding in self.findings)

    def of_kind(self, kind: Kind) -> list[Finding]:
        return [finding for finding in self.findings if finding.kind == kind]

    def summary(self) -> list[str]:
        """What it found, how many, and what it suggests: a few lines."""
        lines = [f"examined {self.images:,} images of {self.data} in {sum(self.seconds.values()):.0f}s"]
        lines.append(
            f"  label issues: {self.count(Kind.LABEL):,} suspected ({self.label_method}; its out-of-sample "
            f"agreement with the given labels {self.label_agreement:.1%})"
        )
        lines.append(
            f"  copies: {self.count(Kind.DUPLICATE):,} within a split, {self.count(Kind.LEAK):,} across splits "
            f"({self.calibration.said()})"
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
            "images": self.images,
            "data": self.data,
            "classes": self.classes,
            "class_counts": self.class_counts,
            "fingerprints": self.fingerprints,
            "label_method": self.label_method,
            "label_agreement": self.label_agreement,
            "near_copy_threshold": self.calibration.threshold,
            "calibration": vars(self.calibration),
            "leakage": {**vars(self.leakage), "share": self.leakage.share},
            "counts": {kind.value: self.count(kind) for kind in Kind},
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_mb,
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
class Rows:
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
