"""A training run's state: the model and what trains it, the batch loader, the history, and how all of it
goes into a checkpoint and comes back bit for bit."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from cnnlab.config import RunConfig, TrainConfig
from cnnlab.data import Dataset
from cnnlab.data.dataset import ImageShape
from cnnlab.data.download import download
from cnnlab.data.loader import TrainBatches, make_source
from cnnlab.data.transforms import channel_statistics, images_within, to_input
from cnnlab.errors import CnnlabError, ConfigError
from cnnlab.machine import Precision, synchronize
from cnnlab.models import Classifier, ModelInfo, ModelSpec, create_model, model_spec, parameter_count
from cnnlab.models.files import package_version
from cnnlab.models.registry import fitting_tensors
from cnnlab.run_dir import RunDir
from cnnlab.tracking.loggers import Trackers
from cnnlab.train.distributed import Ranks, with_sync_bn
from cnnlab.train.early_stopping import EarlyStopping
from cnnlab.train.optim import Lookahead
from cnnlab.train.phases import HeadPhase, ImagePhase, Phase, UnfreezePhase

log = logging.getLogger("cnnlab")
# At most, for a family's data-dependent initialisation: images, and their H x W summed (5,000 CIFAR images;
# the fast nets' whitening unfolds every 2x2 patch, 12 floats a pixel: 100 images at 224 px take 240 MB).
INIT_SAMPLE, INIT_PIXELS = 5000, 5000 * 32 * 32


class NonFiniteLoss(CnnlabError):
    pass


@dataclass
class PartialEpoch:
    """The epoch in progress, for mid-epoch checkpoints: its last finished step and this process's totals."""

    epoch: int
    step: int
    loss_sum: torch.Tensor  # summed cross-entropy of the images seen, on the device (read back only to report)
    correct: torch.Tensor
    seen: int
    seconds: float


class TrainState:
    """Everything a run carries from step to step. Built the same on every process of a distributed run."""

    def __init__(self, settings: TrainConfig, precision: Precision, dataset: Dataset, ranks: Ranks, cache_root: Path):
        self.settings, self.precision, self.ranks = settings, precision, ranks
        self.bf16 = precision == "bf16"  # autocast for the forward pass and evaluation
        self.spec = model_spec(settings.model)
        self.family = self.spec.family_settings(settings.family)  # the family's own settings, checked
        self.input_shape = dataset.image_shape
        model = create_model(settings.model, self.input_shape, len(dataset.classes), seed=settings.system.seed)
        warn_if_oversized(self.spec, model, self.input_shape, len(dataset.classes))
        self.model: Classifier = with_sync_bn(model, settings.system.sync_bn, ranks).to(ranks.device)
        # The training forward, compiled when asked: it shares the model's parameters, which are what is saved.
        self.compiled: nn.Module = torch.compile(self.model) if settings.system.compile else self.model  # type: ignore[assignment]
        fixed = self.spec.normalization
        if fixed is not None:
            self.normalization = fixed.for_channels(self.input_shape.channels)
        else:
            self.normalization = channel_statistics(dataset.train.images, settings.augment.normalize)
        self.cache_root = cache_root
        source = make_source(settings.system.loader, dataset.train, ranks.device, cache_root)
        self.batches = TrainBatches(
            dataset.train,
            source,
            settings.optim.batch_size,
            settings.system.seed,
            settings.augment.flip,
            settings.augment.translate,
            ranks.rank,
            ranks.world_size,
            settings.augment.crop_area,
            settings.augment.color_jitter,
            settings.optim.select_share,
        )
        self.dataset = dataset
        self.phase: Phase = (HeadPhase if settings.finetune.head_only else ImagePhase)(
            self, dataset, 1, settings.optim.epochs
        )
        self.class_weights = loss_weights(
            dataset.train.labels, len(dataset.classes), settings.optim.class_weights, ranks.device
        )
        self.history: list[dict[str, Any]] = []
        self.partial: PartialEpoch | None = None
        self.stopping = EarlyStopping(settings.optim.patience)
        self.init_seconds = 0.0  # the data-dependent initialisation's (the pretrained weights load before)

    def initialize(self, dataset: Dataset) -> None:
        """A new run's starting weights: the family's pretrained weights, or those of `settings.weights`, then
        its data-dependent initialisation (the fast nets' whitening) from a seeded sample."""
        if self.settings.weights:
            load_compatible_weights(self.model, weights_file(self.settings.weights, self.cache_root))
        else:
            self.model.load_pretrained()
        if not self.model.initialises_from_data:
            return
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(self.settings.system.seed)
        _, height, width = dataset.image_shape
        count = images_within(INIT_PIXELS, height, width, most=INIT_SAMPLE)
        sample = torch.randperm(len(dataset.train), generator=generator)[:count].numpy()
        images = torch.from_numpy(dataset.train.images[sample]).to(self.ranks.device)
        self.model.init_from_data(to_input(images, self.normalization))
        synchronize(self.ranks.device)
        self.init_seconds = time.perf_counter() - started

    def next_phase(self) -> Phase | None:
        """The phase that follows the one in training: after the head, with `unfreeze_epochs`, the whole network."""
        if isinstance(self.phase, HeadPhase) and self.settings.finetune.unfreeze_epochs:
            return UnfreezePhase(self, self.dataset, len(self.history))
        return None

    def summed(self, loss_sum: torch.Tensor | float, correct: torch.Tensor | int, seen: int) -> tuple[float, int, int]:
        """An epoch's running totals summed over the processes."""
        device = self.ranks.device
        totals = torch.tensor([float(loss_sum), float(correct), float(seen)], dtype=torch.float64, device=device)
        loss, right, count = self.ranks.sum(totals).tolist()
        return loss, int(right), int(count)

    def state_dict(self) -> dict[str, Any]:
        """The run's state, the same on every process (the epoch's running totals are summed over them)."""
        partial = None
        if self.partial is not None:
            loss_sum, correct, seen = self.summed(self.partial.loss_sum, self.partial.correct, self.partial.seen)
            partial = {**dataclasses.asdict(self.partial), "loss_sum": loss_sum, "correct": correct, "seen": seen}
        return {
            "model": self.model.state_dict(),
            "optimizer": self.phase.optimizer.state_dict(),
            "schedule": self.phase.schedule.state_dict(),
            "lookahead": self.phase.lookahead.state_dict() if self.phase.lookahead is not None else None,
            "loader": self.batches.state_dict(),
            "global_rng": global_rng_states(),
            "epoch": len(self.history),
            "unfrozen_at": self.phase.unfrozen_at(),
            "history": self.history,
            "partial_epoch": partial,
            "early_stopping": self.stopping.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("unfrozen_at") is not None:  # the optimizer saved is the unfreeze phase's
            self.phase = UnfreezePhase(self, self.dataset, state["unfrozen_at"])
        self.model.load_state_dict(state["model"])
        self.phase.optimizer.load_state_dict(state["optimizer"])
        self.phase.schedule.load_state_dict(state["schedule"])
        if state["lookahead"] is not None:
            self.phase.lookahead = Lookahead.from_state_dict(self.model, state["lookahead"])
        self.batches.load_state_dict(state["loader"])
        restore_global_rng_states(state["global_rng"])
        self.history = state["history"]
        self.stopping.load_state_dict(state["early_stopping"])
        partial = state["partial_epoch"]
        if partial is not None:
            # The sums a checkpoint holds are carried on by one process; the others start their share at zero.
            carried = self.ranks.is_main
            self.partial = PartialEpoch(
                partial["epoch"],
                partial["step"],
                torch.tensor(partial["loss_sum"] if carried else 0.0, device=self.ranks.device),
                torch.tensor(partial["correct"] if carried else 0, device=self.ranks.device),
                partial["seen"] if carried else 0,
                partial["seconds"],
            )

    @property
    def best_epoch(self) -> int | None:
        """The epoch whose weights early stopping keeps: the model has them once training has ended."""
        return self.stopping.best[1] if self.stopping.best is not None else None

    def kept_metrics(self) -> dict[str, Any]:
        """The metrics of the epoch whose weights the model has: the last, or the one early stopping kept."""
        if self.best_epoch is not None:
            return self.history[self.best_epoch - 1] | {"best_epoch": self.best_epoch}
        return self.history[-1] if self.history else {}

    def model_info(self, config: RunConfig, classes: list[str]) -> ModelInfo:
        normalization = self.normalization
        return ModelInfo(
            architecture=config.train.model,
            classes=classes,
            input_shape=list(self.input_shape),
            normalization={"mean": list(normalization.mean), "std": list(normalization.std)},
            tta=config.train.inference.tta,
            tta_below=config.train.inference.tta_below,
            precision=self.precision,
            metrics=self.kept_metrics(),
            config=dataclasses.asdict(config),
            cnnlab_version=package_version(),
        )


class Recorder:
    """What a run writes as it goes: checkpoints and the metrics log, on the main process (every process takes
    part in a checkpoint's sums). It remembers the last checkpoint on disk, to say what a failure left intact."""

    def __init__(self, state: TrainState, run_dir: RunDir, config: RunConfig, classes: list[str], trackers: Trackers):
        self.state, self.run_dir, self.config, self.classes = state, run_dir, config, classes
        self.trackers = trackers  # none on the other processes
        self.intact: str | None = None  # the last checkpoint on disk, as "epoch E" or "epoch E step S"

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.run_dir.check_compatible(checkpoint, self.classes, list(self.state.input_shape))
        self.state.load_state_dict(checkpoint)
        partial = checkpoint["partial_epoch"]
        self.intact = f"epoch {partial['epoch']} step {partial['step']}" if partial else f"epoch {checkpoint['epoch']}"

    def start(self) -> None:
        if self.state.ranks.is_main:
            self.run_dir.restart_metrics(self.state.history)

    def save_checkpoint(self, epoch: int, step: int) -> None:
        state = self.state
        if not all(torch.isfinite(p).all() for p in state.model.parameters()):
            raise NonFiniteLoss(f"non-finite weights at epoch {epoch} step {step}; the last checkpoint is kept")
        saved = state.state_dict()  # on every process: it sums the epoch's running totals over them
        if state.ranks.is_main:
            about = {"classes": self.classes, "input_shape": list(state.input_shape)}
            self.run_dir.save_checkpoint({**saved, **about, "config": dataclasses.asdict(self.config)})
            finished = step == state.phase.steps_in_epoch(epoch)
            self.intact = f"epoch {epoch}" if finished else f"epoch {epoch} step {step}"

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        if self.state.ranks.is_main:
            self.run_dir.append_metrics(metrics)
            self.trackers.log_epoch(metrics)

    def log_steps(self, steps: list[tuple[int, float, float]]) -> None:
        """Each step's (number in the run, loss, learning rate), to the trackers."""
        self.trackers.log_steps(steps)


def loss_weights(
    labels: np.ndarray, classes: int, mode: str, device: torch.device | None = None
) -> torch.Tensor | None:
    """Per-class loss weights, N / (K * count), that give every class the same total weight; None for "none"."""
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    if not counts.all():
        raise ConfigError("train.class_weights auto: a class has no training images", "train.class_weights")
    return torch.tensor(len(labels) / (classes * counts), dtype=torch.float32, device=device)


def weights_file(source: str, cache_root: Path) -> Path:
    """A weights file on disk: `source` itself, or a URL with a pinned checksum (`...#sha256=<64 hex digits>`)
    downloaded once into the cache and verified."""
    if not source.startswith(("http://", "https://")):
        return Path(source).expanduser()
    url, _, pin = source.partition("#sha256=")
    if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin.lower()):
        raise ConfigError(
            "train.weights by URL needs its SHA-256 pinned: https://.../file.safetensors#sha256=<64 hex digits>",
            "train.weights",
        )
    return download(url, cache_root / "weights" / f"{pin.lower()}.safetensors", sha256=pin.lower())


def load_compatible_weights(model: nn.Module, path: Path) -> None:
    """Every tensor of a safetensors file that fits the model by name and shape (a classifier for another number
    of classes is left as initialised); refuse a file that fits nothing else."""
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        message = f"{path}: not a readable safetensors file for train.weights ({error})"
        raise ConfigError(message, "train.weights") from None
    fitting, left = fitting_tensors(model, weights)
    if len(left) > 2:  # at most a classifier's weight and bias may differ
        raise ConfigError(
            f"{path}: its weights do not fit this model ({len(left)} of {len(model.state_dict())} tensors missing "
            f"or of another shape, first {left[0]}); train.weights needs a file of the same architecture",
            "train.weights",
        )
    model.load_state_dict(fitting, strict=False)


def warn_if_oversized(spec: ModelSpec, model: nn.Module, input_shape: tuple[int, int, int], classes: int) -> None:
    """Say so before training when the input size makes a model far larger than at the size it was made for
    (the tutorial models' dense layers grow with the image's area)."""
    name = spec.name
    channels, height, width = input_shape
    if spec.input_size is None or height * width <= spec.input_size**2:
        return
    count = parameter_count(model)
    designed = parameter_count(create_model(name, ImageShape(channels, spec.input_size, spec.input_size), classes))
    if count > 2 * designed:
        log.warning(
            "%s has %s parameters at %dx%d, %.0fx its %s at %dx%d it was made for: training will be slow and "
            "memory-hungry; a smaller data.image_size, or a model made for this size, trains faster",
            name, f"{count:,}", height, width, count / designed, f"{designed:,}", spec.input_size, spec.input_size,
        )  # fmt: skip


@contextlib.contextmanager
def reproducible(seed: int, device: torch.device) -> Iterator[None]:
    """For one run, and put back as they were after it: torch's global generators seeded (dropout draws from
    them), and cuDNN held to deterministic kernels (its default ones add in varying order on a GPU, so that
    two runs, or a run and its resumption, drift apart by rounding)."""
    kernels = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            yield
        finally:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = kernels


def global_rng_states() -> dict[str, Any]:
    """Python's, numpy's and torch's global generators, as plain lists and tensors (loadable with weights_only).

    Training draws only from its own seeded generators; these are kept so that any code that does use the
    global ones (a custom model's dropout, say) also resumes exactly."""
    name, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, np.asarray(keys).tolist(), position, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }


def restore_global_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
