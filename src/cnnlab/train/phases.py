"""The phases a run trains in. Each supplies its batches, the parameters it trains with its optimizer and
schedule, what a step feeds the network and minimises, and how an epoch is scored:

- `ImagePhase`: the network on augmented image batches (every model trained from scratch; with
  `frozen_statistics`, the unfreeze phase of fine-tuning, after the head);
- `HeadPhase`: a pretrained model's classifier alone, on features its frozen body computes once per image
  (fastai's first `fine_tune` phase, without the repeated body passes).

`train.engine` runs any of them, epoch by epoch, with one step function.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.data import Dataset
from cnnlab.data.augment import jittered
from cnnlab.data.dataset import Pixels
from cnnlab.data.loader import Batch, in_order
from cnnlab.data.transforms import downscaled, to_input
from cnnlab.errors import ConfigError
from cnnlab.machine import DTYPES, synchronize
from cnnlab.models.inference import Logits, Scores, predict
from cnnlab.progress import tracked
from cnnlab.train.optim import Lookahead, make_layerwise_optimizer, make_optimizer, make_schedule, resolution_at
from cnnlab.train.runtime import release_freed_memory

if TYPE_CHECKING:
    from cnnlab.train.progress import Reporter
    from cnnlab.train.state import TrainState

FEATURE_BATCH = 64  # images per body pass: bounds the activations of a 224 px network to a few hundred MB


@dataclass
class FeatureBatch:
    """A batch of the head phase: cached body features and their classes."""

    features: torch.Tensor  # (b, F)
    labels: torch.Tensor  # (b,) int64
    indices: None = None  # no hard-example selection on features

    @property
    def count(self) -> int:
        return len(self.labels)


StepBatch = Batch | FeatureBatch


class Phase(abc.ABC):
    """Epochs `first_epoch` .. `last_epoch` of a run, trained by `optimizer` on `schedule`, one step per batch."""

    name = "phase"
    averages_weights = False  # with train.lookahead
    lookahead: Lookahead | None = None  # the average, once it is taken

    def __init__(self, state: TrainState, dataset: Dataset, first_epoch: int, epochs: float):
        self.state, self.dataset = state, dataset
        self.first_epoch, self.epochs = first_epoch, epochs
        self.total_steps = math.ceil(state.batches.steps_per_epoch * epochs)
        self.optimizer: torch.optim.Optimizer
        self.schedule: torch.optim.lr_scheduler.LambdaLR

    @property
    def last_epoch(self) -> int:
        return self.first_epoch - 1 + math.ceil(self.epochs)

    def global_step(self, epoch: int, step: int) -> int:
        """Steps into the phase."""
        return (epoch - self.first_epoch) * self.state.batches.steps_per_epoch + step

    def steps_in_epoch(self, epoch: int) -> int:
        """All steps of an epoch, or fewer in a fractional last epoch."""
        steps_per_epoch = self.state.batches.steps_per_epoch
        return min(steps_per_epoch, self.total_steps - (epoch - self.first_epoch) * steps_per_epoch)

    def start(self, reporter: Reporter) -> None:  # noqa: B027  # a hook: most phases need nothing first
        """Before the phase's first epoch trains (again, after a resume)."""

    @abc.abstractmethod
    def begin_epoch(self, epoch: int) -> None:
        """Put the trained modules in training mode for `epoch`."""

    @abc.abstractmethod
    def batches(self, epoch: int, done: int) -> Iterator[tuple[int, StepBatch]]:
        """Steps done+1 .. of `epoch`, each with its batch."""

    @abc.abstractmethod
    def forward(self, batch: StepBatch, global_step: int) -> torch.Tensor:
        """The (b, classes) logits a training step computes."""

    @abc.abstractmethod
    def objective(self, logits: torch.Tensor, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to backpropagate, and each image's (weighted, smoothed) cross-entropy, detached."""

    @abc.abstractmethod
    def evaluate(self) -> dict[str, Any]:
        """The epoch's validation and test scores, as metrics.jsonl entries."""

    def unfrozen_at(self) -> int | None:
        """For a checkpoint: the last head-only epoch before the unfreeze phase, in that phase; None otherwise."""
        return None


class ImagePhase(Phase):
    """The network trained on augmented images; its family's per-epoch changes apply (the whitening bias)."""

    name = "images"
    averages_weights = True

    def __init__(self, state: TrainState, dataset: Dataset, first_epoch: int, epochs: float):
        super().__init__(state, dataset, first_epoch, epochs)
        groups = state.model.parameter_groups()
        self.optimizer = make_optimizer(state.model, groups, state.settings.optim, DTYPES[state.precision])
        self.schedule = make_schedule(self.optimizer, state.settings.optim, self.total_steps)
        self.forward_module: nn.Module = state.compiled
        self.frozen_statistics = False  # BatchNorm's running statistics stay as they are (fine-tuning)

    def begin_epoch(self, epoch: int) -> None:
        state = self.state
        state.model.train()
        if self.frozen_statistics:
            for module in state.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        state.model.start_epoch(epoch, state.family)
        self.forward_module = state.ranks.wrap(state.compiled)  # after start_epoch: DDP must see which learn

    def batches(self, epoch: int, done: int) -> Iterator[tuple[int, StepBatch]]:
        yield from self.state.batches.epoch(epoch, self.steps_in_epoch(epoch), done=done)

    def input_size_at(self, global_step: int) -> tuple[int, int]:
        """The (height, width) that step `global_step` (1-based, into the phase) sees: smaller early with low_res."""
        _, height, width = self.state.input_shape
        return resolution_at(global_step - 1, self.total_steps, self.state.settings.augment, (height, width))

    def forward(self, batch: StepBatch, global_step: int) -> torch.Tensor:
        assert isinstance(batch, Batch)
        state = self.state
        size = self.input_size_at(global_step)
        if global_step > 1 and size != self.input_size_at(global_step - 1):
            release_freed_memory()  # the heap kept for the last size fits this one badly
        with torch.autocast(state.ranks.device.type, dtype=torch.bfloat16, enabled=state.bf16):
            x = to_input(batch.images, state.normalization)
            if batch.jitter is not None:
                x = jittered(x, batch.jitter)
            logits: torch.Tensor = self.forward_module(downscaled(x, size))
        return logits

    def objective(self, logits: torch.Tensor, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(batch, Batch)
        state = self.state
        losses = F.cross_entropy(
            logits.float(),
            batch.labels,
            weight=state.class_weights,
            label_smoothing=state.settings.optim.label_smoothing,
            reduction="none",
        )
        # DDP averages the processes' gradients: scaled so, the step is that of the global batch's mean loss.
        loss = losses.sum() * (state.ranks.world_size / batch.size if batch.count else 0.0)
        return loss, losses.detach()

    def evaluate(self) -> dict[str, Any]:
        return evaluate_splits(self.state, self.dataset)


class UnfreezePhase(ImagePhase):
    """After the head: the whole network with layer-wise learning rates on a triangle schedule of its own,
    BatchNorm statistics frozen (their scales and shifts learn)."""

    name = "unfreeze"

    def __init__(self, state: TrainState, dataset: Dataset, after_epoch: int):
        Phase.__init__(self, state, dataset, after_epoch + 1, state.settings.finetune.unfreeze_epochs)
        settings = state.settings
        split = state.model.split_head()
        assert split is not None, "the unfreeze phase follows the head phase"
        self.optimizer = make_layerwise_optimizer(state.model, split[1], settings.optim, settings.finetune)
        self.schedule = make_schedule(self.optimizer, dataclasses.replace(settings.optim, schedule="triangle"),
                                      self.total_steps)  # fmt: skip
        self.forward_module = state.compiled
        self.frozen_statistics = True

    def unfrozen_at(self) -> int | None:
        return self.first_epoch - 1


class HeadPhase(Phase):
    """The classifier alone, on the features the frozen body gives each image (computed when the phase starts)."""

    name = "head"

    def __init__(self, state: TrainState, dataset: Dataset, first_epoch: int, epochs: float):
        super().__init__(state, dataset, first_epoch, epochs)
        split = state.model.split_head()
        if split is None:
            raise ConfigError(f"train.head_only needs a model with a pretrained body; {state.spec.name} has none",
                              "train.head_only")  # fmt: skip
        if state.ranks.world_size > 1:
            raise ConfigError("train.head_only trains in seconds in one process; leave out nproc", "train.head_only")
        self.body, self.head = split
        groups = state.model.parameter_groups()
        self.optimizer = make_optimizer(state.model, groups, state.settings.optim, DTYPES[state.precision])
        self.schedule = make_schedule(self.optimizer, state.settings.optim, self.total_steps)
        self.features: dict[str, torch.Tensor] = {}  # split name -> (N, F)
        self.labels: dict[str, torch.Tensor] = {}

    def start(self, reporter: Reporter) -> None:
        device = self.state.ranks.device
        for name, split in self.dataset.splits().items():
            self.features[name] = self.body_features(split.images, reporter, name)
            self.labels[name] = torch.from_numpy(split.labels).to(device)

    @torch.no_grad()
    def body_features(self, images: Pixels, reporter: Reporter, name: str) -> torch.Tensor:
        """(N, F) features of a split's images from the frozen body, in eval mode (BatchNorm as pretrained)."""
        state = self.state
        state.model.eval()
        started, rows = time.perf_counter(), []
        with torch.autocast(state.ranks.device.type, dtype=torch.bfloat16, enabled=state.bf16):
            batches = tracked(in_order(images, FEATURE_BATCH), len(images), f"{name} features", line=False)
            for batch in batches:
                rows.append(self.body(to_input(batch.to(state.ranks.device), state.normalization)).float())
        seconds = time.perf_counter() - started
        count = sum(len(row) for row in rows)
        reporter.message(f"features of {count:,} {name} images in {seconds:.1f}s ({count / seconds:,.0f} img/s)")
        return torch.cat(rows)

    def begin_epoch(self, epoch: int) -> None:
        self.head.train()

    def batches(self, epoch: int, done: int) -> Iterator[tuple[int, StepBatch]]:
        features, labels = self.features["train"], self.labels["train"]
        order = self.state.batches.permutation(resumed=done > 0).to(features.device)
        batch_size = self.state.settings.optim.batch_size
        starts = range(0, len(order), batch_size)[done : self.steps_in_epoch(epoch)]
        for step, start in enumerate(starts, start=done + 1):
            rows = order[start : start + batch_size]
            yield step, FeatureBatch(features[rows], labels[rows])

    def forward(self, batch: StepBatch, global_step: int) -> torch.Tensor:
        assert isinstance(batch, FeatureBatch)
        logits: torch.Tensor = self.head(batch.features)
        return logits

    def objective(self, logits: torch.Tensor, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        weights, smoothing = self.state.class_weights, self.state.settings.optim.label_smoothing
        loss = F.cross_entropy(logits, batch.labels, weight=weights, label_smoothing=smoothing)
        with torch.no_grad():
            losses = F.cross_entropy(logits, batch.labels, weight=weights, label_smoothing=smoothing, reduction="none")
        return loss, losses

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        self.head.eval()
        metrics: dict[str, Any] = {}
        for name in ("val", "test"):
            if name in self.features:
                logits = self.head(self.features[name]).float().cpu()
                metrics |= Scores.of(Logits.seen_once(logits), self.labels[name].cpu()).metrics(name)
        return metrics


def evaluate_splits(state: TrainState, dataset: Dataset) -> dict[str, Any]:
    """Validation and test scores, plain and with the recipe's TTA (each process scores its shard), and the
    seconds the test split's predictions took: what delivering the accuracy costs after training."""
    metrics: dict[str, Any] = {}
    release_freed_memory()  # evaluation's shapes differ from training's: the kept heap would not fit them
    settings, ranks = state.settings, state.ranks
    for name, split in (("val", dataset.val), ("test", dataset.test)):
        if split is None:
            continue
        started = time.perf_counter()
        images = in_order(split.images[ranks.shard(len(split))])
        shard = predict(state.model, images, state.normalization, ranks.device, settings.inference.tta, state.bf16,
                        settings.inference.tta_below)  # fmt: skip
        gathered = Logits(
            ranks.gather_rows(shard.plain, len(split)),
            ranks.gather_rows(shard.delivered, len(split)),
            shard.tta,
            ranks.gather_rows(shard.viewed, len(split)),
        )
        metrics |= Scores.of(gathered, split.labels).metrics(name)
        synchronize(ranks.device)
        metrics[f"{name}_seconds"] = time.perf_counter() - started
    release_freed_memory()  # nor would the heap evaluation leaves fit training's
    return metrics
