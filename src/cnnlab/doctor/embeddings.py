"""What the doctor sees in each image: its pixels' digest, and a pretrained network's embedding of it.

The embedding is efficientnet-lite0's pooled ImageNet features (1280 numbers, scaled to unit length), with
each image resized to `embedding_size` pixels per side first. Embeddings are cached by the digest of the
pixels they were computed from, so a dataset examined again, a copy of it with other labels or other splits,
or one with a few images added, costs only the images not seen before.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cnnlab.atomic import atomic_write, make_folder
from cnnlab.data.dataset import ImageShape, Pixels, match_channels
from cnnlab.data.loader import in_order
from cnnlab.data.transforms import to_input
from cnnlab.machine import resolve_precision
from cnnlab.models import create_model, model_spec
from cnnlab.progress import Advance

EMBEDDER = "efficientnet-lite0"
# Images smaller than this are enlarged to it, larger ones shrunk to their own size up to EMBEDDING_LARGEST.
# On CIFAR-10 (32 px), a linear model on 5,000 images' embeddings scores 41% at 32 px, 65% at 64, 79% at 96 and
# 83% at 128, at 2,960 / 1,400 / 390 / 210 images/s ([A] AMD EPYC, bf16): 96 is the size that examines all of it
# in minutes.
EMBEDDING_SMALLEST, EMBEDDING_LARGEST = 96, 224
EMBEDDING_WIDTH = 1280  # numbers per embedding: the network's pooled features
_VERSION = 2  # bump when the embedding changes, so that cached ones are not reused


def embedding_size(image_shape: ImageShape) -> int:
    """The side, in pixels, the network sees this dataset's images at."""
    return min(max(EMBEDDING_SMALLEST, *image_shape.size), EMBEDDING_LARGEST)


def digests_of(batch: torch.Tensor) -> np.ndarray:
    """(B,) 16-byte digests of a (B, H, W, C) uint8 batch's decoded pixels: equal digests are exact copies."""
    rows = batch.numpy().reshape(len(batch), -1)
    return np.array([hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows], dtype="S16")


def pixel_digests(images: Pixels) -> np.ndarray:
    """(N,) `digests_of` every image."""
    return np.concatenate([digests_of(batch) for batch in in_order(images, 1000)] or [np.zeros(0, "S16")])


def embed(images: Pixels, digests: np.ndarray, cache_root: Path, progress: Advance | None = None) -> np.ndarray:
    """(N, 1280) float32 unit-length embeddings of `images` (`digests`: their `pixel_digests`). Each image is
    looked up by its digest in the cache (whatever dataset, order or label it came with) and only the others are
    computed, then cached as a chunk of their own."""
    size = embedding_size(ImageShape(images.shape[3], images.shape[1], images.shape[2]))
    folder = cache_root / "embeddings" / f"{EMBEDDER}-{size}px-v{_VERSION}"
    embeddings = np.zeros((len(images), EMBEDDING_WIDTH), np.float32)
    missing = np.ones(len(images), bool)
    for chunk in sorted(folder.glob("*.npz")) if folder.exists() else []:
        try:
            with np.load(chunk, allow_pickle=False) as stored:
                known, values = stored["digests"], stored["embeddings"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            continue  # a damaged chunk is computed again
        order = np.argsort(known)
        place = np.searchsorted(known, digests, sorter=order).clip(0, max(len(known) - 1, 0))
        hits = missing & (known[order[place]] == digests) if len(known) else np.zeros_like(missing)
        embeddings[hits] = values[order[place[hits]]]
        missing &= ~hits
    if progress:
        progress(int((~missing).sum()))
    rows = np.flatnonzero(missing)
    if len(rows):
        computed = _compute(images.take(rows, axis=0) if len(rows) < len(images) else images, size, progress)
        embeddings[rows] = computed
        make_folder(folder)
        name = hashlib.sha256(digests[rows].tobytes()).hexdigest()[:32]
        arrays: dict[str, Any] = {"digests": digests[rows], "embeddings": computed}
        atomic_write(folder / f"{name}.npz", lambda handle: np.savez(handle, **arrays))
    return embeddings


@torch.no_grad()
def _compute(images: Pixels, size: int, progress: Advance | None) -> np.ndarray:
    normalization = model_spec(EMBEDDER).normalization
    model = create_model(EMBEDDER, ImageShape(3, size, size), 2)  # its classifier is never used
    model.load_pretrained()
    model.eval()
    split = model.split_head()
    assert split is not None and normalization is not None  # the family has both
    body, _ = split
    device = torch.device("cpu")
    bf16 = resolve_precision("auto", device) == "bf16"
    rows = []
    for batch in in_order(images, 250):
        x = to_input(torch.from_numpy(np.asarray(match_channels(batch.numpy(), 3))), normalization)
        if x.shape[-2:] != (size, size):  # antialiasing only where shrinking: enlarging runs faster without it
            shrinking = max(x.shape[-2:]) > size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            features = body(x.contiguous(memory_format=torch.channels_last)).float()
        rows.append(F.normalize(features, dim=1).numpy())
        if progress:
            progress(len(batch))
    return np.concatenate(rows) if rows else np.zeros((0, EMBEDDING_WIDTH), np.float32)
