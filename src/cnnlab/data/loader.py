"""Batch loaders: what a training step or an evaluation reads, in what order, from memory or from disk.

A training epoch is fixed by the loader's generator alone: its permutation of the train split, the
alternating-flip half, and the flip and shift draws, all drawn for the global batch so that the run does
not depend on how many processes share it; each process then takes its contiguous shard. The generator's
state (and the state it had when the epoch's permutation was drawn) is what a checkpoint keeps.

Two sources of pixels give the same batches, bit for bit: the split held in memory (moved to the training
device once), and a uint8 .npy copy in the cache read as a memmap by a thread that gathers the next batch
while the current one trains.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from cnnlab.atomic import atomic_write, make_folder
from cnnlab.config import AugmentConfig
from cnnlab.data.augment import (
    alternating_flips,
    mirror,
    random_crop_boxes,
    random_flips,
    random_jitter,
    random_shifts,
    resized_crops,
    translate,
)
from cnnlab.data.dataset import Pixels, Split
from cnnlab.data.disk_images import DiskImages
from cnnlab.data.transforms import images_within
from cnnlab.machine import memory_bytes

LoaderKind = Literal["auto", "memory", "disk"]
EVALUATION_BATCH, EVALUATION_PIXELS = 1000, 4 * 2**20  # at most, per evaluation batch: images, and their H x W summed
MEMORY_SHARE = 0.25  # the share of the machine's memory above which `auto` trains from disk


def shard(count: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous part of `count` items split `world_size` ways; sizes differ by at most one."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # (b, H, W, C) uint8 on the training device: this process's shard, augmented
    labels: torch.Tensor  # (b,) int64 class indices, or (b, K) uint8 multi-hot
    count: int  # images of the global batch in this shard; 0: a one-image placeholder that must count for nothing
    size: int  # images in the global batch
    jitter: torch.Tensor | None = None  # (b, 2): each image's brightness shift and contrast scale, after normalising
    indices: torch.Tensor | None = None  # (size,) with selection: the global batch's train-split indices, rank order


class PixelSource(Protocol):
    def stream(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images (b, H, W, C) uint8, labels (b,)) on the device for each tensor of train-split indices."""
        ...


class InMemory:
    """The split moved to the training device once; a batch is one gather there."""

    def __init__(self, split: Split, device: torch.device):
        self.images = torch.from_numpy(np.ascontiguousarray(split.images)).to(device)
        self.labels = torch.from_numpy(split.labels).to(device)

    def stream(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices in batches:
            on_device = indices.to(self.images.device)
            yield self.images[on_device], self.labels[on_device]


class OnDisk:
    """The split's uint8 pixels read from a .npy file batch by batch (`DiskImages`): the page cache, not the
    process, holds them. A reader thread reads each batch one step ahead."""

    def __init__(self, images: DiskImages, labels: np.ndarray, device: torch.device):
        self.pixels = images
        self.labels = torch.from_numpy(labels)
        self.device = device

    def _gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(self.pixels[indices.numpy()])
        return images.to(self.device), self.labels[indices].to(self.device)

    def stream(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnlab-reader") as reader:
            ahead: Future[tuple[torch.Tensor, torch.Tensor]] | None = None
            for position in range(len(batches)):
                current = ahead.result() if ahead is not None else self._gather(batches[position])
                ahead = reader.submit(self._gather, batches[position + 1]) if position + 1 < len(batches) else None
                yield current


def disk_copy(split: Split, cache_root: Path) -> Path:
    """The split's pixels as an uncompressed .npy in the cache, named by their SHA-256: written once."""
    digest = hashlib.sha256(np.ascontiguousarray(split.images).data).hexdigest()[:32]
    path = cache_root / "arrays" / f"{digest}.npy"
    if not path.is_file():
        make_folder(path.parent)
        atomic_write(path, lambda handle: np.save(handle, split.images))
    return path


class TrainBatches:
    """The training batches of each epoch, for one process of `world_size`."""

    def __init__(
        self,
        split: Split,
        source: PixelSource,
        augment: AugmentConfig,
        *,
        batch_size: int,
        seed: int,
        select_share: float = 1.0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.source, self.batch_size = source, batch_size
        self.flip, self.max_shift = augment.flip, augment.translate
        self.crop_area = augment.crop_area  # random-resized crops of at least this share of the area; 1: none
        self.jitter = augment.color_jitter  # the largest brightness shift and contrast change; 0: none
        self.rank, self.world_size = rank, world_size
        self.size = len(split)
        # Hard-example selection: an epoch trains on the `selected` images with the highest loss when last
        # trained on (+inf: never yet), so that the unseen come first and the rest by how badly they were fitted.
        self.selected = max(1, math.ceil(self.size * select_share))
        self.last_loss = torch.full((self.size,), math.inf) if self.selecting else None
        self.order: torch.Tensor | None = None  # a selecting epoch's order: the losses it was drawn from change
        self.steps_per_epoch = -(-self.selected // batch_size)
        self.random = torch.Generator().manual_seed(seed + 1)  # data order and augmentation
        # A fixed random half of the images, mirrored on odd epochs (the other half on even ones).
        self.flip_half = torch.rand(self.size, generator=torch.Generator().manual_seed(seed + 2)) < 0.5
        self.order_state = self.random.get_state()  # the generator's state when this epoch's order was drawn

    def epoch(self, epoch: int, steps: int, done: int = 0) -> Iterator[tuple[int, Batch]]:
        """Steps done+1 .. `steps` of `epoch` (1-based). With `done` > 0 this continues the epoch that a
        checkpoint stopped in: the permutation is redrawn from `order_state` (a selecting epoch's order is kept
        whole, as the losses it was selected by have changed since), the draws go on from `random`."""
        order = self.order if done and self.order is not None else self.permutation(resumed=done > 0)
        if not done:
            order = self._selected(order)
        flips = alternating_flips(self.flip_half, epoch) if self.flip == "alternating" else None
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        shares = [self._share(len(batch)) for batch in batches[done:steps]]
        pixels = self.source.stream([batch[mine] for batch, (mine, _) in zip(batches[done:steps], shares, strict=True)])
        for step, batch, (mine, count), (images, labels) in zip(
            range(done + 1, steps + 1), batches[done:steps], shares, pixels, strict=True
        ):
            # Drawn for the whole global batch, so the generator moves the same way whatever the processes.
            flip_mask = flips[batch] if flips is not None else None
            if self.flip == "random":
                flip_mask = random_flips(len(batch), self.random)
            shifts = random_shifts(len(batch), self.max_shift, self.random) if self.max_shift else None
            boxes = random_crop_boxes(len(batch), self.crop_area, self.random) if self.crop_area < 1 else None
            jitter = random_jitter(len(batch), self.jitter, self.random) if self.jitter else None
            if flip_mask is not None:
                images = mirror(images, flip_mask[mine])
            if shifts is not None:
                images = translate(images, shifts[mine])
            if boxes is not None:
                images = resized_crops(images, boxes[mine])
            jittered = jitter[mine] if jitter is not None else None
            yield step, Batch(images, labels, count, len(batch), jittered, batch if self.selecting else None)

    def permutation(self, resumed: bool = False) -> torch.Tensor:
        """A new epoch's order of the split's images, drawn from `random`; `resumed`: the order of the epoch in
        progress again, redrawn from the generator's state when it was first drawn (the draws go on as they were)."""
        if not resumed:
            self.order_state = self.random.get_state()
            return torch.randperm(self.size, generator=self.random)
        current = self.random.get_state()
        self.random.set_state(self.order_state)
        order = torch.randperm(self.size, generator=self.random)
        self.random.set_state(current)
        return order

    @property
    def selecting(self) -> bool:
        return self.selected < self.size

    def _selected(self, order: torch.Tensor) -> torch.Tensor:
        """The images of `order` (a permutation) that this epoch trains on, in that order: all of them, or with
        selection the `selected` highest last losses, ties (the unseen) broken by `order`."""
        if self.last_loss is None:
            return order
        ranked = order[torch.argsort(self.last_loss[order], descending=True, stable=True)]
        chosen = torch.zeros(self.size, dtype=torch.bool)
        chosen[ranked[: self.selected]] = True
        self.order = order[chosen[order]]
        return self.order

    def record_losses(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """The loss each image of a global batch (`indices`) had in the step that just trained on it."""
        if self.last_loss is not None:
            self.last_loss[indices] = losses.float().cpu()

    def _share(self, size: int) -> tuple[slice, int]:
        """This process's slice of a global batch of `size`, and how many images it really holds."""
        mine = shard(size, self.rank, self.world_size)
        count = mine.stop - mine.start
        # Fewer images than processes: DDP still needs this process's step, on one image worth nothing.
        return (mine if count else slice(0, 1)), count

    def state_dict(self) -> dict[str, Any]:
        selection = {"last_loss": self.last_loss, "order": self.order} if self.selecting else {}
        return {"generator": self.random.get_state(), "order_state": self.order_state} | selection

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.random.set_state(state["generator"])
        self.order_state = state["order_state"]
        if self.selecting:
            self.last_loss, self.order = state["last_loss"], state["order"]


def make_source(kind: LoaderKind, split: Split, device: torch.device, cache_root: Path) -> PixelSource:
    """Batches from memory or from disk; `auto` reads from disk a split that is there already and would take
    more than MEMORY_SHARE of this machine's memory."""
    if kind == "auto":
        on_disk = isinstance(split.images, DiskImages)
        kind = (
            "disk"
            if on_disk and split.images.shape[0] * split.images[0].nbytes > MEMORY_SHARE * memory_bytes()
            else "memory"
        )
    if kind == "disk":
        images = split.images if isinstance(split.images, DiskImages) else DiskImages(disk_copy(split, cache_root))
        return OnDisk(images, split.labels, device)
    return InMemory(split, device)


def in_order(images: Pixels, batch_size: int | None = None) -> Iterator[torch.Tensor]:
    """(b, H, W, C) uint8 CPU tensors of consecutive images: how evaluation reads a split. By default a batch
    holds up to EVALUATION_BATCH images, fewer for large ones (EVALUATION_PIXELS in all): the activations of a
    network at 224 px would otherwise take gigabytes."""
    if batch_size is None:
        _, height, width, _ = images.shape
        batch_size = images_within(EVALUATION_PIXELS, height, width, most=EVALUATION_BATCH)
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
