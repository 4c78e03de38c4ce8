"""Training without the images `cnnlab doctor` flagged: `data.exclude = "doctor.json"` or "doctor.json:label,leak".

The flagged images leave the train and validation splits; the test split is kept whole, so that accuracies stay
comparable with runs on all the data. A flagged test image's copy in train (a leak) is what leaves. The file
records a fingerprint of each split it examined (sizes, labels, file paths), and is refused for other data.
Nothing on disk is ever moved or deleted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.data.dataset import Dataset, Split, SplitName
from cnnlab.errors import ConfigError

FORMAT = "cnnlab-doctor/1"


class Kind(StrEnum):
    """What a doctor's finding says of its image (`cnnlab.doctor`); what `data.exclude` selects by."""

    LABEL = "label"  # its label is probably wrong
    DUPLICATE = "duplicate"  # an exact or near copy of another image of its split
    LEAK = "leak"  # a copy of an image of another split (a test image with a copy in train)
    OUTLIER = "outlier"  # far from every other image in embedding space
    ODD = "odd"  # nearly constant, very dark or bright, blurry, grayscale, tiny or oddly shaped


KINDS = tuple(kind.value for kind in Kind)


def split_fingerprint(split: Split) -> str:
    """What identifies a split's images without reading them: their count, labels and file paths."""
    digest = hashlib.sha256(np.int64(len(split)).tobytes() + split.labels.astype(np.int64).tobytes())
    if split.names is not None:
        digest.update("\0".join(split.names.tolist()).encode())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class Exclusion:
    source: str  # the doctor.json, as given
    kinds: tuple[str, ...]
    rows: dict[SplitName, np.ndarray]  # per split, the sorted indices that leave it

    @property
    def count(self) -> int:
        return sum(len(rows) for rows in self.rows.values())

    def describe(self) -> str:
        where = ", ".join(f"{len(rows):,} of {name.in_words}" for name, rows in self.rows.items() if len(rows))
        return f"{self.count:,} images left out ({where or 'none'}), flagged as {'/'.join(self.kinds)} in {self.source}"


def parse_exclude(spec: str) -> tuple[Path, tuple[str, ...]]:
    """`path` or `path:kind,kind` -> (path, kinds)."""
    path, _, kinds = spec.rpartition(":") if ":" in Path(spec).name else (spec, "", "")
    chosen = tuple(kind.strip() for kind in kinds.split(",") if kind.strip()) or KINDS
    unknown = [kind for kind in chosen if kind not in KINDS]
    if unknown:
        raise ConfigError(
            f"data.exclude: unknown kind {unknown[0]!r} after the ':'; kinds are {', '.join(KINDS)}", "data.exclude"
        )
    return Path(path).expanduser(), chosen


def read_exclusion(spec: str, dataset: Dataset) -> Exclusion:
    """The images of `dataset` that the doctor.json `spec` flags, refused when it examined other data."""
    path, kinds = parse_exclude(spec)
    try:
        report: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"data.exclude: {path}: no such file", "data.exclude") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"data.exclude: {path}: not a readable doctor.json ({error})", "data.exclude") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise ConfigError(f"data.exclude: {path} is not a doctor.json written by cnnlab doctor", "data.exclude")
    splits = dataset.splits()
    recorded = report.get("fingerprints", {})
    for name, split in splits.items():
        if recorded.get(name.value) != split_fingerprint(split):
            raise ConfigError(
                f"data.exclude: {path} examined other data: its {name.in_words} split differs from this one's "
                f"({len(split):,} images); run cnnlab doctor with the same data flags",
                "data.exclude",
            )
    leaving: dict[SplitName, set[int]] = {name: set() for name in splits if name != SplitName.TEST}
    for finding in report.get("findings", []):
        if finding["kind"] not in kinds:
            continue
        image, other = finding["image"], finding.get("other")
        chosen = image if image["split"] != SplitName.TEST or other is None else other
        if chosen["split"] != SplitName.TEST:
            leaving[SplitName(chosen["split"])].add(int(chosen["index"]))
    rows = {name: np.array(sorted(indices), dtype=np.int64) for name, indices in leaving.items()}
    return Exclusion(spec, kinds, rows)


def without(dataset: Dataset, exclusion: Exclusion) -> Dataset:
    """`dataset` less the excluded images, its layout saying so."""
    kept = {}
    for name, rows in exclusion.rows.items():
        split = dataset.splits()[name]
        keep = np.ones(len(split), bool)
        keep[rows] = False
        if not keep.any():
            raise ConfigError(f"data.exclude leaves no {name.in_words} images", "data.exclude")
        kept[name] = split.take(np.flatnonzero(keep))
    layout = f"{dataset.layout}; {exclusion.describe()}" if dataset.layout else exclusion.describe()
    return replace(dataset, train=kept[SplitName.TRAIN], val=kept.get(SplitName.VAL, dataset.val), layout=layout)
