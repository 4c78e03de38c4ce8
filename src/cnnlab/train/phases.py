"""The phases a run trains in (`train.plan` says which). Each receives the components it uses, and supplies its
batches, the parameters it trains with its optimizer and schedule, what a step feeds the network and minimises,
and how an epoch is scored:

- `ImagePhase`: the network on augmented image batches (every model trained from scratch; with
  `frozen_statistics`, the unfreeze phase of fine-tuning, after the head);
- `HeadPhase`: a pretrained model's classifier alone, on features its frozen body computes once per image
  (fastai's first `fine_tune` phase, without the repeated body passes).

`train.engine` runs any of them, epoch by epoch, with one step function.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cnnlab.config import AugmentConfig, FinetuneConfig, InferenceConfig, OptimConfig, TrainConfig
from cnnlab.data import Dataset
from cnnlab.data.augment import jittered, resolution_at
from cnnlab.data.dataset import Pixels
from cnnlab.data.loader import Batch, in_order
from cnnlab.data.transforms import downscaled, to_input
from cnnlab.errors import ConfigError
from cnnlab.machine import DTYPES, synchronize
from cnnlab.models.inference import Logits, predict, scores_of_splits
from cnnlab.progress import tracked
from cnnlab.train.distributed import Ranks
from cnnlab.train.optim import Lookahead, make_layerwise_optimizer, make_optimizer, make_schedule
from cnnlab.train.parts import Trainee, TrainingParts
from cnnlab.train.plan import PhasePlan
from cnnlab.train.runtime import release_freed_memory

if TYPE_CHECKING:
    from cnnlab.train.reporter import Reporter

FEATURE_BATCH = 64  # images per body pass: bounds the activations of a 224 px network to a few hundred MB


@dataclass
class FeatureBatch:
    """A batch of the head phase: cached body features and their classes."""

    features: torch.Tensor  # (b, F)
    labels: torch.Tensor  # (b,) int64 class indices, or (b, K) uint8 multi-hot
    indices: None = None  # no hard-example selection on features

    @property
    def count(self) -> int:
        return len(self.labels)


StepBatch = Batch | FeatureBatch


Scorer = Callable[[], dict[str, Any]]  # an epoch's validation and test scores, as metrics.jsonl entries


class Phase(abc.ABC):
    """Epochs `first_epoch` .. `last_epoch` of a run, trained by `optimizer` on `schedule`, one step per batch."""

    name = "phase"
    averages_weights = False  # with optim.lookahead
    lookahead: Lookahead | None = None  # the average, once it is taken

    def __init__(self, parts: TrainingParts, first_epoch: int, epochs: float):
        self.trainee, self.batches, self.ranks, self.loss = parts.trainee, parts.batches, parts.ranks, parts.loss
        self.first_epoch, self.epochs = first_epoch, epochs
        self.total_steps = math.ceil(self.batches.steps_per_epoch * epochs)
        self.optimizer: torch.optim.Optimizer
        self.schedule: torch.optim.lr_scheduler.LambdaLR

    @property
    def last_epoch(self) -> int:
        return self.first_epoch - 1 + math.ceil(self.epochs)

    def global_step(self, epoch: int, step: int) -> int:
        """Steps into the phase."""
        return (epoch - self.first_epoch) * self.batches.steps_per_epoch + step

    def steps_in_epoch(self, epoch: int) -> int:
        """All steps of an epoch, or fewer in a fractional last epoch."""
        steps_per_epoch = self.batches.steps_per_epoch
        return min(steps_per_epoch, self.total_steps - (epoch - self.first_epoch) * steps_per_epoch)

    def start(self, reporter: Reporter) -> None:  # noqa: B027  # most phases need nothing first
        """Before the phase's first epoch trains (again, after a resume)."""

    @abc.abstractmethod
    def begin_epoch(self, epoch: int) -> None:
        """Put the trained modules in training mode for `epoch`."""

    @abc.abstractmethod
    def epoch_batches(self, epoch: int, done: int) -> Iterator[tuple[int, StepBatch]]:
        """Steps done+1 .. of `epoch`, each with its batch."""

    @abc.abstractmethod
    def forward(self, batch: StepBatch, global_step: int) -> torch.Tensor:
        """The (b, classes) logits a training step computes."""

    @abc.abstractmethod
    def objective(self, logits: torch.Tensor, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to backpropagate, and each image's (weighted, smoothed) cross-entropy, detached."""

    @abc.abstractmethod
    def score(self) -> dict[str, Any]:
        """The epoch's validation and test scores, as metrics.jsonl entries."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the phase: its optimizer, schedule and weight average."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if state["lookahead"] is not None:
            self.lookahead = Lookahead.from_state_dict(self.trainee.model, state["lookahead"])


class ImagePhase(Phase):
    """The network trained on augmented images; its family's per-epoch changes apply (the whitening bias)."""

    name = "images"
    averages_weights = True
    frozen_statistics = False  # BatchNorm's running statistics stay as they are (fine-tuning)

    def __init__(
        self,
        parts: TrainingParts,
        first_epoch: int,
        epochs: float,
        *,
        optim: OptimConfig,
        augment: AugmentConfig,
        scorer: Scorer,
    ):
        super().__init__(parts, first_epoch, epochs)
        self.augment, self.scorer = augment, scorer
        self.optimizer = self.make_optimizer(optim)
        self.schedule = make_schedule(self.optimizer, self.schedule_settings(optim), self.total_steps)
        self.forward_module: nn.Module = self.trainee.forward

    def make_optimizer(self, optim: OptimConfig) -> torch.optim.Optimizer:
        model = self.trainee.model
        return make_optimizer(model, model.parameter_groups(), optim, DTYPES[self.trainee.precision])

    def schedule_settings(self, optim: OptimConfig) -> OptimConfig:
        return optim

    def begin_epoch(self, epoch: int) -> None:
        model = self.trainee.model
        model.train()
        if self.frozen_statistics:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        model.start_epoch(epoch, self.trainee.family)
        self.forward_module = self.ranks.wrap(self.trainee.forward)  # after start_epoch: DDP must see which learn

    def epoch_batches(self, epoch: int, done: int) -> Iterator[tuple[int, StepBatch]]:
        yield from self.batches.epoch(epoch, self.steps_in_epoch(epoch), done=done)

    def input_size_at(self, global_step: int, full: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) that step `global_step` (1-based, into the phase) sees: smaller early with low_res."""
        return resolution_at(global_step - 1, self.total_steps, self.augment, full)

    def forward(self, batch: StepBatch, global_step: int) -> torch.Tensor:
        assert isinstance(batch, Batch)
        trainee = self.trainee
        full = trainee.input_shape.size
        size = self.input_size_at(global_step, full)
        if global_step > 1 and size != self.input_size_at(global_step - 1, full):
            release_freed_memory()  # the heap kept for the last size fits this one badly
        with torch.autocast(self.ranks.device.type, dtype=torch.bfloat16, enabled=trainee.bf16):
            x = to_input(batch.images, trainee.normalization)
            if batch.jitter is not None:
                x = jittered(x, batch.jitter)
            logits: torch.Tensor = self.forward_module(downscaled(x, size))
        return logits

    def objective(self, logits: torch.Tensor, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(batch, Batch)
        losses = self.loss.per_image(logits.float(), batch.labels)
        # DDP averages the processes' gradients: scaled so, the step is that of the global batch's mean loss.
        loss = losses.sum() * (self.ranks.world_size / batch.size if batch.count else 0.0)
        return loss, losses.detach()

    def score(self) -> dict[str, Any]:
        return self.scorer()


class UnfreezePhase(ImagePhase):
    """After the head: the whole network with layer-wise learning rates on a triangle schedule of its own,
    BatchNorm statistics frozen (their scales and shifts learn)."""

    name = "unfreeze"
    frozen_statistics = True

    def __init__(
        self,
        parts: TrainingParts,
        first_epoch: int,
        epochs: float,
        *,
        finetune: FinetuneConfig,
        optim: OptimConfig,
        augment: AugmentConfig,
        scorer: Scorer,
    ):
        self.finetune = finetune  # before the optimizer is made, which reads it
        super().__init__(parts, first_epoch, epochs, optim=optim, augment=augment, scorer=scorer)

    def make_optimizer(self, optim: OptimConfig) -> torch.optim.Optimizer:
        split = self.trainee.model.split_head()
        assert split is not None, "the unfreeze phase follows the head phase"
        return make_layerwise_optimizer(self.trainee.model, split[1], optim, self.finetune)

    def schedule_settings(self, optim: OptimConfig) -> OptimConfig:
        return dataclasses.replace(optim, schedule="triangle")


class HeadPhase(Phase):
    """The classifier alone, on the features the frozen body gives each image (computed when the phase starts)."""

    name = "head"

    def __init__(self, parts: TrainingParts, first_epoch: int, epochs: float, *, optim: OptimConfig, model_name: str):
        super().__init__(parts, first_epoch, epochs)
        trainee, ranks, self.dataset = parts.trainee, parts.ranks, parts.dataset
        model = trainee.model
        split = model.split_head()
        if split is None:
            raise ConfigError(
                f"train.head_only needs a model with a pretrained body; {model_name} has none", "train.head_only"
            )
        if ranks.world_size > 1:
            raise ConfigError("train.head_only trains in seconds in one process; leave out nproc", "train.head_only")
        self.body, self.head = split
        self.batch_size = optim.batch_size
        self.optimizer = make_optimizer(model, model.parameter_groups(), optim, DTYPES[trainee.precision])
        self.schedule = make_schedule(self.optimizer, optim, self.total_steps)
        self.features: dict[str, torch.Tensor] = {}  # split name -> (N, F)
        self.labels: dict[str, torch.Tensor] = {}

    def start(self, reporter: Reporter) -> None:
        for name, split in self.dataset.splits().items():
            self.features[name] = self.body_features(split.images, reporter, name)
            self.labels[name] = torch.from_numpy(split.labels).to(self.ranks.device)

    @torch.no_grad()
    def body_features(self, images: Pixels, reporter: Reporter, name: str) -> torch.Tensor:
        """(N, F) features of a split's images from the frozen body, in eval mode (BatchNorm as pretrained)."""
        trainee, device = self.trainee, self.ranks.device
        trainee.model.eval()
        started, rows = time.perf_counter(), []
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=trainee.bf16):
            batches = tracked(in_order(images, FEATURE_BATCH), len(images), f"{name} features", line=False)
            for batch in batches:
                rows.append(self.body(to_input(batch.to(device), trainee.normalization)).float())
        seconds = time.perf_counter() - started
        count = sum(len(row) for row in rows)
        reporter.message(f"features of {count:,} {name} images in {seconds:.1f}s ({count / seconds:,.0f} img/s)")
        return torch.cat(rows)

    def begin_epoch(self, epoch: int) -> None:
        self.head.train()

    def epoch_batches(self, epoch: int, done: int) -> Iterator[tuple[int, StepBatch]]:
        features, labels = self.features["train"], self.labels["train"]
        order = self.batches.permutation(resumed=done > 0).to(features.device)
        starts = range(0, len(order), self.batch_size)[done : self.steps_in_epoch(epoch)]
        for step, start in enumerate(starts, start=done + 1):
            rows = order[start : start + self.batch_size]
            yield step, FeatureBatch(features[rows], labels[rows])

    def forward(self, batch: StepBatch, global_step: int) -> torch.Tensor:
        assert isinstance(batch, FeatureBatch)
        logits: torch.Tensor = self.head(batch.features)
        return logits

    def objective(self, logits: torch.Tensor, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.loss.mean(logits, batch.labels)
        with torch.no_grad():
            losses = self.loss.per_image(logits, batch.labels)
        return loss, losses

    @torch.no_grad()
    def score(self) -> dict[str, Any]:
        self.head.eval()
        scored: dict[str, tuple[Logits, np.ndarray]] = {
            name: (Logits.seen_once(self.head(self.features[name]).float().cpu()), self.labels[name].cpu().numpy())
            for name in ("val", "test")
            if name in self.features
        }
        return scores_of_splits(scored)


def build_phase(plan: PhasePlan, first_epoch: int, parts: TrainingParts, settings: TrainConfig) -> Phase:
    """The phase `plan` names, starting at `first_epoch`, from the run's parts and its config sections."""
    if plan.kind == "head":
        return HeadPhase(parts, first_epoch, plan.epochs, optim=settings.optim, model_name=settings.model)
    scorer = functools.partial(score_splits, parts.trainee, parts.dataset, settings.inference, parts.ranks)
    if plan.kind == "unfreeze":
        return UnfreezePhase(
            parts,
            first_epoch,
            plan.epochs,
            finetune=settings.finetune,
            optim=settings.optim,
            augment=settings.augment,
            scorer=scorer,
        )
    return ImagePhase(parts, first_epoch, plan.epochs, optim=settings.optim, augment=settings.augment, scorer=scorer)


def score_splits(trainee: Trainee, dataset: Dataset, inference: InferenceConfig, ranks: Ranks) -> dict[str, Any]:
    """Validation and test scores, plain and with the recipe's TTA (each process scores its shard), and the
    seconds the test split's predictions took: what delivering the accuracy costs after training."""
    scored, seconds = {}, {}
    release_freed_memory()  # evaluation's shapes differ from training's: the kept heap would not fit them
    for name, split in (("val", dataset.val), ("test", dataset.test)):
        if split is None:
            continue
        started = time.perf_counter()
        images = in_order(split.images[ranks.shard(len(split))])
        shard = predict(
            trainee.model,
            images,
            trainee.normalization,
            ranks.device,
            inference,
            trainee.bf16,
            multi_label=dataset.multi_label,
        )
        scored[name] = (
            Logits(
                ranks.gather_rows(shard.plain, len(split)),
                ranks.gather_rows(shard.delivered, len(split)),
                shard.tta,
                ranks.gather_rows(shard.viewed, len(split)),
            ),
            split.labels,
        )
        synchronize(ranks.device)
        seconds[f"{name}_seconds"] = time.perf_counter() - started
    release_freed_memory()  # nor would the heap evaluation leaves fit training's
    return scores_of_splits(scored) | seconds
