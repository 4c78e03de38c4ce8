"""The one value type for a loaded dataset, and the operations on whole arrays of images."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from cnnlab.data.disk_images import DiskImages
from cnnlab.data.stratify import iterative_stratification
from cnnlab.data.transforms import CHUNK_PIXELS, images_within
from cnnlab.errors import CnnlabError, ConfigError
from cnnlab.machine import memory_bytes

Pixels = np.ndarray | DiskImages  # (N, H, W, C) uint8 images, in memory or read from disk as they are needed
# A split's labels: (N,) int64 class indices, one class per image; or, for multi-label data, (N, K) uint8
# multi-hot rows, 1 where the image carries class k (a row of zeros: none of the classes).
Labels = np.ndarray


class ImageShape(NamedTuple):
    """The shape of an image as a network takes it: channels, height and width in pixels."""

    channels: int
    height: int
    width: int

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.height, self.width

    @property
    def hwc(self) -> tuple[int, int, int]:
        """(height, width, channels): the layout of the stored uint8 pixels."""
        return self.height, self.width, self.channels


class SplitName(StrEnum):
    """The parts of a dataset, by the names metrics, reports and messages give them."""

    TRAIN = "train"
    VAL = "val"  # validation: what early stopping watches
    TEST = "test"  # what the model is scored on

    @property
    def in_words(self) -> str:
        return {"train": "training", "val": "validation", "test": "test"}[self.value]


@dataclass(frozen=True)
class Split:
    images: Pixels
    labels: Labels  # indices into Dataset.classes, or multi-hot rows over them
    # Where each image came from, for sources that have files: its path inside the dataset ("train/cat/1.png"),
    # and its size before resizing, (N, 2) int (height, width) in pixels. None for array sources (CIFAR, digits).
    names: np.ndarray | None = None
    native_sizes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, C) uint8, got {self.images.shape} {self.images.dtype}")
        if self.labels.ndim not in (1, 2) or len(self.labels) != len(self.images):
            count = len(self.images)
            raise ValueError(f"labels must be ({count},) or ({count}, K), got {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> Split:
        """The images at `indices`: copied when in memory, still on disk when on disk."""
        names = self.names[indices] if self.names is not None else None
        native = self.native_sizes[indices] if self.native_sizes is not None else None
        return Split(self.images.take(indices, axis=0), self.labels[indices], names, native)

    def name_of(self, index: int) -> str | None:
        """The path of image `index` inside the dataset, when it came from a file."""
        return str(self.names[index]) if self.names is not None else None


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: tuple[str, ...]  # index -> name, sorted for folders, official order for CIFAR
    train: Split
    test: Split
    val: Split | None = None
    layout: str = ""  # how the source was read into splits and classes, in words

    @property
    def multi_label(self) -> bool:
        """Whether each image carries a set of the classes (multi-hot labels) rather than one."""
        return self.train.labels.ndim == 2

    def as_multi_label(self) -> Dataset:
        """The same images with each one's class as a set of one: trained with a sigmoid per class."""
        if self.multi_label:
            return self
        eye = np.eye(len(self.classes), dtype=np.uint8)
        val = replace(self.val, labels=eye[self.val.labels]) if self.val is not None else None
        return replace(
            self,
            train=replace(self.train, labels=eye[self.train.labels]),
            val=val,
            test=replace(self.test, labels=eye[self.test.labels]),
        )

    @property
    def image_shape(self) -> ImageShape:
        """The shape of every image."""
        height, width, channels = self.train.images.shape[1:]
        return ImageShape(channels, height, width)

    def with_validation(self, fraction: float, seed: int) -> Dataset:
        """Carve a stratified validation split out of train."""
        if fraction <= 0:
            return self
        if self.val is not None:
            raise ConfigError(
                f"{self.name} has its own validation split ({len(self.val)} images); leave data.val_fraction at 0",
                "data.val_fraction",
            )
        train, val = split_stratified(self.train, fraction, seed, "validation")
        return replace(self, train=train, val=val)

    def splits(self) -> dict[SplitName, Split]:
        """The splits there are, by name, in the order train, val, test."""
        present = {SplitName.TRAIN: self.train, SplitName.VAL: self.val, SplitName.TEST: self.test}
        return {name: split for name, split in present.items() if split is not None}

    def class_counts(self) -> dict[SplitName, np.ndarray]:
        """Images per class, (K,) int, in each split there is."""
        return {name: class_counts(split.labels, len(self.classes)) for name, split in self.splits().items()}

    def summary(self) -> list[str]:
        """What was loaded, for the user to check before training: the layout read, the splits and their size,
        and the images per class in each split (the smallest and largest when there are many classes)."""
        channels, height, width = self.image_shape
        sizes = ", ".join(f"{name} {len(split):,}" for name, split in self.splits().items())
        lines = [f"data: {self.name}{f' ({self.layout})' if self.layout else ''}"]
        lines.append(f"  {len(self.classes)} classes, {width}x{height}x{channels}; images: {sizes}")
        if self.multi_label:
            per_image = np.bincount(self.train.labels.sum(1))
            spread = ", ".join(f"{count:,} with {labels}" for labels, count in enumerate(per_image) if count)
            lines.append(
                f"  multi-label: a sigmoid per class; {self.train.labels.sum(1).mean():.2f} labels per training "
                f"image ({spread}); "
                + (
                    "a threshold per class, the best for its F1 on the validation split"
                    if self.val is not None
                    else "every class at 0.5, as no validation split is there to choose thresholds on"
                )
            )
        counts = self.class_counts()
        header = "/".join(counts)
        if len(self.classes) <= 12:
            per_class = ", ".join(
                f"{name} {'/'.join(str(values[i]) for values in counts.values())}"
                for i, name in enumerate(self.classes)
            )
            lines.append(f"  per class ({header}): {per_class}")
        else:
            train = counts[SplitName.TRAIN]
            lines.append(f"  per class in train: {train.min()} to {train.max()} images")
        return lines


def concatenate_images(parts: list[Pixels]) -> Pixels:
    """The images of `parts` one after another: still on disk when they are all rows of one file on disk."""
    if parts and all(isinstance(part, DiskImages) for part in parts):
        disk = [part for part in parts if isinstance(part, DiskImages)]
        if len({part.path for part in disk}) == 1:
            return disk[0].view(np.concatenate([part.rows for part in disk]))
    return np.concatenate([np.asarray(part) for part in parts])


def class_counts(labels: Labels, classes: int) -> np.ndarray:
    """(K,) int: the images of each class (for multi-label data, the images that carry it)."""
    if labels.ndim == 2:
        counts: np.ndarray = labels.sum(0, dtype=np.int64)
        return counts
    return np.bincount(labels, minlength=classes)


def split_stratified(split: Split, fraction: float, seed: int, purpose: str) -> tuple[Split, Split]:
    """Hold out `fraction` of a split, keeping class proportions (for multi-label data, by iterative
    stratification, which brings every label, rare ones too, into both parts); returns (kept, held_out)."""
    if not 0 < fraction < 1:
        raise CnnlabError(f"the {purpose} fraction must be between 0 and 1, got {fraction}")
    if split.labels.ndim == 2:
        held = iterative_stratification(split.labels, fraction, seed)
        if held.all() or not held.any():
            raise CnnlabError(f"cannot carve a {purpose} split of {fraction} from {len(split)} images")
        return split.take(np.flatnonzero(~held)), split.take(np.flatnonzero(held))
    smallest = min(Counter(split.labels.tolist()).values())
    if smallest < 2:
        raise CnnlabError(f"cannot carve a stratified {purpose} split: a class has only {smallest} image")
    try:
        kept, held = train_test_split(
            np.arange(len(split)), test_size=fraction, random_state=seed, stratify=split.labels
        )
    except ValueError as error:
        raise CnnlabError(f"cannot carve a {purpose} split of {fraction} from {len(split)} images: {error}") from None
    return split.take(np.sort(kept)), split.take(np.sort(held))


def resize_images(images: Pixels, size: tuple[int, int]) -> Pixels:
    """Resize (N, H, W, C) uint8 images to `size` = (H, W), bilinear with antialiasing when shrinking."""
    if images.shape[1:3] == size:
        return images
    count, height, width, channels = images.shape
    needed, available = count * size[0] * size[1] * channels, memory_bytes()
    if needed > available:
        raise ConfigError(
            f"data.image_size {size[0]}: {count:,} images at {size[0]}x{size[1]} take {needed / 1e9:,.1f} GB, "
            f"more than the {available / 1e9:,.1f} GB of memory here; choose a smaller data.image_size",
            "data.image_size",
        )
    resized = []
    # Chunks bound the float copies' memory, of the images as they are and as they become.
    step = images_within(CHUNK_PIXELS, max(height, size[0]), max(width, size[1]))
    for start in range(0, len(images), step):
        batch = torch.from_numpy(np.asarray(images[start : start + step])).permute(0, 3, 1, 2).float()  # (B, C, H, W)
        batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
        resized.append(batch.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(resized)


# ITU-R 601-2 luma, the weights Pillow uses for RGB -> L.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def match_channels(images: Pixels, channels: int) -> Pixels:
    """Convert (N, H, W, C) uint8 images between grayscale and RGB, as Pillow's convert would."""
    have = images.shape[-1]
    if have == channels:
        return images
    images = np.asarray(images)
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    if have == 3 and channels == 1:
        luma: np.ndarray = np.rint(images.astype(np.float32) @ _LUMA)[..., None].astype(np.uint8)
        return luma
    raise CnnlabError(f"cannot convert {have}-channel images to {channels} channels")
