"""Batch transforms on tensors: from stored uint8 pixels to the float input a model takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Normalization:
    """Pixels are scaled to [0, 1], then standardised per channel: (x / 255 - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

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
