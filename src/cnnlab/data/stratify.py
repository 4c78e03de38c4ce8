"""Iterative stratification (Sechidis, Tsoumakas and Vlahavas, 2011): a held-out share of multi-label data in which
every label, the rare ones first, keeps its share of images as nearly as whole images allow."""

from __future__ import annotations

import numpy as np


def iterative_stratification(targets: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: the images held out, about `fraction` of those (N, K) multi-hot `targets`, seeded.

    The label with the fewest images not yet placed goes first: each of its images joins the part that still
    wants most of that label (ties: the part that wants most images, then a seeded coin). Images without any label
    fill the parts' remaining sizes last."""
    rng = np.random.default_rng(seed)
    count = len(targets)
    shares = np.array([1 - fraction, fraction])
    wanted_images = shares * count  # (2,) images each part still wants
    wanted_labels = shares[:, None] * targets.sum(0, dtype=np.float64)[None, :]  # (2, K)
    part = np.full(count, -1)
    unplaced = targets.astype(bool)
    while unplaced.any():
        remaining = unplaced.sum(0)
        label = int(np.argmin(np.where(remaining > 0, remaining, count + 1)))
        for row in rng.permutation(np.flatnonzero(unplaced[:, label])):
            chosen = _neediest(wanted_labels[:, label], wanted_images, rng)
            part[row] = chosen
            wanted_labels[chosen] -= targets[row]
            wanted_images[chosen] -= 1
            unplaced[row] = False
    for row in rng.permutation(np.flatnonzero(part < 0)):
        chosen = _neediest(wanted_images, wanted_images, rng)
        part[row] = chosen
        wanted_images[chosen] -= 1
    held: np.ndarray = part == 1
    return held


def _neediest(wanted: np.ndarray, wanted_images: np.ndarray, rng: np.random.Generator) -> int:
    """The part that wants most (of a label, or of images), ties broken by the images wanted, then by `rng`."""
    best = np.flatnonzero(wanted == wanted.max())
    if len(best) > 1:
        best = best[wanted_images[best] == wanted_images[best].max()]
    return int(best[0] if len(best) == 1 else rng.choice(best))
