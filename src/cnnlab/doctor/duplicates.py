"""Copies of one image: exact (the same decoded pixels) and near (the same picture, recompressed, resized,
shifted or brightened).

Near copies are found in two steps. Candidates: each image's nearest images by its pretrained embedding and by
a pixel descriptor (the image blurred, shrunk to 6x6 and its mean removed: what survives recompression, resizing
and brightness). Then each candidate pair is compared pixel by pixel: the normalised correlation of the two
images at 16x16, at the best of their alignments within one pixel (two at 32 px) — what a copy keeps and two
merely similar pictures do not. The threshold on that correlation is measured on the data itself: a seeded
sample of its images is copied four ways (JPEG at quality 75, halved and enlarged again, shifted by 2 pixels,
brightened by 10%) and the threshold set so that CALIBRATION_RECALL of those copies reach it. The searches
compare blocks of images against all the others, keeping the nearest: their memory grows with the number of
images, never with its square.
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from cnnlab.progress import Advance

CALIBRATION_IMAGES = 250  # images copied each way
CALIBRATION_RECALL = 0.99  # the share of the measured copies the threshold keeps
NEIGHBOURS = 10  # nearest images kept per image, by embedding and by pixel descriptor
DESCRIPTOR_SIDE, COMPARED_SIDE, SHIFT = 6, 16, 1  # pixels; SHIFT: the alignments tried, at COMPARED_SIDE
EMBEDDING_DIMENSIONS = 128  # the embedding's principal components the neighbour search compares
_BLOCK = 1024  # query images per block of a search
_PAIRS = 8192  # candidate pairs compared at once


@dataclass(frozen=True)
class Calibration:
    threshold: float  # aligned correlation at or above which two images are near copies
    similarities: dict[str, list[float]]  # per way of copying, the measured copies' correlation with their original
    sample: int  # images copied each way


@dataclass(frozen=True)
class Neighbours:
    """Each image's nearest other images (rows: images; columns: nearest first), by cosine similarity."""

    indices: np.ndarray  # (N, NEIGHBOURS) int64 rows; -1 where there are fewer other images
    similarities: np.ndarray  # (N, NEIGHBOURS) float32


def copies(image: np.ndarray) -> dict[str, np.ndarray]:
    """The four measured ways to copy an (H, W, C) uint8 image."""
    height, width, channels = image.shape
    picture = Image.fromarray(image[..., 0] if channels == 1 else image)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=75)
    recompressed = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert(picture.mode))
    small = picture.resize((max(1, width // 2), max(1, height // 2)), Image.Resampling.BILINEAR)
    resized = np.asarray(small.resize((width, height), Image.Resampling.BILINEAR))
    shifted = np.roll(image, (2, 2), axis=(0, 1))
    shifted[:2], shifted[:, :2] = shifted[2:3], shifted[:, 2:3]  # the uncovered edge repeats the image's edge
    brightened = np.asarray(ImageEnhance.Brightness(picture).enhance(1.1))
    made = {"jpeg-75": recompressed, "resized": resized, "shifted": shifted, "brightened": brightened}
    return {way: pixels.reshape(height, width, channels) for way, pixels in made.items()}


def _shrunk(batch: torch.Tensor, side: int) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, side, side) float, blurred (3x3 box) and area-averaged."""
    x = batch.permute(0, 3, 1, 2).float()
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    return F.interpolate(x, size=(side, side), mode="area")


def views_of(batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per image of a (B, H, W, C) uint8 batch: its pixel descriptor, (B, C x 6 x 6) float32 of unit length, and
    its COMPARED_SIDE view, (B, C, 16, 16) uint8 — all the pair comparisons read."""
    small = _shrunk(batch, DESCRIPTOR_SIDE).flatten(1)
    descriptors = F.normalize(small - small.mean(1, keepdim=True), dim=1).numpy()
    return descriptors, _shrunk(batch, COMPARED_SIDE).round().to(torch.uint8).numpy()


def aligned_similarity(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(P,) the normalised correlation of each pair of (P, C, S, S) views at the best of their alignments
    within SHIFT pixels, over the pixels they share."""
    a, b = torch.from_numpy(first).float(), torch.from_numpy(second).float()
    side = a.shape[-1]
    best = torch.full((len(a),), -1.0)
    for dy in range(-SHIFT, SHIFT + 1):
        for dx in range(-SHIFT, SHIFT + 1):
            rows, columns = slice(max(dy, 0), side + min(dy, 0)), slice(max(dx, 0), side + min(dx, 0))
            rows_b, columns_b = slice(max(-dy, 0), side + min(-dy, 0)), slice(max(-dx, 0), side + min(-dx, 0))
            x, y = a[:, :, rows, columns].flatten(1), b[:, :, rows_b, columns_b].flatten(1)
            x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
            best = torch.maximum(best, F.cosine_similarity(x, y, dim=1, eps=1e-3))
    return best.numpy()


def calibrate(images: np.ndarray, views: np.ndarray) -> Calibration:
    """The near-copy threshold, from `images` (a sample, (S, H, W, C) uint8) whose views are `views`."""
    made = [copies(image) for image in images]
    similarities: dict[str, list[float]] = {}
    for way in made[0] if made else []:
        _, copied = views_of(torch.from_numpy(np.stack([copy[way] for copy in made])))
        similarities[way] = aligned_similarity(copied, views).round(4).tolist()
    measured = np.concatenate(list(similarities.values())) if similarities else np.ones(1)
    threshold = float(np.quantile(measured, 1 - CALIBRATION_RECALL))
    return Calibration(threshold=round(threshold, 4), similarities=similarities, sample=len(images))


def reduced(embeddings: np.ndarray) -> np.ndarray:
    """The embeddings on their EMBEDDING_DIMENSIONS principal components, of unit length: a neighbour search
    10x cheaper than on all 1280 numbers."""
    if embeddings.shape[1] <= EMBEDDING_DIMENSIONS or len(embeddings) <= EMBEDDING_DIMENSIONS:
        return embeddings
    x = torch.from_numpy(embeddings)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # pca_lowrank draws a random sketch; the same one every time
    mean = x.mean(0)
    _, _, components = torch.pca_lowrank(x - mean, q=EMBEDDING_DIMENSIONS, center=False, niter=4)
    torch.random.set_rng_state(generator_state)
    return F.normalize((x - mean) @ components, dim=1).numpy()


def nearest_neighbours(vectors: np.ndarray, advance: Advance | None = None) -> Neighbours:
    """Each row's NEIGHBOURS most similar other rows of `vectors` (unit length), block by block."""
    count = len(vectors)
    keep = min(NEIGHBOURS, max(count - 1, 0))
    indices = np.full((count, NEIGHBOURS), -1, np.int64)
    similarities = np.full((count, NEIGHBOURS), -1.0, np.float32)
    everything = torch.from_numpy(vectors)
    for start in range(0, count, _BLOCK):
        block = everything[start : start + _BLOCK]
        scores = block @ everything.T
        scores[torch.arange(len(block)), torch.arange(start, start + len(block))] = -2.0  # not itself
        if keep:
            best, where = scores.topk(keep, dim=1)
            indices[start : start + len(block), :keep] = where.numpy()
            similarities[start : start + len(block), :keep] = best.numpy()
        if advance:
            advance(len(block))
    return Neighbours(indices, similarities)


def candidate_pairs(*found: Neighbours) -> np.ndarray:
    """(P, 2) every pair of an image and one of its neighbours, once each (first < second)."""
    pairs = []
    for neighbours in found:
        rows = np.broadcast_to(np.arange(len(neighbours.indices))[:, None], neighbours.indices.shape)
        valid = neighbours.indices >= 0
        pairs.append(np.stack([rows[valid], neighbours.indices[valid]], 1))
    joined = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    return np.unique(np.sort(joined, axis=1), axis=0)


def near_pairs(
    pairs: np.ndarray, views: np.ndarray, threshold: float, advance: Advance | None = None
) -> list[tuple[int, int, float]]:
    """(row, other row, aligned similarity) of the candidate `pairs` at or above `threshold`."""
    found = []
    for start in range(0, len(pairs), _PAIRS):
        chunk = pairs[start : start + _PAIRS]
        similarity = aligned_similarity(views[chunk[:, 0]], views[chunk[:, 1]])
        for (first, second), value in zip(chunk.tolist(), similarity.tolist(), strict=True):
            if value >= threshold:
                found.append((first, second, value))
        if advance:
            advance(len(chunk))
    return found


def exact_groups(digests: np.ndarray) -> list[np.ndarray]:
    """Groups (each of at least two rows, in row order) of images with identical pixels."""
    rows: defaultdict[bytes, list[int]] = defaultdict(list)
    for row, digest in enumerate(digests.tolist()):
        rows[digest].append(row)
    return [np.array(group) for group in rows.values() if len(group) > 1]
