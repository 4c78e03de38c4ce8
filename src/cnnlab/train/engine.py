"""The engine: one loop over a run's phases and their epochs, and one training step that serves them all.

    for each phase still to train (`train.phases`: images; or head, then unfreeze):
        for each epoch:
            for each batch:  train_step, then the hooks' after_step
            the phase scores the epoch: a metrics.jsonl line
            early stopping remembers the best epoch; checkpoint, log, report; stop on a signal or early
        the model takes the best epoch's weights

The hooks, in the order they run after each step: hard-example selection records each image's loss, lookahead
averages the weights (and after the phase's last step leaves them on the average), progress reports, checkpoints
are written (every N steps, and on SIGINT or SIGTERM, which then stop the run).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.profiler import record_function

from cnnlab.machine import synchronize
from cnnlab.train.optim import LOOKAHEAD_EVERY, LOOKAHEAD_START_EPOCH, Lookahead, lookahead_decay
from cnnlab.train.phases import Phase, StepBatch
from cnnlab.train.progress import Reporter
from cnnlab.train.signals import StopOnSignal, TrainingStopped
from cnnlab.train.state import NonFiniteLoss, PartialEpoch, Recorder, TrainState

T = TypeVar("T")

REPORT_EVERY = 25  # steps between progress-bar updates; each update reads the loss back from the device


def train(state: TrainState, recorder: Recorder, reporter: Reporter) -> None:
    """Every phase and epoch still to train, each epoch checkpointed and logged. SIGINT and SIGTERM stop training
    at the next step (or epoch end), on every process, after a checkpoint. With `patience`, a phase stops once
    the validation loss has not improved for that many epochs, and the model keeps the best epoch's weights
    (of this phase or an earlier one)."""
    settings, ranks = state.settings, state.ranks
    with StopOnSignal() as stop:
        hooks: tuple[Hook, ...] = (HardExampleSelection(), WeightAveraging(), Progress(reporter))
        if recorder.trackers:
            hooks += (StepLog(recorder),)
        hooks += (Checkpoints(recorder, stop),)
        phase: Phase | None = state.phase
        while phase is not None:
            phase.start(reporter)
            for epoch in range(max(len(state.history) + 1, phase.first_epoch), phase.last_epoch + 1):
                reporter.epoch_started(epoch, phase.last_epoch, phase.steps_in_epoch(epoch))
                metrics = train_epoch(state, phase, epoch, hooks)
                if epoch == 1:  # what the run spent before its first step, for the time it takes to deliver
                    metrics["init_seconds"] = state.init_seconds
                state.history.append(metrics)
                # Before the checkpoint: a run resumed from it must know this epoch if it was the best.
                stopping = state.stopping.should_stop(state.model, metrics, phase.first_epoch)
                recorder.save_checkpoint(epoch, phase.steps_in_epoch(epoch))
                recorder.log_epoch(metrics)
                reporter.epoch_done(metrics)
                if ranks.any(stop.signal is not None):  # a signal during the evaluation, or an epoch without steps
                    steps = phase.steps_in_epoch(epoch)
                    raise TrainingStopped(stop.signal or signal.SIGTERM, recorder.run_dir.path, epoch, steps)
                if stopping:
                    reporter.message(f"early stop: no better validation loss for {settings.optim.patience} epochs")
                    break
            keep_best(state, reporter)
            phase = state.next_phase()
            if phase is not None:
                state.phase = phase
                recorder.save_checkpoint(len(state.history), state.batches.steps_per_epoch)
                reporter.message(f"{phase.name}: {phase.epochs:g} epochs from epoch {phase.first_epoch}")


def keep_best(state: TrainState, reporter: Reporter) -> None:
    best = state.stopping.best
    if best is not None:
        loss, epoch, weights = best
        state.model.load_state_dict(weights)
        reporter.message(f"kept epoch {epoch}, the best validation loss ({loss:.4f})")


def train_step(phase: Phase, batch: StepBatch, global_step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of `phase` on a batch (this process's shard of a global batch); returns each image's
    loss and its logits, detached."""
    with record_function("forward"):
        logits = phase.forward(batch, global_step)
        loss, losses = phase.objective(logits, batch)
        if not torch.isfinite(loss):
            raise NonFiniteLoss("non-finite loss")
    with record_function("backward"):
        phase.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
    with record_function("optimizer"):
        phase.optimizer.step()
        phase.schedule.step()
    return losses, logits.detach()


@dataclass
class StepDone:
    """What the hooks see after a step."""

    state: TrainState
    phase: Phase
    epoch: int
    step: int  # 1-based, into the epoch
    global_step: int  # 1-based, into the phase
    batch: StepBatch
    losses: torch.Tensor  # (b,) each image's loss
    progress: PartialEpoch  # the epoch's totals, this step included


class Hook:
    """Something that happens around the steps; each method does nothing unless a hook says otherwise."""

    def after_step(self, done: StepDone) -> None:
        """After every step, with the state complete: may checkpoint, or raise to stop."""


def train_epoch(state: TrainState, phase: Phase, epoch: int, hooks: tuple[Hook, ...]) -> dict[str, Any]:
    """Train one epoch of `phase`, or finish the one a mid-epoch checkpoint stopped in, then score it: its
    metrics.jsonl line, training figures summed over the processes."""
    ranks = state.ranks
    phase.begin_epoch(epoch)
    resumed = state.partial if state.partial is not None and state.partial.epoch == epoch else None
    progress = resumed or PartialEpoch(
        epoch, 0, torch.tensor(0.0, device=ranks.device), torch.tensor(0, device=ranks.device), 0, 0.0
    )
    started = time.perf_counter() - progress.seconds
    for step, batch in labelled(phase.batches(epoch, progress.step), "data"):
        global_step = phase.global_step(epoch, step)
        try:
            losses, logits = train_step(phase, batch, global_step)
        except NonFiniteLoss:
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch} step {step}; the last checkpoint is kept") from None
        if batch.count:
            progress.loss_sum += losses.sum()
            progress.correct += (logits.argmax(1) == batch.labels).sum()
            progress.seen += batch.count
        progress.step, progress.seconds = step, time.perf_counter() - started
        state.partial = progress
        done = StepDone(state, phase, epoch, step, global_step, batch, losses, progress)
        with record_function("hooks"):
            for hook in hooks:
                hook.after_step(done)
    state.partial = None
    ranks.copy_buffers_from_main(state.model)
    loss_sum, correct, seen = state.summed(progress.loss_sum, progress.correct, progress.seen)
    synchronize(ranks.device)
    seconds = time.perf_counter() - started
    training = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen}
    return (
        training
        | phase.evaluate()
        | {
            "lr": phase.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "images_per_s": seen / seconds,
            "precision": state.precision,
        }
    )


def labelled(items: Iterator[T], label: str) -> Iterator[T]:
    """`items`, each one's production marked `label` for the profiler (`benchmarks/profile_epoch.py` reads
    the marks: data, forward, backward, optimizer, hooks)."""
    while True:
        with record_function(label):
            item = next(items, None)
        if item is None:
            return
        yield item


class HardExampleSelection(Hook):
    """Records the loss each image of a global batch had, by which the next epoch selects its images."""

    def after_step(self, done: StepDone) -> None:
        batch = done.batch
        if batch.indices is not None:
            gathered = done.state.ranks.gather_rows(done.losses[: batch.count], len(batch.indices))
            done.state.batches.record_losses(batch.indices, gathered)


class WeightAveraging(Hook):
    """Lookahead: from LOOKAHEAD_START_EPOCH, every LOOKAHEAD_EVERY steps, pull the weights to their average;
    after the phase's last step, onto it. As in airbench94, the epochs before score the weights as they are: an
    epoch's end does not move them (snapping there would drop the steps since the last averaging)."""

    def after_step(self, done: StepDone) -> None:
        phase, model = done.phase, done.state.model
        if not (done.state.settings.optim.lookahead and phase.averages_weights) or done.epoch < LOOKAHEAD_START_EPOCH:
            return
        if done.global_step % LOOKAHEAD_EVERY == 0:
            if phase.lookahead is None:
                phase.lookahead = Lookahead(model)
            else:
                phase.lookahead.update(model, lookahead_decay(done.global_step, phase.total_steps))
        if done.global_step == phase.total_steps and phase.lookahead is not None:
            phase.lookahead.update(model, decay=1.0)


class Progress(Hook):
    """A progress bar's running loss, accuracy and speed, every REPORT_EVERY steps (this process's share)."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter

    def after_step(self, done: StepDone) -> None:
        if done.step % REPORT_EVERY:
            return
        progress = done.progress
        seen = max(progress.seen, 1)
        speed = progress.seen * done.state.ranks.world_size / progress.seconds
        self.reporter.steps_done(done.step, progress.loss_sum.item() / seen, progress.correct.item() / seen, speed)


class StepLog(Hook):
    """Each step's loss and learning rate, to the run's trackers: kept on the device and read back every
    REPORT_EVERY steps and at the epoch's end, so that a GPU is not made to wait at every step. Steps are numbered
    through the run: (epoch - 1) * the steps of a full epoch + the step."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.pending: list[tuple[int, torch.Tensor, float]] = []

    def after_step(self, done: StepDone) -> None:
        number = (done.epoch - 1) * done.state.batches.steps_per_epoch + done.step
        loss = done.losses[: done.batch.count].detach().mean()  # this process's images, without padding
        self.pending.append((number, loss, done.phase.optimizer.param_groups[0]["lr"]))
        if done.step % REPORT_EVERY == 0 or done.step == done.phase.steps_in_epoch(done.epoch):
            losses = torch.stack([loss for _, loss, _ in self.pending]).float().tolist()
            self.recorder.log_steps([(n, loss, lr) for (n, _, lr), loss in zip(self.pending, losses, strict=True)])
            self.pending.clear()


class Checkpoints(Hook):
    """A checkpoint every `checkpoint_every` steps of a phase; on SIGINT or SIGTERM, one and a stop (every
    process stops at the same step, so that the checkpoint's collectives line up)."""

    def __init__(self, recorder: Recorder, stop: StopOnSignal):
        self.recorder, self.stop = recorder, stop

    def after_step(self, done: StepDone) -> None:
        every = done.state.settings.system.checkpoint_every
        if done.state.ranks.any(self.stop.signal is not None):
            self.recorder.save_checkpoint(done.epoch, done.step)
            raise TrainingStopped(self.stop.signal or signal.SIGTERM, self.recorder.run_dir.path, done.epoch, done.step)
        if every and done.global_step % every == 0:
            self.recorder.save_checkpoint(done.epoch, done.step)
