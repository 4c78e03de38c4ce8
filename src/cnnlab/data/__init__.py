"""Data: every source becomes one `Dataset` of uint8 (N, H, W, C) images with labels (`dataset.Labels`: a class
index per image, or multi-hot rows for multi-label data).

from cnnlab.data import DataConfig, load_dataset
dataset = load_dataset(DataConfig(dataset="digits"))
"""

from __future__ import annotations

from pathlib import Path

from cnnlab.config import DataConfig, check_ranges
from cnnlab.data import cifar
from cnnlab.data.cache import cache_root
from cnnlab.data.dataset import Dataset, Split, SplitName, match_channels, resize_images
from cnnlab.data.digits import load_digits_dataset
from cnnlab.data.exclude import read_exclusion, without
from cnnlab.data.folder import load_image_folder
from cnnlab.data.labels import LabelFile
from cnnlab.errors import CnnlabError, ConfigError

NAMED_DATASETS = ("digits", *cifar.SOURCES)
VALIDATION_SHARE = 0.1  # of train, carved when early stopping needs a validation split and none is asked for

__all__ = [
    "NAMED_DATASETS",
    "DataConfig",
    "Dataset",
    "Split",
    "SplitName",
    "load_dataset",
    "match_channels",
    "resize_images",
    "validation_split",
]


def load_dataset(config: DataConfig, needs_validation: bool = False) -> Dataset:
    """Load the dataset that `config` names, with its validation split carved (`validation_split`)."""
    if bool(config.dataset) == bool(config.data):
        raise ConfigError(
            "give exactly one of data.dataset (a name) or data.data (a path)", "data.dataset", "data.data"
        )
    check_ranges(config, "data")
    root = cache_root(config.cache_dir)
    labels = label_file(config)
    if labels is not None and (config.dataset or cifar.identify(Path(config.data or "").expanduser())):
        raise ConfigError(
            "data.labels labels an image folder given as data.data, not a dataset with labels of its own", "data.labels"
        )
    if config.dataset:
        if config.dataset == "digits":
            dataset = load_digits_dataset(config.image_size, config.test_fraction, config.split_seed)
        elif config.dataset in cifar.SOURCES:
            dataset = _sized(cifar.load_cifar(cifar.SOURCES[config.dataset], root), config.image_size)
        else:
            raise ConfigError(
                f"unknown dataset {config.dataset!r}; known: {', '.join(NAMED_DATASETS)} (or a path as data.data)",
                "data.data",
            )
    else:
        path = Path(config.data or "").expanduser()  # set: exactly one of dataset and data is
        if not path.exists():
            raise CnnlabError(f"{path}: no such file or folder")
        source = cifar.identify(path)
        if source is not None:
            dataset = _sized(cifar.load_cifar(source, root, local=path), config.image_size)
        else:
            dataset = load_image_folder(
                path,
                image_size=config.image_size,
                test_fraction=config.test_fraction,
                split_seed=config.split_seed,
                cache_root=root,
                strict=config.strict,
                label_file=labels,
            )
    if config.multi_label:
        dataset = dataset.as_multi_label()
    dataset = validation_split(dataset, config, needs_validation)
    return without(dataset, read_exclusion(config.exclude, dataset)) if config.exclude else dataset


def label_file(config: DataConfig) -> LabelFile | None:
    """`config.labels` with its column choices; the column settings alone are refused, as is a label file for a
    source whose labels are its own (a named dataset, a CIFAR archive)."""
    if config.labels is None:
        if config.path_column or config.label_column or config.class_names:
            message = "data.path_column, data.label_column and data.class_names go with data.labels"
            raise ConfigError(message, "data.path_column", "data.label_column", "data.class_names", "data.labels")
        return None
    return LabelFile(Path(config.labels).expanduser(), config.path_column, config.label_column, config.class_names)


def validation_split(dataset: Dataset, config: DataConfig, needed: bool = False) -> Dataset:
    """The one place a validation split is carved out of train (seeded by `config.split_seed`, stratified):
    `config.val_fraction` of it, or, at 0 and when `needed` (early stopping watches one), VALIDATION_SHARE of it
    where the data has no validation split of its own."""
    share = config.val_fraction or (VALIDATION_SHARE if needed and dataset.val is None else 0.0)
    return dataset.with_validation(share, config.split_seed)


def _sized(dataset: Dataset, image_size: int | None) -> Dataset:
    if image_size is None:
        return dataset
    size = (image_size, image_size)
    return Dataset(
        name=dataset.name,
        classes=dataset.classes,
        train=Split(resize_images(dataset.train.images, size), dataset.train.labels),
        test=Split(resize_images(dataset.test.images, size), dataset.test.labels),
    )
