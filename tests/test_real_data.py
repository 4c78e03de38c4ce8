"""On the real CIFAR-10 (the shared copy of its original pixels); skipped where it is absent, as on a user's laptop."""

from __future__ import annotations

import pytest

from cnnlab.config import DataConfig
from cnnlab.data import load_dataset
from cnnlab.recipes import resolve_run_config
from cnnlab.train import fit
from cnnlab.train.reporter import LineReporter
from tests.conftest import SHARED_CIFAR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason=f"real CIFAR-10 not found at {SHARED_CIFAR}"),
]


def test_tutorial_cnn_reaches_50_percent_after_one_epoch_on_real_cifar10(tmp_path):
    dataset = load_dataset(DataConfig(data=str(SHARED_CIFAR)))
    assert (len(dataset.train), len(dataset.test), dataset.image_shape) == (50_000, 10_000, (3, 32, 32))
    assert dataset.classes[:3] == ("airplane", "automobile", "bird")
    config = resolve_run_config(
        {
            "data": {"data": str(SHARED_CIFAR)},
            "train": {"model": "tutorial-cnn", "epochs": 1},
            "out": str(tmp_path / "run"),
        }
    )
    result = fit(config, dataset, reporter=LineReporter())
    assert result.history[-1]["test_plain_accuracy"] >= 0.50
