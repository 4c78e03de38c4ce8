"""What a run trains with, each built once from its config section: the network as training sees it (`Trainee`),
the loss, the batches, and a new run's starting weights. The phases receive these, not the config."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.config import OptimConfig, TrainConfig
from cnnlab.data import Dataset
from cnnlab.data.dataset import ImageShape, Labels, class_counts
from cnnlab.data.loader import TrainBatches, make_source
from cnnlab.data.transforms import Normalization, channel_statistics, images_within, to_input
from cnnlab.errors import ConfigError
from cnnlab.machine import Precision, synchronize
from cnnlab.models import Classifier, ModelSpec, create_model, model_spec, parameter_count
from cnnlab.models.weights import load_compatible_weights, weights_file
from cnnlab.train.distributed import Ranks, with_sync_bn

log = logging.getLogger("cnnlab")
# At most, for a family's data-dependent initialisation: images, and their H x W summed (5,000 CIFAR images;
# the fast nets' whitening unfolds every 2x2 patch, 12 floats a pixel: 100 images at 224 px take 240 MB).
INIT_SAMPLE, INIT_PIXELS = 5000, 5000 * 32 * 32


@dataclass
class Trainee:
    """The network in training and how it sees its inputs."""

    model: Classifier
    input_shape: ImageShape  # the images it is trained on, at full size
    forward: nn.Module  # the training forward: `model`, or its compiled form, which shares its parameters
    normalization: Normalization
    precision: Precision
    family: Any  # the family's own settings, checked (`ModelSpec.family_settings`)

    @property
    def bf16(self) -> bool:
        """Autocast to bf16 for the forward pass and evaluation."""
        return self.precision == "bf16"


@dataclass(frozen=True)
class ClassificationLoss:
    """Cross-entropy with the run's class weights and label smoothing; for multi-label data, the binary
    cross-entropy of a sigmoid per class summed over the classes (the negative log-likelihood of the image's whole
    label set), the class weights weighing each class's positives and the smoothing pulling targets to eps/2 and
    1 - eps/2."""

    class_weights: torch.Tensor | None  # (classes,), or None: every class (its positives) weighs 1
    label_smoothing: float
    multi_label: bool = False

    def per_image(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(b,) each image's weighted, smoothed cross-entropy."""
        if self.multi_label:
            return self._per_class(logits, labels).sum(1)
        return F.cross_entropy(
            logits, labels, weight=self.class_weights, label_smoothing=self.label_smoothing, reduction="none"
        )

    def mean(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's weighted mean (the weights of its images' classes sum to one; for multi-label data, the
        mean over images)."""
        if self.multi_label:
            return self.per_image(logits, labels).mean()
        return F.cross_entropy(logits, labels, weight=self.class_weights, label_smoothing=self.label_smoothing)

    def correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The images classified right: the top class, or for multi-label data the whole set (each sigmoid at 0.5)."""
        if self.multi_label:
            return ((logits >= 0) == labels.bool()).all(1).sum()
        return (logits.argmax(1) == labels).sum()

    def _per_class(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels.float() * (1 - self.label_smoothing) + self.label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.class_weights, reduction="none")


def build_trainee(settings: TrainConfig, precision: Precision, dataset: Dataset, ranks: Ranks) -> Trainee:
    """The registered model for the dataset's images and classes, on this process's device."""
    spec = model_spec(settings.model)
    shape, classes = dataset.image_shape, len(dataset.classes)
    model = create_model(settings.model, shape, classes, seed=settings.system.seed)
    warn_if_oversized(spec, model, shape, classes)
    model = with_sync_bn(model, settings.system.sync_bn, ranks).to(ranks.device)
    forward: nn.Module = torch.compile(model) if settings.system.compile else model  # type: ignore[assignment]
    fixed = spec.normalization
    if fixed is not None:
        normalization = fixed.for_channels(shape.channels)
    else:
        normalization = channel_statistics(dataset.train.images, settings.augment.normalize)
    return Trainee(model, shape, forward, normalization, precision, spec.family_settings(settings.family))


def build_loss(optim: OptimConfig, dataset: Dataset, device: torch.device) -> ClassificationLoss:
    weights = loss_weights(dataset.train.labels, len(dataset.classes), optim.class_weights, device)
    return ClassificationLoss(weights, optim.label_smoothing, dataset.multi_label)


def build_batches(settings: TrainConfig, dataset: Dataset, ranks: Ranks, cache_root: Path) -> TrainBatches:
    """This process's training batches, from memory or the disk cache as `system.loader` says."""
    source = make_source(settings.system.loader, dataset.train, ranks.device, cache_root)
    optim = settings.optim
    return TrainBatches(
        dataset.train,
        source,
        settings.augment,
        batch_size=optim.batch_size,
        seed=settings.system.seed,
        select_share=optim.select_share,
        rank=ranks.rank,
        world_size=ranks.world_size,
    )


def initialize(trainee: Trainee, settings: TrainConfig, dataset: Dataset, device: torch.device, cache: Path) -> float:
    """A new run's starting weights: the family's pretrained weights, or those of `settings.weights`, then its
    data-dependent initialisation (the fast nets' whitening) from a seeded sample. Returns the seconds that
    initialisation took (the pretrained weights load before)."""
    model = trainee.model
    if settings.weights:
        load_compatible_weights(model, weights_file(settings.weights, cache))
    else:
        model.load_pretrained()
    if not model.initialises_from_data:
        return 0.0
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.system.seed)
    _, height, width = dataset.image_shape
    count = images_within(INIT_PIXELS, height, width, most=INIT_SAMPLE)
    sample = torch.randperm(len(dataset.train), generator=generator)[:count].numpy()
    images = torch.from_numpy(dataset.train.images[sample]).to(device)
    model.init_from_data(to_input(images, trainee.normalization))
    synchronize(device)
    return time.perf_counter() - started


def loss_weights(labels: Labels, classes: int, mode: str, device: torch.device | None = None) -> torch.Tensor | None:
    """Per-class loss weights that give every class the same total weight, N / (K * count); for multi-label
    labels, positive weights that give each class's images with it the total weight of those without it,
    (N - count) / count. None for "none"."""
    if mode == "none":
        return None
    counts = class_counts(labels, classes).astype(np.float64)
    if not counts.all():
        raise ConfigError("train.class_weights auto: a class has no training images", "train.class_weights")
    if labels.ndim == 2 and (counts == len(labels)).any():
        raise ConfigError("train.class_weights auto: a class is carried by every training image", "train.class_weights")
    weights = (len(labels) - counts) / counts if labels.ndim == 2 else len(labels) / (classes * counts)
    return torch.tensor(weights, dtype=torch.float32, device=device)


def warn_if_oversized(spec: ModelSpec, model: nn.Module, input_shape: ImageShape, classes: int) -> None:
    """Say so before training when the input size makes a model far larger than at the size it was made for
    (the tutorial models' dense layers grow with the image's area)."""
    channels, height, width = input_shape
    if spec.input_size is None or height * width <= spec.input_size**2:
        return
    count = parameter_count(model)
    designed = parameter_count(create_model(spec.name, ImageShape(channels, spec.input_size, spec.input_size), classes))
    if count > 2 * designed:
        log.warning(
            "%s has %s parameters at %dx%d, %.0fx its %s at %dx%d it was made for: training will be slow and "
            "memory-hungry; a smaller data.image_size, or a model made for this size, trains faster",
            spec.name,
            f"{count:,}",
            height,
            width,
            count / designed,
            f"{designed:,}",
            spec.input_size,
            spec.input_size,
        )


@dataclass
class TrainingParts:
    """The components of a run that its phases are built from."""

    trainee: Trainee
    batches: TrainBatches
    loss: ClassificationLoss
    dataset: Dataset
    ranks: Ranks
