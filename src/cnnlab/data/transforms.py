"""Batch transforms on tensors: from stored uint8 pixels to the float input a model takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from cnnlab.data.dataset import Pixels


@dataclass(frozen=True)
class Normalization:
    """Pixels are scaled to [0, 1], then standardised per channel: (x / 255 - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def for_channels(self, channels: int) -> Normalization:
        """These statistics for images of `channels` channels: RGB statistics averaged for grayscale."""
        if len(self.mean) == channels:
            return self
        if channels == 1:
            return Normalization((sum(self.mean) / len(self.mean),), (sum(self.std) / len(self.std),))
        raise ValueError(f"{len(self.mean)}-channel statistics for {channels}-channel images")

    @classmethod
    def unit(cls, channels: int) -> Normalization:
        """The tutorial's preprocessing: scale to [0, 1] and nothing else."""
        return cls(mean=(0.0,) * channels, std=(1.0,) * channels)


def to_input(images: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32, normalised, in channels_last memory order."""
    x = images.permute(0, 3, 1, 2).float()  # the permuted view of NHWC data is already channels_last
    scale = torch.tensor([1.0 / (255.0 * s) for s in normalization.std], device=x.device).view(1, -1, 1, 1)
    if any(normalization.mean):
        shift = torch.tensor(
            [m / s for m, s in zip(normalization.mean, normalization.std, strict=True)], device=x.device
        )
        return x.mul_(scale).sub_(shift.view(1, -1, 1, 1))
    return x.mul_(scale)


def downscaled(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) float inputs resized to `size` (height, width), bilinear, antialiased; as they are at full size."""
    if tuple(x.shape[-2:]) == size:
        return x
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


# Pixels read to estimate the normalisation statistics: all of CIFAR-10's train split (153 MB), a sample of
# larger sets (about 1,700 images at 224 px), so that a dataset larger than memory is never read whole.
STATISTICS_BYTES = 256 * 2**20
CHUNK_PIXELS = 4096 * 32 * 32  # H x W summed over a chunk converted to floats at once: 4,096 CIFAR images


def images_within(pixels: int, height: int, width: int, most: int | None = None) -> int:
    """How many images of height x width fit in `pixels` (H x W summed), at least one and at most `most`: work
    sized in pixels stays within its memory whatever the image size."""
    count = max(1, pixels // (height * width))
    return count if most is None else min(most, count)


def channel_statistics(images: Pixels, mode: str, seed: int = 0) -> Normalization:
    """Per-channel mean and std of (N, H, W, C) uint8 images on the [0, 1] scale, or the unit normalisation.

    Read from all images when they fit in STATISTICS_BYTES, else from a seeded random sample that does."""
    channels = images.shape[-1]
    if mode == "unit":
        return Normalization.unit(channels)
    per_image = images[0].nbytes if len(images) else 1
    if len(images) * per_image > STATISTICS_BYTES:
        chosen = np.random.default_rng(seed).choice(len(images), STATISTICS_BYTES // per_image, replace=False)
        images = images[np.sort(chosen)]
    else:
        images = np.asarray(images)
    total = np.zeros(channels)
    squares = np.zeros(channels)
    step = images_within(CHUNK_PIXELS, images.shape[1], images.shape[2])  # bounds the float copy's memory
    for start in range(0, len(images), step):
        chunk = images[start : start + step].reshape(-1, channels).astype(np.float64) / 255.0
        total += chunk.sum(0)
        squares += (chunk**2).sum(0)
    count = images.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    return Normalization(tuple(mean.tolist()), tuple(std.tolist()))
