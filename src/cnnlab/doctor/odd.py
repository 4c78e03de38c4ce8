"""Odd images, from their pixels and their files: nearly constant, very dark or bright, blurry, grayscale in a
colour set, tiny originals and extreme aspect ratios; and outliers, far from every other image in embedding space.

Fixed thresholds are for what an image is whatever the dataset (a blank frame, a grey photo among colour ones);
"blurry" and "outlier" are relative to the dataset: a modified z-score (Iglewicz and Hoaglin: 0.6745 times the
distance from the median in median absolute deviations) beyond ROBUST_Z.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CONSTANT_STD = 4.0  # pixel values' standard deviation (of 255) under which an image is nearly constant
DARK_MEAN, BRIGHT_MEAN = 20.0, 235.0  # mean brightness (of 255) under / over which an image is very dark / bright
GRAY_SPREAD = 1.0  # mean difference (of 255) of its channels from their mean, under which an image is grayscale
TINY_SHARE = 0.5  # an original whose short side is under this share of the size it was brought to
EXTREME_ASPECT = 2.5  # an original this many times wider than tall, or taller than wide: cropping loses most of it
ROBUST_Z = 3.5
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


@dataclass(frozen=True)
class PixelStatistics:
    """Per image: (N,) float32 each."""

    std: np.ndarray  # of its pixel values
    brightness: np.ndarray  # mean luma
    channel_spread: np.ndarray  # mean absolute difference of its channels from their mean (0: single-channel data)
    sharpness: np.ndarray  # variance of the luma's Laplacian

    @staticmethod
    def of(batch: torch.Tensor) -> PixelStatistics:
        """The statistics of a (B, H, W, C) uint8 batch."""
        x = batch.float().permute(0, 3, 1, 2)  # (B, C, H, W), 0-255
        luma = (
            x.mean(1, keepdim=True) if x.shape[1] == 1 else (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        )
        spread = (x - x.mean(1, keepdim=True)).abs().mean((1, 2, 3)) * (x.shape[1] > 1)
        edges = F.conv2d(luma, _LAPLACIAN) if min(x.shape[-2:]) >= 3 else torch.zeros_like(luma)
        values = (x.std((1, 2, 3)), luma.mean((1, 2, 3)), spread, edges.var((1, 2, 3)))
        return PixelStatistics(*(value.numpy().astype(np.float32) for value in values))

    @staticmethod
    def joined(parts: list[PixelStatistics]) -> PixelStatistics:
        """The statistics of batches, one after another."""
        fields = ("std", "brightness", "channel_spread", "sharpness")
        return PixelStatistics(*(np.concatenate([getattr(part, name) for part in parts]) for name in fields))


def robust_z(values: np.ndarray) -> np.ndarray:
    """The modified z-score of each value: 0.6745 (x - median) / MAD; 0 everywhere when the MAD is 0."""
    median = np.median(values)
    spread = np.median(np.abs(values - median))
    return 0.6745 * (values - median) / spread if spread > 0 else np.zeros_like(values)


def odd_reasons(
    statistics: PixelStatistics, colour: bool, native_sizes: np.ndarray | None, stored_size: tuple[int, int]
) -> list[list[tuple[str, float]]]:
    """Per image, each odd thing about it as (check, the measured value)."""
    count = len(statistics.std)
    reasons: list[list[tuple[str, float]]] = [[] for _ in range(count)]
    constant = statistics.std < CONSTANT_STD
    sharpness_z = robust_z(np.log1p(statistics.sharpness))
    checks = [
        ("nearly constant", constant, statistics.std),
        ("very dark", statistics.brightness < DARK_MEAN, statistics.brightness),
        ("very bright", statistics.brightness > BRIGHT_MEAN, statistics.brightness),
        ("blurry", (sharpness_z < -ROBUST_Z) & ~constant, statistics.sharpness),
    ]
    if colour:
        checks.append(("grayscale", statistics.channel_spread < GRAY_SPREAD, statistics.channel_spread))
    if native_sizes is not None and len(native_sizes):
        short, long = native_sizes.min(1), native_sizes.max(1)
        checks.append(("tiny original", short < TINY_SHARE * min(stored_size), short.astype(np.float32)))
        aspect = long / np.maximum(short, 1)
        checks.append(("extreme aspect ratio", aspect > EXTREME_ASPECT, aspect.astype(np.float32)))
    for name, flagged, values in checks:
        for row in np.flatnonzero(flagged).tolist():
            reasons[row].append((name, float(values[row])))
    return reasons


def outlier_scores(similarities: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(N,) how far each image is from its nearest neighbours (`similarities` to those at `indices`, -1 where
    there are none): minus the modified z-score of its mean similarity to them; an outlier scores above ROBUST_Z."""
    found = indices >= 0
    if not found.any():
        return np.zeros(len(indices), np.float32)
    mean = (similarities * found).sum(1) / np.maximum(found.sum(1), 1)
    return -robust_z(mean)
