"""Training augmentations: pure functions over whole batches of (B, H, W, C) uint8 images.

They run on the stored uint8 pixels before conversion to float, so each moves a quarter of the bytes,
and they take their randomness from an explicit generator, so a seeded run repeats exactly.
"""

from __future__ import annotations

import torch


def alternating_flips(base: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which images (by dataset index) to mirror in this epoch: a fixed random half `base` on odd epochs
    and the other half on even ones, so that every image is seen both ways in any two consecutive
    epochs (airbench's alternating flip), with less repetition than independent coin flips."""
    return base ^ (epoch % 2 == 0)


def random_flips(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(count, generator=generator) < 0.5


def mirror(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images where mask is True.  (B, H, W, C) -> (B, H, W, C)"""
    return torch.where(mask.view(-1, 1, 1, 1).to(images.device), images.flip(2), images)


def random_shifts(count: int, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """A random (dy, dx) in [-max_shift, max_shift] for each of `count` images.  -> (count, 2) int64"""
    return torch.randint(-max_shift, max_shift + 1, (count, 2), generator=generator)


def translate(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Shift each image by its own (dy, dx) from `shifts` (B, 2), reflecting at the border.

    One gather over precomputed row and column indices: no padding copy and no per-image loop.
    """
    batch, height, width, _ = images.shape
    shifts = shifts.to(images.device)
    rows = _reflect(torch.arange(height, device=images.device) + shifts[:, :1], height)  # (B, H)
    cols = _reflect(torch.arange(width, device=images.device) + shifts[:, 1:], width)  # (B, W)
    index = torch.arange(batch, device=images.device).view(-1, 1, 1)
    return images[index, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)


def _reflect(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Map positions outside 0..size-1 back inside by mirroring at the edges (no edge repeat)."""
    positions = positions.abs()
    return torch.where(positions >= size, 2 * (size - 1) - positions, positions)
