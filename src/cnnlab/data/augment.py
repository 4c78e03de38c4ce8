"""Training augmentations: pure functions over whole batches of (B, H, W, C) uint8 images.

They run on the stored uint8 pixels before conversion to float, so each moves a quarter of the bytes,
and they take their randomness from an explicit generator, so a seeded run repeats exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnnlab.config import AugmentConfig


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


def random_jitter(count: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """For each of `count` images, a brightness shift in [-strength, strength] (in the normalised input's units,
    about standard deviations) and a contrast scale in [1 - strength, 1 + strength].  -> (count, 2) float32"""
    return (torch.rand(count, 2, generator=generator) * 2 - 1) * strength + torch.tensor([0.0, 1.0])


def jittered(x: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
    """Normalised (B, C, H, W) inputs shifted, then scaled, by each image's (shift, scale) from `jitter` (B, 2)."""
    jitter = jitter.to(x.device, x.dtype).view(-1, 2, 1, 1, 1)
    return x.add_(jitter[:, 0]).mul_(jitter[:, 1])


# The range of aspect ratios (width / height) of a random-resized crop, as in Inception's training.
CROP_RATIOS = (3 / 4, 4 / 3)


def random_crop_boxes(count: int, min_area: float, generator: torch.Generator) -> torch.Tensor:
    """For each of `count` images, a crop box as fractions of its sides: (height, width, top, left), covering
    a random share of the area in [min_area, 1] at an aspect ratio in CROP_RATIOS, placed at random.
    -> (count, 4) float32"""
    area = min_area + (1 - min_area) * torch.rand(count, generator=generator)
    low, high = torch.log(torch.tensor(CROP_RATIOS))
    ratio = torch.exp(low + (high - low) * torch.rand(count, generator=generator))
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    top = (1 - height) * torch.rand(count, generator=generator)
    left = (1 - width) * torch.rand(count, generator=generator)
    return torch.stack((height, width, top, left), dim=1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's crop `boxes` (fractions: height, width, top, left) resized back to the full size, bilinear,
    in one batched resample.  (B, H, W, C) uint8 -> (B, H, W, C) uint8"""
    boxes = boxes.to(images.device)
    height, width, top, left = boxes.unbind(1)
    # The affine map from output coordinates to input coordinates in [-1, 1]: scale by the box, shift to its centre.
    theta = torch.zeros(len(images), 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = width, 2 * left + width - 1
    theta[:, 1, 1], theta[:, 1, 2] = height, 2 * top + height - 1
    x = images.permute(0, 3, 1, 2).float()  # (B, C, H, W)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    cropped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return cropped.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


RESOLUTION_STEP = 4  # progressive resizing grows the shorter side in steps of this many pixels


def resolution_at(step: int, total_steps: int, config: AugmentConfig, full: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) a training step sees: with `config.low_res`, the shorter side rises linearly from it
    at the first step to full size at `low_res_share` of the steps, rounded down to RESOLUTION_STEP pixels (so
    that few shapes are compiled); the longer side keeps the aspect ratio."""
    height, width = full
    shorter = min(height, width)
    if not config.low_res or config.low_res >= shorter:
        return full
    progress = min(1.0, step / max(1.0, config.low_res_share * total_steps))
    side = config.low_res + (shorter - config.low_res) * progress
    side = max(config.low_res, int(side) // RESOLUTION_STEP * RESOLUTION_STEP)
    if side >= shorter:
        return full
    return round(height * side / shorter), round(width * side / shorter)
