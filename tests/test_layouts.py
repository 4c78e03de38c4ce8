"""Image-folder layouts people use, read the way they mean them, and the ones that could be misread, refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import DataConfig
from cnnlab.data import load_dataset
from cnnlab.errors import CnnlabError

from .conftest import pattern_image


def make(root: Path, folders: dict[str, int]) -> Path:
    """`count` learnable 12x12 PNGs in each folder (`train/cat`, ...); the class is the folder's last part."""
    for folder, count in folders.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        label = sum(map(ord, folder.rsplit("/", 1)[-1])) % 4
        for i in range(count):
            Image.fromarray(pattern_image(label, 12, seed=i + 100 * len(folder))).save(root / folder / f"{i}.png")
    return root


def load(root: Path, **values) -> object:
    return load_dataset(DataConfig(data=str(root), **values))


def test_train_and_val_folders_score_on_val_and_never_become_classes(tmp_path):
    dataset = load(make(tmp_path, {"train/cat": 5, "train/dog": 6, "val/cat": 2, "val/dog": 3}))
    assert dataset.classes == ("cat", "dog")
    assert (len(dataset.train), len(dataset.test), dataset.val) == (11, 5, None)
    assert "val/ is the test split" in dataset.layout
    assert np.bincount(dataset.test.labels).tolist() == [2, 3]


@pytest.mark.parametrize("validation", ["val", "valid", "Validation", "dev"])
def test_a_validation_and_a_test_folder_are_both_used(tmp_path, validation):
    folders = {"train/a": 4, "train/b": 4, f"{validation}/a": 2, f"{validation}/b": 2, "test/a": 3, "test/b": 3}
    dataset = load(make(tmp_path, folders))
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (8, 4, 6)
    assert f"({validation}/ for validation)" in dataset.layout
    with pytest.raises(CnnlabError, match="has its own validation split"):
        load(tmp_path, val_fraction=0.2)


def test_a_lone_train_folder_is_not_looked_through_and_test_is_carved(tmp_path):
    dataset = load(make(tmp_path, {"train/a": 10, "train/b": 10}), test_fraction=0.2)
    assert dataset.classes == ("a", "b") and (len(dataset.train), len(dataset.test)) == (16, 4)
    assert "train/ folder only" in dataset.layout and "held out as the test split" in dataset.layout


def test_class_folders_inside_a_wrapping_folder(tmp_path):
    dataset = load(make(tmp_path, {"photos/a": 5, "photos/b": 5}))
    assert dataset.classes == ("a", "b") and "one folder per class, inside photos/" in dataset.layout


@pytest.mark.parametrize(
    ("folders", "message"),
    [
        ({"train/a": 2, "val/a": 2, "train/b": 2, "val/b": 2, "cats": 2}, r"split folders \(train/, val/\) beside"),
        ({"train/a": 2, "train/b": 2, "val/a": 1, "val/b": 1, "valid/a": 1, "valid/b": 1}, "both validation folders"),
        ({"val/a": 2, "val/b": 2, "test/a": 2, "test/b": 2}, "but no train/ folder"),
        ({"train/a": 3, "train/b": 3, "val/a": 2}, r"class 'b' has no images in val/ \(3 in train/\)"),
        ({"a/indoor": 2, "a/outdoor": 2, "b/indoor": 2}, r"class folders hold sub-folders \(a/indoor/"),
        ({"a/train": 2, "a/test": 2, "b/train": 2, "b/test": 2}, "they look like <class>/<split>/"),
        ({"train/a/x": 2, "train/b": 2}, r"sub-folders \(train/a/x/\)"),
        ({"only": 3}, r"only one class \(only\)"),
    ],
)
def test_layouts_that_could_be_misread_are_refused_in_one_line(tmp_path, folders, message):
    with pytest.raises(CnnlabError, match=message) as refused:
        load(make(tmp_path, folders))
    assert "\n" not in str(refused.value) and str(tmp_path) in str(refused.value)


def test_training_prints_the_layout_and_the_counts_before_it_starts(tmp_path):
    make(tmp_path / "photos", {"train/cat": 5, "train/dog": 6, "val/cat": 2, "val/dog": 3})
    result = CliRunner().invoke(
        app,
        ["train", "--data", str(tmp_path / "photos"), "--epochs", "1", "--out", str(tmp_path / "run"), "-q"],
    )
    assert result.exit_code == 0, result.output
    assert "data: photos (split folders train/, val/: no test folder, so val/ is the test split)" in result.output
    assert "2 classes, 32x32x3; images: train 11, test 5" in result.output  # tutorial-cnn is made for 32 px
    assert "per class (train/test): cat 5/2, dog 6/3" in result.output
