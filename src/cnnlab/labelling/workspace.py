"""What the labelling page works on: a folder's images, their label file (`store.py`), the doctor's findings to
review, the pretrained embeddings, and a linear head on them retrained while a person labels.

from cnnlab.labelling.workspace import open_workspace
workspace = open_workspace(Path("photos"), Path("photos/labels.csv"), classes=("cat", "dog"))
workspace.prepare()  # embeddings (cached) and the first head; the page runs this in the background
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.data import images as image_io
from cnnlab.data.cache import cache_root
from cnnlab.data.dataset import ImageShape
from cnnlab.data.layout import read_layout
from cnnlab.data.walk import walk_files
from cnnlab.doctor.embeddings import EMBEDDING_WIDTH, embed, embedding_size, pixel_digests
from cnnlab.doctor.labels import fitted_probabilities
from cnnlab.errors import CnnlabError
from cnnlab.labelling.active import Suggestion, suggest
from cnnlab.labelling.store import LabelStore

log = logging.getLogger("cnnlab")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
REVIEWED_KINDS = ("label", "duplicate", "leak")  # the doctor's findings a person can decide on
HEADER_SAMPLE = 200  # images whose headers choose the size they are embedded at
DECODE_CHUNK = 1000  # images decoded and embedded together
SUGGESTED = 200  # images the label-next queue holds at once, chosen by active learning


@dataclass(frozen=True)
class ReviewItem:
    path: str
    kind: str  # a doctor's finding kind: label, duplicate or leak
    detail: str  # what the doctor measured, in words
    suggested: tuple[str, ...] | None  # label findings: what it most probably is
    other: str | None  # copies: the image it copies


@dataclass
class Head:
    """A linear classifier on the embeddings, fitted on the labels of its time."""

    probabilities: np.ndarray  # (N, K): every image's
    labels: int  # labelled images it was fitted on
    seconds: float
    fitted_at: float  # time.time()


@dataclass
class Workspace:
    root: Path
    files: list[str]  # the folder's images, '/'-separated paths relative to it, sorted
    classes: tuple[str, ...]
    multi_label: bool
    store: LabelStore
    review: list[ReviewItem]
    copies: np.ndarray  # (N,) the doctor's copy group of each image, -1: none
    cache: Path
    seed: int = 0
    embeddings: np.ndarray | None = None
    unreadable: list[str] = field(default_factory=list)
    head: Head | None = None
    next_order: list[str] = field(default_factory=list)  # the label-next queue, best first
    status: str = "embedding the images"
    auto_retrain: bool = True  # the page retrains the head every few decisions
    _training: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.index = {name: i for i, name in enumerate(self.files)}

    def prepare_in_background(self) -> None:
        """`prepare`, its failure said on the page (status) and in the log rather than lost with its thread."""
        try:
            self.prepare()
        except Exception as error:  # a thread's failure has nowhere else to go
            self.status = f"could not embed the images: {error}"
            log.error("%s", self.status)

    def prepare(self) -> None:
        """Embed every image (cached by pixels), then fit the first head and order the label-next queue."""
        started = time.perf_counter()
        self.embeddings, self.unreadable = embed_folder(self.root, self.files, self.cache)
        self.status = f"embedded {len(self.files):,} images in {time.perf_counter() - started:.0f} s"
        self.retrain()

    def suggestion(self, n: int, targets: np.ndarray | None = None) -> Suggestion:
        """The `n` images to label next (`active.suggest`), never an unreadable one; `targets`: the labels the head
        was fitted on (default: the current ones)."""
        assert self.embeddings is not None, "prepare() first"
        eligible = np.ones(len(self.files), bool)
        eligible[[self.index[name] for name in self.unreadable]] = False
        head = self.head.probabilities if self.head is not None else None
        return suggest(
            self.embeddings,
            targets if targets is not None else self.targets(),
            len(self.classes),
            n,
            copies=self.copies,
            eligible=eligible,
            probabilities=head,
            seed=self.seed,
        )

    def targets(self) -> np.ndarray:
        """(N,) class indices, -1 unlabelled or excluded; multi-label: (N, K) multi-hot, rows of -1 likewise."""
        column = {name: k for k, name in enumerate(self.classes)}
        width = len(self.classes) if self.multi_label else 1
        targets = np.full((len(self.files), width), -1, np.int64)
        for name, entry in self.store.entries.items():
            if entry.labels is None or entry.excluded or name not in self.index:
                continue
            if self.multi_label:
                targets[self.index[name]] = 0
                targets[self.index[name], [column[label] for label in entry.labels]] = 1
            elif entry.labels:
                targets[self.index[name], 0] = column[entry.labels[0]]
        return targets if self.multi_label else targets[:, 0]

    def retrain(self) -> bool:
        """Fit the head on the current labels (seconds) and choose the label-next queue again; False when a
        retraining is already running or the embeddings are not there yet."""
        if self.embeddings is None or not self._training.acquire(blocking=False):
            return False
        try:
            started = time.perf_counter()
            targets = self.targets()
            labelled = targets.reshape(len(targets), -1).min(1) >= 0
            known = np.unique(targets[labelled]) if not self.multi_label else np.flatnonzero(targets[labelled].sum(0))
            if len(known) >= 2:
                probabilities = fitted_probabilities(
                    self.embeddings[labelled], targets[labelled], self.embeddings, len(self.classes), self.seed
                )
                seconds = time.perf_counter() - started
                self.head = Head(probabilities, int(labelled.sum()), seconds, time.time())
            chosen = self.suggestion(SUGGESTED, targets)
            self.next_order = [self.files[row] for row in chosen.rows]
            self.status = f"label next: {chosen.method}"
            return True
        finally:
            self._training.release()

    def top(self, name: str, count: int = 3) -> list[tuple[str, float]]:
        """The head's most probable classes for image `name`; empty before the first head."""
        if self.head is None:
            return []
        row = self.head.probabilities[self.index[name]]
        return [(self.classes[k], float(row[k])) for k in np.argsort(-row)[:count]]

    def reviewed(self) -> set[str]:
        return {decision.path for decision in self.store.history if decision.queue == "review"}


def image_files(root: Path, label_file: Path) -> list[str]:
    """The folder's image files, by suffix, as '/'-separated paths relative to it."""
    if not root.is_dir():
        raise CnnlabError(f"{root}: not a folder of images (the labelling page reads a folder, not an archive)")
    listing = walk_files(root)
    names = ["/".join(found.parts) for found in listing.files if found.parts[-1].lower().endswith(IMAGE_SUFFIXES)]
    if not names:
        raise CnnlabError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [name for name in names if (root / name) != label_file]


def folder_labels(root: Path, files: list[str]) -> dict[str, tuple[str, ...]]:
    """The labels the folder's class folders give, or none when it is not laid out by class."""
    try:
        layout = read_layout(root, [tuple(name.split("/")) for name in files])
    except CnnlabError:
        return {}
    return {files[index]: (label,) for index, label, _ in layout.placed}


def open_workspace(
    root: Path,
    labels: Path | None = None,
    classes: tuple[str, ...] = (),
    doctor: Path | None = None,
    multi_label: bool = False,
    cache: Path | None = None,
) -> Workspace:
    """The workspace of folder `root` and its label file `labels` (default: `root`/labels.csv; created at the
    first decision, from the class folders' labels when there are). The classes are `classes` and every label the
    file holds."""
    labels = labels or root / "labels.csv"
    files = image_files(root, labels)
    initial = folder_labels(root, files) if not labels.exists() else {}
    store = LabelStore(labels, files, initial)
    held = {label for entry in store.entries.values() for label in entry.labels or ()}
    unknown = sorted(held - set(classes)) if classes else []
    if unknown:
        store.close()
        raise CnnlabError(f"{labels}: labels {', '.join(unknown[:5])} are not among --classes {','.join(classes)}")
    every = tuple(classes) or tuple(sorted(held))
    if len(every) < 2:
        store.close()
        raise CnnlabError(f"{labels}: {len(every)} class(es) known; name them with --classes cat,dog,...")
    multi = multi_label or any(len(entry.labels or ("",)) != 1 for entry in store.entries.values())
    review, copies = read_review(doctor, files) if doctor else ([], np.full(len(files), -1, np.int64))
    return Workspace(root, files, every, multi, store, review, copies, cache or cache_root(None))


def read_review(doctor: Path, files: list[str]) -> tuple[list[ReviewItem], np.ndarray]:
    """The doctor.json's findings a person decides on, in its order (most suspicious first), and the copy group of
    each image; refused when none of its images is in the folder."""
    try:
        report: dict[str, Any] = json.loads(doctor.read_text())
        findings = [f for f in report["findings"] if f["kind"] in REVIEWED_KINDS]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CnnlabError(f"{doctor}: not a readable doctor.json ({error})") from None
    present = set(files)
    items, groups = [], np.arange(len(files))
    index = {name: i for i, name in enumerate(files)}
    for finding in findings:
        path = finding["image"].get("path")
        other = (finding.get("other") or {}).get("path")
        if path not in present or (other is not None and other not in present):
            continue
        suggested = finding.get("suggested")
        labels = tuple(suggested.split(";")) if suggested else None
        items.append(ReviewItem(path, finding["kind"], finding["detail"], labels, other))
        if other is not None:  # union the two copies' groups
            first, second = _root(groups, index[path]), _root(groups, index[other])
            groups[max(first, second)] = min(first, second)
    if findings and not items:
        raise CnnlabError(f"{doctor}: none of its images is in this folder; run cnnlab doctor on this data")
    roots = np.array([_root(groups, row) for row in range(len(files))])
    sizes = np.bincount(roots, minlength=len(files))
    return items, np.where(sizes[roots] > 1, roots, -1).astype(np.int64)


def _root(groups: np.ndarray, row: int) -> int:
    while groups[row] != row:
        groups[row] = groups[groups[row]]
        row = int(groups[row])
    return row


def embed_folder(root: Path, files: list[str], cache: Path) -> tuple[np.ndarray, list[str]]:
    """(N, 1280) embeddings of the folder's images (zeros for the unreadable ones, listed) and that list; all are
    decoded at one size chosen from a sample of their headers."""
    side = _decoded_side(root, files)
    embeddings = np.zeros((len(files), EMBEDDING_WIDTH), np.float32)
    unreadable: list[str] = []
    for start in range(0, len(files), DECODE_CHUNK):
        pixels, rows = [], []
        for row in range(start, min(start + DECODE_CHUNK, len(files))):
            try:
                pixels.append(image_io.decode(str(root / files[row]), files[row], (side, side), 3))
                rows.append(row)
            except image_io.ImageError as error:
                unreadable.append(files[row])
                log.warning("%s", error)
        if pixels:
            batch = np.stack(pixels)
            embeddings[rows] = embed(batch, pixel_digests(batch), cache)
    return embeddings, unreadable


def _decoded_side(root: Path, files: list[str]) -> int:
    """The images' own side when a sample of them is small and square (CIFAR's 32), else the embedding's size."""
    step = max(1, len(files) // HEADER_SAMPLE)
    sides = []
    for name in files[::step]:
        try:
            found = image_io.header(str(root / name), name)
        except image_io.ImageError:
            continue
        sides.append(max(found.height, found.width))
    median = int(np.median(sides)) if sides else 224
    return median if median < 96 else embedding_size(ImageShape(3, median, median))
