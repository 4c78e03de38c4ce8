"""What happens around the training steps, as hooks on the engine's events. Each hook is given the components
it acts on when it is made, and each event carries only what it concerns:

    on_phase_start(PhaseStart)   Checkpoints (between phases), StepReport
    on_epoch_start(phase, epoch) StepReport
    after_step(StepDone)         HardExampleSelection, WeightAveraging, Checkpoints (every N steps), TrackerLog,
                                 StepReport, SignalStop
    on_epoch_end(EpochEnd)       EarlyStop, Checkpoints, MetricsLine, TrackerLog, StepReport, SignalStop
    on_phase_end(phase)          KeepBest
    on_train_end()               FinalModel

`Hooks` calls them in the order given, which is the order above within each event; a run has WeightAveraging
with optim.lookahead, and TrackerLog when it logs to a tracker.
"""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass
from typing import Any

import torch

from cnnlab.config import RunConfig
from cnnlab.data.loader import TrainBatches
from cnnlab.models import ModelInfo, save_model
from cnnlab.models.files import package_version
from cnnlab.run_dir import RunDir
from cnnlab.tracking.loggers import Trackers
from cnnlab.train.distributed import Ranks
from cnnlab.train.early_stopping import EarlyStopping
from cnnlab.train.optim import LOOKAHEAD_EVERY, LOOKAHEAD_START_EPOCH, Lookahead, lookahead_decay
from cnnlab.train.parts import Trainee
from cnnlab.train.phases import Phase, StepBatch
from cnnlab.train.record import Checkpointer, PartialEpoch, RunProgress, kept_metrics
from cnnlab.train.reporter import Reporter
from cnnlab.train.signals import StopOnSignal, TrainingStopped

REPORT_EVERY = 25  # steps between progress-bar updates; each update reads the loss back from the device


@dataclass
class PhaseStart:
    phase: Phase
    index: int  # into the run's plan
    resumed: bool  # continued from a checkpoint written in this phase


@dataclass
class StepDone:
    phase: Phase
    epoch: int
    step: int  # 1-based, into the epoch
    global_step: int  # 1-based, into the phase
    batch: StepBatch
    losses: torch.Tensor  # (b,) each image's loss
    progress: PartialEpoch  # the epoch's totals, this step included


@dataclass
class EpochEnd:
    phase: Phase
    epoch: int
    metrics: dict[str, Any]  # the epoch's metrics.jsonl line
    stop_phase: str | None = None  # set by a hook that ends the phase here: why, in words


class Hook:
    """Something that happens around the steps; each event does nothing unless a hook says otherwise."""

    def on_phase_start(self, start: PhaseStart) -> None:
        """After the phase has started (`Phase.start`), before its first epoch."""

    def on_epoch_start(self, phase: Phase, epoch: int) -> None:
        """Before the epoch's first step."""

    def after_step(self, done: StepDone) -> None:
        """After every step, with the run's state complete: may checkpoint, or raise to stop."""

    def on_epoch_end(self, end: EpochEnd) -> None:
        """After the epoch is scored and in the run's history."""

    def on_phase_end(self, phase: Phase) -> None:
        """After the phase's last epoch, or the one it stopped early at."""

    def on_train_end(self) -> None:
        """After the last phase."""


class Hooks(Hook):
    """Hooks called in order, each event in turn."""

    def __init__(self, *hooks: Hook):
        self.hooks = hooks

    def on_phase_start(self, start: PhaseStart) -> None:
        for hook in self.hooks:
            hook.on_phase_start(start)

    def on_epoch_start(self, phase: Phase, epoch: int) -> None:
        for hook in self.hooks:
            hook.on_epoch_start(phase, epoch)

    def after_step(self, done: StepDone) -> None:
        for hook in self.hooks:
            hook.after_step(done)

    def on_epoch_end(self, end: EpochEnd) -> None:
        for hook in self.hooks:
            hook.on_epoch_end(end)

    def on_phase_end(self, phase: Phase) -> None:
        for hook in self.hooks:
            hook.on_phase_end(phase)

    def on_train_end(self) -> None:
        for hook in self.hooks:
            hook.on_train_end()


class HardExampleSelection(Hook):
    """Records the loss each image of a global batch had, by which the next epoch selects its images."""

    def __init__(self, batches: TrainBatches, ranks: Ranks):
        self.batches, self.ranks = batches, ranks

    def after_step(self, done: StepDone) -> None:
        batch = done.batch
        if batch.indices is not None:
            self.batches.record_losses(
                batch.indices, self.ranks.gather_rows(done.losses[: batch.count], len(batch.indices))
            )


class WeightAveraging(Hook):
    """Lookahead: from LOOKAHEAD_START_EPOCH, every LOOKAHEAD_EVERY steps, pull the weights to their average;
    after the phase's last step, onto it. As in airbench94, the epochs before score the weights as they are: an
    epoch's end does not move them (snapping there would drop the steps since the last averaging)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def after_step(self, done: StepDone) -> None:
        phase = done.phase
        if not phase.averages_weights or done.epoch < LOOKAHEAD_START_EPOCH:
            return
        if done.global_step % LOOKAHEAD_EVERY == 0:
            if phase.lookahead is None:
                phase.lookahead = Lookahead(self.model)
            else:
                phase.lookahead.update(self.model, lookahead_decay(done.global_step, phase.total_steps))
        if done.global_step == phase.total_steps and phase.lookahead is not None:
            phase.lookahead.update(self.model, decay=1.0)


class EarlyStop(Hook):
    """With `patience`, ends a phase once the validation loss has not improved for that many epochs; remembers
    the best epoch's weights (before the checkpoint, so that a run resumed from it knows them)."""

    def __init__(self, stopping: EarlyStopping, model: torch.nn.Module):
        self.stopping, self.model = stopping, model

    def on_epoch_end(self, end: EpochEnd) -> None:
        if self.stopping.should_stop(self.model, end.metrics, end.phase.first_epoch):
            end.stop_phase = f"early stop: no better validation loss for {self.stopping.patience} epochs"


class KeepBest(Hook):
    """At a phase's end, the model takes the best epoch's weights that early stopping kept (of any phase)."""

    def __init__(self, stopping: EarlyStopping, model: torch.nn.Module, reporter: Reporter):
        self.stopping, self.model, self.reporter = stopping, model, reporter

    def on_phase_end(self, phase: Phase) -> None:
        if self.stopping.best is not None:
            loss, epoch, weights = self.stopping.best
            self.model.load_state_dict(weights)
            self.reporter.message(f"kept epoch {epoch}, the best validation loss ({loss:.4f})")


class Checkpoints(Hook):
    """A checkpoint at each epoch's end, every `every` steps of a phase (0: never), and when a later phase starts."""

    def __init__(self, checkpointer: Checkpointer, every: int):
        self.checkpointer, self.every = checkpointer, every

    def on_phase_start(self, start: PhaseStart) -> None:
        self.checkpointer.phase = start.phase
        if start.index > 0 and not start.resumed:
            epoch = len(self.checkpointer.progress.history)
            self.checkpointer.save(epoch, start.phase.steps_in_epoch(epoch))

    def after_step(self, done: StepDone) -> None:
        if self.every and done.global_step % self.every == 0:
            self.checkpointer.save(done.epoch, done.step)

    def on_epoch_end(self, end: EpochEnd) -> None:
        self.checkpointer.save(end.epoch, end.phase.steps_in_epoch(end.epoch))


class MetricsLine(Hook):
    """Each epoch's line in the run folder's metrics.jsonl (by the main process)."""

    def __init__(self, run_dir: RunDir, ranks: Ranks):
        self.run_dir, self.ranks = run_dir, ranks

    def on_epoch_end(self, end: EpochEnd) -> None:
        if self.ranks.is_main:
            self.run_dir.append_metrics(end.metrics)


class TrackerLog(Hook):
    """Each epoch's metrics, and each step's loss and learning rate, to the run's trackers. A step's loss stays
    on the device until every REPORT_EVERY steps and the epoch's end, so that a GPU is not made to wait at
    every step. Steps are numbered through the run: (epoch - 1) * the steps of a full epoch + the step."""

    def __init__(self, trackers: Trackers, steps_per_epoch: int):
        self.trackers, self.steps_per_epoch = trackers, steps_per_epoch
        self.pending: list[tuple[int, torch.Tensor, float]] = []

    def after_step(self, done: StepDone) -> None:
        number = (done.epoch - 1) * self.steps_per_epoch + done.step
        loss = done.losses[: done.batch.count].detach().mean()  # this process's images, without padding
        self.pending.append((number, loss, done.phase.optimizer.param_groups[0]["lr"]))
        if done.step % REPORT_EVERY == 0 or done.step == done.phase.steps_in_epoch(done.epoch):
            losses = torch.stack([loss for _, loss, _ in self.pending]).float().tolist()
            self.trackers.log_steps([(n, loss, lr) for (n, _, lr), loss in zip(self.pending, losses, strict=True)])
            self.pending.clear()

    def on_epoch_end(self, end: EpochEnd) -> None:
        self.trackers.log_epoch(end.metrics)


class StepReport(Hook):
    """The progress bar (or lines): each epoch, a running loss, accuracy and speed every REPORT_EVERY steps (this
    process's share), each epoch's line, and each later phase as it starts."""

    def __init__(self, reporter: Reporter, world_size: int):
        self.reporter, self.world_size = reporter, world_size

    def on_phase_start(self, start: PhaseStart) -> None:
        phase = start.phase
        if start.index > 0 and not start.resumed:
            self.reporter.message(f"{phase.name}: {phase.epochs:g} epochs from epoch {phase.first_epoch}")

    def on_epoch_start(self, phase: Phase, epoch: int) -> None:
        self.reporter.epoch_started(epoch, phase.last_epoch, phase.steps_in_epoch(epoch))

    def after_step(self, done: StepDone) -> None:
        if done.step % REPORT_EVERY:
            return
        progress = done.progress
        seen = max(progress.seen, 1)
        speed = progress.seen * self.world_size / progress.seconds
        self.reporter.steps_done(done.step, progress.loss_sum.item() / seen, progress.correct.item() / seen, speed)

    def on_epoch_end(self, end: EpochEnd) -> None:
        self.reporter.epoch_done(end.metrics)


class SignalStop(Hook):
    """On SIGINT or SIGTERM (caught by `stop`), a checkpoint and a stop at the next step; at an epoch's end, a stop
    after its checkpoint and line. Every process stops at the same step, so that the checkpoint's collectives
    line up."""

    def __init__(self, stop: StopOnSignal, checkpointer: Checkpointer, ranks: Ranks):
        self.stop, self.checkpointer, self.ranks = stop, checkpointer, ranks

    def after_step(self, done: StepDone) -> None:
        if self.ranks.any(self.stop.signal is not None):
            self.checkpointer.save(done.epoch, done.step)
            raise self.stopped(done.epoch, done.step)

    def on_epoch_end(self, end: EpochEnd) -> None:
        if self.ranks.any(self.stop.signal is not None):  # a signal during the evaluation, or an epoch without steps
            raise self.stopped(end.epoch, end.phase.steps_in_epoch(end.epoch))

    def stopped(self, epoch: int, step: int) -> TrainingStopped:
        return TrainingStopped(self.stop.signal or signal.SIGTERM, self.checkpointer.run_dir.path, epoch, step)


class FinalModel(Hook):
    """At the end, the trained model with what it needs to be used (`ModelInfo`), into the run folder."""

    def __init__(
        self,
        config: RunConfig,
        trainee: Trainee,
        classes: list[str],
        progress: RunProgress,
        stopping: EarlyStopping,
        run_dir: RunDir,
        ranks: Ranks,
    ):
        self.config, self.trainee, self.classes, self.progress = config, trainee, classes, progress
        self.stopping, self.run_dir, self.ranks = stopping, run_dir, ranks
        self.info: ModelInfo | None = None  # once training has ended

    def on_train_end(self) -> None:
        trainee, config = self.trainee, self.config
        metrics = kept_metrics(self.progress.history, self.stopping.best_epoch)
        self.info = ModelInfo(
            architecture=config.train.model,
            classes=self.classes,
            input_shape=trainee.input_shape,
            normalization=trainee.normalization,
            inference=config.train.inference,
            precision=trainee.precision,
            metrics=metrics,
            config=dataclasses.asdict(config),
            cnnlab_version=package_version(),
            thresholds=metrics.get("thresholds"),
        )
        if self.ranks.is_main:
            save_model(trainee.model, self.info, self.run_dir.path)
