"""The engine: one loop over a run's planned phases and their epochs, and one training step that serves them all.

    for each phase of the plan still to train (`train.plan`):
        for each epoch:
            for each batch: train_step, then the hooks' after_step
            the phase scores the epoch (its metrics.jsonl line), then the hooks' on_epoch_end
        the hooks' on_phase_end; the next phase is built, starting after the last epoch trained
    the hooks' on_train_end

What happens around the steps (checkpoints, early stopping, the metrics line, trackers, progress, weight
averaging, signals) is in `train.hooks`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch.profiler import record_function

from cnnlab.machine import synchronize
from cnnlab.train.hooks import EpochEnd, Hook, PhaseStart, StepDone
from cnnlab.train.phases import Phase, StepBatch
from cnnlab.train.plan import PhasePlan
from cnnlab.train.record import NonFiniteLoss, PartialEpoch, RunProgress, summed
from cnnlab.train.reporter import Reporter

T = TypeVar("T")
PhaseBuilder = Callable[[PhasePlan, int], Phase]  # (the plan's entry, its first epoch) -> the phase


def train(
    plan: list[PhasePlan], phase: Phase, build: PhaseBuilder, progress: RunProgress, hooks: Hook, reporter: Reporter
) -> None:
    """Train `phase` (the plan's entry `progress.phase_index`: new, or restored from a checkpoint when the run has
    history) from where `progress` is, then the plan's later phases, each built by `build` as it starts."""
    index, resumed = progress.phase_index, bool(progress.history) or progress.partial is not None
    while True:
        phase.start(reporter)
        hooks.on_phase_start(PhaseStart(phase, index, resumed))
        for epoch in range(max(len(progress.history) + 1, phase.first_epoch), phase.last_epoch + 1):
            hooks.on_epoch_start(phase, epoch)
            end = EpochEnd(phase, epoch, train_epoch(phase, epoch, progress, hooks))
            hooks.on_epoch_end(end)
            if end.stop_phase:
                reporter.message(end.stop_phase)
                break
        hooks.on_phase_end(phase)
        index += 1
        if index == len(plan):
            break
        progress.phase_index, progress.phase_first_epoch = index, len(progress.history) + 1
        phase, resumed = build(plan[index], progress.phase_first_epoch), False
    hooks.on_train_end()


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


def train_epoch(phase: Phase, epoch: int, progress: RunProgress, hooks: Hook) -> dict[str, Any]:
    """Train one epoch of `phase`, or finish the one a mid-epoch checkpoint stopped in, then score it: its
    metrics.jsonl line (training figures summed over the processes), added to the run's history."""
    ranks = phase.ranks
    phase.begin_epoch(epoch)
    resumed = progress.partial if progress.partial is not None and progress.partial.epoch == epoch else None
    totals = resumed or PartialEpoch(
        epoch, 0, torch.tensor(0.0, device=ranks.device), torch.tensor(0, device=ranks.device), 0, 0.0
    )
    started = time.perf_counter() - totals.seconds
    for step, batch in labelled(phase.epoch_batches(epoch, totals.step), "data"):
        global_step = phase.global_step(epoch, step)
        try:
            losses, logits = train_step(phase, batch, global_step)
        except NonFiniteLoss:
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch} step {step}; the last checkpoint is kept") from None
        if batch.count:
            totals.loss_sum += losses.sum()
            totals.correct += phase.loss.correct(logits, batch.labels)
            totals.seen += batch.count
        totals.step, totals.seconds = step, time.perf_counter() - started
        progress.partial = totals
        with record_function("hooks"):
            hooks.after_step(StepDone(phase, epoch, step, global_step, batch, losses, totals))
    progress.partial = None
    ranks.copy_buffers_from_main(phase.trainee.model)
    loss_sum, correct, seen = summed(ranks, totals.loss_sum, totals.correct, totals.seen)
    synchronize(ranks.device)
    seconds = time.perf_counter() - started
    metrics = {"epoch": epoch, "phase": phase.name, "train_loss": loss_sum / seen, "train_accuracy": correct / seen}
    metrics |= phase.score()
    metrics |= {
        "lr": phase.optimizer.param_groups[0]["lr"],
        "seconds": seconds,
        "images_per_s": seen / seconds,
        "precision": phase.trainee.precision,
    }
    if epoch == 1:  # what the run spent before its first step, for the time it takes to deliver
        metrics["init_seconds"] = progress.init_seconds
    progress.history.append(metrics)
    return metrics


def labelled(items: Iterator[T], label: str) -> Iterator[T]:
    """`items`, each one's production marked `label` for the profiler (`benchmarks/profile_epoch.py` reads
    the marks: data, forward, backward, optimizer, hooks)."""
    while True:
        with record_function(label):
            item = next(items, None)
        if item is None:
            return
        yield item
