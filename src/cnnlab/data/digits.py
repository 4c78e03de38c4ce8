"""scikit-learn's bundled 8x8 handwritten digits: the dataset that needs no download."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from cnnlab.data.dataset import Dataset, Split, resize_images, split_stratified

# Upsampled by default so that both tutorial models, built for CIFAR's 32x32, apply unchanged.
DEFAULT_SIZE = 32


def load_digits_dataset(image_size: int | None, test_fraction: float, split_seed: int) -> Dataset:
    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (1797, 8, 8, 1), 0..16 -> 0..255
    size = image_size or DEFAULT_SIZE
    everything = Split(resize_images(pixels, (size, size)), bunch.target.astype(np.int64))
    train, test = split_stratified(everything, test_fraction, split_seed, "test")
    return Dataset(name="digits", classes=tuple(str(d) for d in bunch.target_names), train=train, test=test)
