"""The ways an image is copied, made on purpose: the doctor measures how similar a copy stays to its original, and
sets its copy thresholds from that, on the data's own images.

Near-exact ways keep the picture's geometry (re-encoded, halved and enlarged, shifted by 2 pixels, brightened):
what the aligned pixel test must find. Realistic ways are those of the same photo published twice: a crop of
80-100% of the area at an aspect ratio of 3/4 to 4/3 resized back, a scale of +-10% and a rotation of +-5 degrees
about the centre (the uncovered border mirrored), brightness, contrast and saturation each by +-20%, and JPEG at a
quality of 60 to 90. Each realistic copy draws its amounts from a seeded generator.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

CROP_AREA = (0.8, 1.0)  # share of the image's area a crop keeps
CROP_ASPECT = (3 / 4, 4 / 3)  # width / height of the crop, relative to the image's
SCALE = 0.1  # +- share
ROTATION = 5.0  # +- degrees
COLOUR = 0.2  # +- share of brightness, contrast and saturation
JPEG_QUALITY = (60, 90)


def _picture(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _pixels(picture: Image.Image, like: np.ndarray) -> np.ndarray:
    return np.asarray(picture).reshape(like.shape)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    picture = _picture(image)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return _pixels(Image.open(io.BytesIO(buffer.getvalue())).convert(picture.mode), image)


def near_exact_copies(image: np.ndarray) -> dict[str, np.ndarray]:
    """The four near-exact ways to copy an (H, W, C) uint8 image."""
    height, width, _ = image.shape
    picture = _picture(image)
    small = picture.resize((max(1, width // 2), max(1, height // 2)), Image.Resampling.BILINEAR)
    shifted = np.roll(image, (2, 2), axis=(0, 1))
    shifted[:2], shifted[:, :2] = shifted[2:3], shifted[:, 2:3]  # the uncovered edge repeats the image's edge
    return {
        "jpeg-75": _jpeg(image, 75),
        "resized": _pixels(small.resize((width, height), Image.Resampling.BILINEAR), image),
        "shifted": shifted,
        "brightened": _pixels(ImageEnhance.Brightness(picture).enhance(1.1), image),
    }


def warped(image: np.ndarray, scale: float, degrees: float) -> np.ndarray:
    """An (H, W, C) uint8 image scaled by `scale` and turned by `degrees` about its centre, the uncovered border
    mirrored from the image."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    angle = math.radians(degrees)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width, _ = image.shape
    area = rng.uniform(*CROP_AREA)
    aspect = math.exp(rng.uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])))
    crop_width = max(1, min(width, round(math.sqrt(area * aspect) * width)))
    crop_height = max(1, min(height, round(math.sqrt(area / aspect) * height)))
    left, top = int(rng.integers(0, width - crop_width + 1)), int(rng.integers(0, height - crop_height + 1))
    cropped = _picture(image).crop((left, top, left + crop_width, top + crop_height))
    return _pixels(cropped.resize((width, height), Image.Resampling.BICUBIC), image)


def _colour(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    picture = _picture(image)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        picture = enhancer(picture).enhance(rng.uniform(1 - COLOUR, 1 + COLOUR))
    return _pixels(picture, image)


REALISTIC: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "crop": _crop,
    "scale": lambda image, rng: warped(image, rng.uniform(1 - SCALE, 1 + SCALE), 0.0),
    "rotation": lambda image, rng: warped(image, 1.0, rng.uniform(-ROTATION, ROTATION)),
    "colour": _colour,
    "jpeg": lambda image, rng: _jpeg(image, int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))),
}


def realistic_copy(image: np.ndarray, way: str, rng: np.random.Generator) -> np.ndarray:
    """An (H, W, C) uint8 image copied one of the REALISTIC ways, its amounts drawn from `rng`."""
    return REALISTIC[way](image, rng)
