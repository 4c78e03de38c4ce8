"""Copies of one image in three tiers: exact (the same decoded pixels), near-exact (the same picture re-encoded,
resized, shifted or brightened) and near duplicates (the same photo cropped, scaled, turned a little, its colours
shifted or re-encoded: see `copies.py`).

Candidates: each image's nearest images by its pretrained embedding and by a pixel descriptor (the image
blurred, shrunk to 6x6 and its mean removed: what survives recompression, resizing and brightness). Each candidate
pair is compared pixel by pixel: the normalised correlation of the two images at 16x16, at the best of their
alignments within one pixel (two at 32 px) — what a near-exact copy keeps and two merely similar pictures do not.
A pair that correlates less, but not much less, is registered: the affine warp of one (scale, aspect, rotation,
shear, shift) that best matches the other is found by gradient ascent from no warp, and the two compared again,
each colour channel normalised on its own (so a colour shift costs nothing) over the central 3/4 of the picture
(where a crop keeps the content). An embedding alone does not separate copies from look-alikes: at 96 px a JPEG
copy's cosine to its original is 0.70 or less for one in 20, while an unrelated image's nearest neighbour is at
0.72 for half of CIFAR-10 ([A]); registered, copies score 0.97 and more, differently labelled nearest images
0.95 at most.

Every threshold is measured on the data itself: a seeded sample of its images is copied each way and a threshold
set so that CALIBRATION_RECALL of those copies reach it (REGISTERED_RECALL for the realistic ways, whose
registration a hard copy may miss); and the registered test is checked on the nearest neighbours of a sample of
images labelled differently from them, which are almost all unrelated: where some of those reach it, the
threshold is raised just above the most similar of them (on CIFAR-10 none does; on smooth landscapes, whose
16x16 views any two horizons match, some do), and the summary says so with the recall left. The searches
compare blocks of images against all the others, keeping the nearest: their memory grows
with the number of images, never with its square.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cnnlab.doctor import copies
from cnnlab.progress import Advance

CALIBRATION_IMAGES = 250  # images copied each way
CALIBRATION_RECALL = 0.99  # the share of the measured near-exact copies the threshold keeps
# The share of the realistic copies the registered threshold keeps. At 0.95 on CIFAR-10 ([A]), no differently
# labelled nearest pair of 3,000 reaches it.
REGISTERED_RECALL = 0.95
GATE_RECALL = 0.99  # the share of the realistic copies whose aligned correlation passes the gate to registration
UNRELATED_PAIRS = 1000  # differently labelled nearest pairs registered to check the threshold
REGISTRATION_STEPS, REGISTRATION_RATE = 20, 0.1  # Adam's steps and learning rate on the warp's six numbers
# How far the warp may go from none: its linear part's diagonal (scale) and off-diagonal (rotation, shear), and
# its shift in halves of the picture.
WARP_SCALE, WARP_TURN, WARP_SHIFT = 0.3, 0.15, 0.25
NEIGHBOURS = 10  # nearest images kept per image, by embedding and by pixel descriptor
# Of those, the nearest registered (when they pass the gate): registration costs about 1 ms a pair on two cores, and
# a copy is among an image's very nearest.
REGISTERED_NEIGHBOURS = 5
DESCRIPTOR_SIDE, COMPARED_SIDE, SHIFT = 6, 16, 1  # pixels; SHIFT: the alignments tried, at COMPARED_SIDE
EMBEDDING_DIMENSIONS = 128  # the embedding's principal components the neighbour search compares
_BLOCK = 1024  # query images per block of a search
_PAIRS = 8192  # candidate pairs compared at once


@dataclass(frozen=True)
class Calibration:
    threshold: float  # aligned correlation at or above which two images are near-exact copies
    # Per way of copying, the measured copies' similarity with their original: aligned correlation for the
    # near-exact ways, registered correlation for the realistic ones.
    similarities: dict[str, list[float]]
    sample: int  # images copied each way
    gate: float  # aligned correlation at or above which a candidate pair is registered
    copies_threshold: float  # registered correlation REGISTERED_RECALL of the realistic copies reach
    # Nearest pairs of differently labelled images, not near-exact copies, registered to check that threshold.
    unrelated: int
    unrelated_above: int  # of those, how many reach `copies_threshold`
    # Registered correlation at or above which two images are near duplicates: `copies_threshold`, or just above
    # the most similar unrelated pair where some reach it.
    registered_threshold: float
    registered_recall: float  # the share of the realistic copies that reach `registered_threshold`

    def said(self) -> str:
        """The tiers' thresholds and the check, in words."""
        near = f"near duplicates: correlation once registered >= {self.registered_threshold:.3f}"
        if self.unrelated_above:
            near += (
                f" (raised from {self.copies_threshold:.3f}, which {self.unrelated_above} of {self.unrelated} "
                f"differently labelled nearest pairs reached; {self.registered_recall:.0%} of realistic copies "
                "reach it)"
            )
        else:
            near += f", which none of {self.unrelated} differently labelled nearest pairs reach"
        exact = f"near-exact: aligned correlation >= {self.threshold:.3f}"
        return f"{exact}; {near}; calibrated on copies of the data's own images"


@dataclass(frozen=True)
class Neighbours:
    """Each image's nearest other images (rows: images; columns: nearest first), by cosine similarity."""

    indices: np.ndarray  # (N, NEIGHBOURS) int64 rows; -1 where there are fewer other images
    similarities: np.ndarray  # (N, NEIGHBOURS) float32


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


def _channel_correlation(first: torch.Tensor, second: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(P,) the mean over channels of each channel's normalised correlation between the (P, C, S, S) `first` and
    `second`, over the pixels where `mask` (1, 1, S, S) is 1."""
    count = mask.sum()
    x = (first - (first * mask).sum((2, 3), keepdim=True) / count) * mask
    y = (second - (second * mask).sum((2, 3), keepdim=True) / count) * mask
    # Clamped before the root: a flat channel's zero would make its gradient NaN, and grid_sample crashes on NaN.
    norms = (x.square().sum((2, 3)) * y.square().sum((2, 3))).clamp_min((1e-3 * count) ** 2).sqrt()
    return ((x * y).sum((2, 3)) / norms).mean(1)


@torch.enable_grad()
def _registered(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    count, channels, side, _ = first.shape
    mask = torch.zeros(1, 1, side, side)
    border = side // 8
    mask[..., border : side - border, border : side - border] = 1
    identity = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    limits = torch.tensor([WARP_SCALE, WARP_TURN, WARP_SHIFT, WARP_TURN, WARP_SCALE, WARP_SHIFT])
    warp = torch.zeros(count, 6, requires_grad=True)
    optimizer = torch.optim.Adam([warp], lr=REGISTRATION_RATE)
    # Falling to a twentieth of the rate by the last step: a constant rate leaves Adam stepping about the optimum.
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.05 ** (1 / REGISTRATION_STEPS))

    def similarity() -> torch.Tensor:
        theta = (identity + warp).view(count, 2, 3)
        grid = F.affine_grid(theta, [count, channels, side, side], align_corners=False)
        moved = F.grid_sample(second, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return _channel_correlation(first, moved, mask)

    # Adam's first steps move every number by about the learning rate whatever its gradient: the best similarity
    # any step reached is kept, the unwarped one included.
    best = torch.full((count,), -1.0)
    for _ in range(REGISTRATION_STEPS):
        optimizer.zero_grad()
        found = similarity()
        best = torch.maximum(best, found.detach())
        (-found.sum()).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            warp.copy_(torch.maximum(torch.minimum(warp, limits), -limits))
    with torch.no_grad():
        return torch.maximum(best, similarity())


def registered_similarity(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(P,) the similarity of each pair of (P, C, S, S) views once the second is warped to match the first: their
    channels' mean normalised correlation over the central 3/4 of the picture."""
    found = [
        _registered(
            torch.from_numpy(first[start : start + _PAIRS]).float(),
            torch.from_numpy(second[start : start + _PAIRS]).float(),
        )
        for start in range(0, len(first), _PAIRS)
    ]
    return torch.cat(found).numpy() if found else np.zeros(0, np.float32)


def calibrate(
    images: np.ndarray, views: np.ndarray, unrelated: tuple[np.ndarray, np.ndarray], seed: int
) -> Calibration:
    """The copy thresholds, from `images` (a sample, (S, H, W, C) uint8) whose views are `views`, the registered
    one checked on the views of `unrelated` pairs (two (U, C, S, S) arrays)."""
    if not len(images):
        return Calibration(1.0, {}, 0, 1.0, 1.0, 0, 0, 1.0, 0.0)
    similarities: dict[str, list[float]] = {}
    exact = [copies.near_exact_copies(image) for image in images]
    for way in exact[0]:
        similarities[way] = aligned_similarity(_views(np.stack([made[way] for made in exact])), views).tolist()
    rng = np.random.default_rng(seed)
    aligned = []
    for way in copies.REALISTIC:
        copied = _views(np.stack([copies.realistic_copy(image, way, rng) for image in images]))
        aligned.append(aligned_similarity(copied, views))
        similarities[way] = registered_similarity(views, copied).tolist()
    near_exact = np.concatenate([similarities[way] for way in exact[0]])
    realistic = np.concatenate([similarities[way] for way in copies.REALISTIC])
    copies_threshold = round(float(np.quantile(realistic, 1 - REGISTERED_RECALL)), 4)
    near_exact_threshold = round(float(np.quantile(near_exact, 1 - CALIBRATION_RECALL)), 4)
    # A near-exact copy filed under another label is a copy (and a label to check), not an unrelated pair.
    apart = aligned_similarity(*unrelated) < near_exact_threshold if len(unrelated[0]) else np.zeros(0, bool)
    checked = registered_similarity(unrelated[0][apart], unrelated[1][apart])
    above = int((checked >= copies_threshold).sum())
    # Precision first: two pictures as alike as an unrelated pair are not called copies.
    registered_threshold = round(float(checked.max()) + 1e-4, 4) if above else copies_threshold
    return Calibration(
        threshold=near_exact_threshold,
        similarities={way: np.round(values, 4).tolist() for way, values in similarities.items()},
        sample=len(images),
        gate=round(float(np.quantile(np.concatenate(aligned), 1 - GATE_RECALL)), 4),
        copies_threshold=copies_threshold,
        unrelated=len(checked),
        unrelated_above=above,
        registered_threshold=registered_threshold,
        registered_recall=float((realistic >= registered_threshold).mean()),
    )


def _views(images: np.ndarray) -> np.ndarray:
    return views_of(torch.from_numpy(images))[1]


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


def unrelated_pairs(neighbours: Neighbours, labels: np.ndarray, seed: int) -> np.ndarray:
    """(U, 2) rows of up to UNRELATED_PAIRS images, drawn with `seed`, and the nearest of their NEIGHBOURS labelled
    differently from them: almost all unrelated pictures, the ones that look the most alike."""
    indices = neighbours.indices
    differ = labels[:, None] != labels[indices]  # a -1 (missing) neighbour is masked below
    differ = (differ.any(2) if differ.ndim == 3 else differ) & (indices >= 0)
    found = np.flatnonzero(differ.any(1))
    nearest = indices[found, differ[found].argmax(1)]
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(found), min(UNRELATED_PAIRS, len(found)), replace=False))
    return np.stack([found[chosen], nearest[chosen]], 1).astype(np.int64)


def candidate_pairs(*found: Neighbours, nearest: int = NEIGHBOURS) -> np.ndarray:
    """(P, 2) every pair of an image and one of its `nearest` neighbours, once each (first < second)."""
    pairs = []
    for neighbours in found:
        indices = neighbours.indices[:, :nearest]
        rows = np.broadcast_to(np.arange(len(indices))[:, None], indices.shape)
        valid = indices >= 0
        pairs.append(np.stack([rows[valid], indices[valid]], 1))
    joined = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    return np.unique(np.sort(joined, axis=1), axis=0)


@dataclass(frozen=True)
class CopyPair:
    first: int  # rows, first < second
    second: int
    tier: str  # "near-exact" or "near duplicate"
    similarity: float  # aligned correlation (near-exact), registered correlation (near duplicate)


def copy_pairs(
    pairs: np.ndarray, closest: np.ndarray, views: np.ndarray, calibration: Calibration, advance: Advance | None = None
) -> list[CopyPair]:
    """The candidate `pairs` that are near-exact copies, and of those also in `closest` (a subset, both (P, 2) and
    sorted as `candidate_pairs` makes them) the near duplicates, by the `calibration`'s thresholds."""
    found = []
    registrable = np.isin(_keys(pairs), _keys(closest))
    for start in range(0, len(pairs), _PAIRS):
        chunk = pairs[start : start + _PAIRS]
        aligned = aligned_similarity(views[chunk[:, 0]], views[chunk[:, 1]])
        exact = aligned >= calibration.threshold
        found += [
            CopyPair(first, second, "near-exact", value)
            for (first, second), value in zip(chunk[exact].tolist(), aligned[exact].tolist(), strict=True)
        ]
        registering = chunk[(aligned >= calibration.gate) & ~exact & registrable[start : start + _PAIRS]]
        registered = registered_similarity(views[registering[:, 0]], views[registering[:, 1]])
        near = registered >= calibration.registered_threshold
        found += [
            CopyPair(first, second, "near duplicate", value)
            for (first, second), value in zip(registering[near].tolist(), registered[near].tolist(), strict=True)
        ]
        if advance:
            advance(len(chunk))
    return found


def _keys(pairs: np.ndarray) -> np.ndarray:
    return pairs[:, 0].astype(np.int64) << 32 | pairs[:, 1].astype(np.int64)


def exact_groups(digests: np.ndarray) -> list[np.ndarray]:
    """Groups (each of at least two rows, in row order) of images with identical pixels."""
    rows: defaultdict[bytes, list[int]] = defaultdict(list)
    for row, digest in enumerate(digests.tolist()):
        rows[digest].append(row)
    return [np.array(group) for group in rows.values() if len(group) > 1]
