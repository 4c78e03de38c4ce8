"""The step and the epoch: what one training step does, and one epoch of them, top to bottom."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.data import Dataset
from cnnlab.data.augment import jittered
from cnnlab.data.loader import Batch, in_order
from cnnlab.data.transforms import downscaled, to_input
from cnnlab.machine import synchronize
from cnnlab.models.inference import Logits, Scores, predict
from cnnlab.train.optim import LOOKAHEAD_EVERY, LOOKAHEAD_START_EPOCH, Lookahead, lookahead_decay
from cnnlab.train.progress import Reporter
from cnnlab.train.runtime import release_freed_memory
from cnnlab.train.signals import StopOnSignal, TrainingStopped
from cnnlab.train.state import NonFiniteLoss, PartialEpoch, Recorder, TrainState

REPORT_EVERY = 25  # steps between progress-bar updates; each update reads the loss back from the device


# One epoch of a run: (epoch, after_step) -> its metrics.jsonl line; it calls after_step(epoch, step) after each
# step it wants to be stoppable or checkpointable at.
EpochFunction = Callable[[int, Callable[[int, int], None]], dict[str, Any]]


def train_epochs(
    state: TrainState,
    dataset: Dataset,
    recorder: Recorder,
    reporter: Reporter,
    one_epoch: EpochFunction | None = None,
) -> None:
    """Every epoch still to train (`one_epoch`, by default an epoch of the image loop), each checkpointed and
    logged. SIGINT and SIGTERM stop training at the next step (or epoch end), on every process, after a checkpoint.
    With `patience`, training stops once the validation loss has not improved for that many epochs, and the model
    keeps the weights of the best epoch (of this phase or an earlier one)."""
    settings, ranks = state.settings, state.ranks
    with StopOnSignal() as stop:

        def after_step(epoch: int, step: int) -> None:
            # Every process stops at the same step, so that the checkpoint's collectives line up.
            if ranks.any(stop.signal is not None):
                recorder.save_checkpoint(epoch, step)
                raise TrainingStopped(stop.signal or signal.SIGTERM, recorder.run_dir.path, epoch, step)
            if settings.checkpoint_every and state.global_step(epoch, step) % settings.checkpoint_every == 0:
                recorder.save_checkpoint(epoch, step)

        def image_epoch(epoch: int, after_step: Callable[[int, int], None]) -> dict[str, Any]:
            return epoch_metrics(state, dataset, train_epoch(state, epoch, reporter, after_step))

        for epoch in range(len(state.history) + 1, state.last_epoch + 1):
            reporter.epoch_started(epoch, state.last_epoch, state.steps_in_epoch(epoch))
            metrics = (one_epoch or image_epoch)(epoch, after_step)
            if epoch == 1:  # what the run spent before its first step, for the time it takes to deliver
                metrics["init_seconds"] = state.init_seconds
            state.history.append(metrics)
            recorder.save_checkpoint(epoch, state.steps_in_epoch(epoch))
            recorder.log_epoch(metrics)
            reporter.epoch_done(metrics)
            if ranks.any(stop.signal is not None):  # a signal during the evaluation, or an epoch without steps
                steps = state.steps_in_epoch(epoch)
                raise TrainingStopped(stop.signal or signal.SIGTERM, recorder.run_dir.path, epoch, steps)
            if state.stopping.should_stop(state.model, metrics, state.first_epoch):
                reporter.message(f"early stop: no better validation loss for {settings.patience} epochs")
                break
    if state.stopping.best is not None:
        loss, epoch, weights = state.stopping.best
        state.model.load_state_dict(weights)
        state.best_epoch = epoch
        reporter.message(f"kept epoch {epoch}, the best validation loss ({loss:.4f})")


def train_step(
    state: TrainState, forward: nn.Module, batch: Batch, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on this process's shard of a global batch, its images seen at `size` (height, width);
    returns each image's loss and its logits."""
    settings = state.settings
    with torch.autocast(state.ranks.device.type, dtype=torch.bfloat16, enabled=state.bf16):
        x = to_input(batch.images, state.normalization)
        if batch.jitter is not None:
            x = jittered(x, batch.jitter)
        logits = forward(downscaled(x, size))
        losses = F.cross_entropy(
            logits.float(),
            batch.labels,
            weight=state.class_weights,
            label_smoothing=settings.label_smoothing,
            reduction="none",
        )
        summed = losses.sum()
    # DDP averages the processes' gradients: scaled so, the step is that of the global batch's mean loss.
    loss = summed * (state.ranks.world_size / batch.size if batch.count else 0.0)
    if not torch.isfinite(loss):
        raise NonFiniteLoss("non-finite loss")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    state.optimizer.step()
    state.schedule.step()
    return losses.detach(), logits.detach()


def train_epoch(
    state: TrainState, epoch: int, reporter: Reporter, after_step: Callable[[int, int], None]
) -> dict[str, Any]:
    """Train one epoch, or finish the one a mid-epoch checkpoint stopped in; `after_step(epoch, step)` runs
    after every step with the state complete (it may checkpoint, or raise to stop). Returns the training
    metrics, summed over the processes."""
    model, ranks = state.model, state.ranks
    model.train()
    if state.unfrozen_at is not None:  # fine-tuning keeps the pretrained BatchNorm statistics; its affines learn
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    if state.spec.start_epoch is not None:
        state.spec.start_epoch(model, epoch, state.settings.whiten_bias_epochs)
    forward = ranks.wrap(state.compiled)  # after start_epoch: DDP must see which parameters learn
    resumed = state.partial if state.partial is not None and state.partial.epoch == epoch else None
    progress = resumed or PartialEpoch(
        epoch, 0, torch.tensor(0.0, device=ranks.device), torch.tensor(0, device=ranks.device), 0, 0.0
    )
    started = time.perf_counter() - progress.seconds
    steps = state.steps_in_epoch(epoch)
    for step, batch in state.batches.epoch(epoch, steps, done=progress.step):
        global_step = state.global_step(epoch, step)
        size = state.input_size_at(global_step)
        if global_step > 1 and size != state.input_size_at(global_step - 1):
            release_freed_memory()  # the heap kept for the last size fits this one badly
        try:
            losses, logits = train_step(state, forward, batch, size)
        except NonFiniteLoss:
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch} step {step}; the last checkpoint is kept") from None
        if batch.indices is not None:  # hard-example selection ranks the next epoch's images by these
            state.batches.record_losses(batch.indices, ranks.gather_rows(losses[: batch.count], batch.size))
        average_weights(state, epoch, global_step)
        if batch.count:
            progress.loss_sum += losses.sum()
            progress.correct += (logits.argmax(1) == batch.labels).sum()
            progress.seen += batch.count
        progress.step, progress.seconds = step, time.perf_counter() - started
        state.partial = progress
        if step % REPORT_EVERY == 0:  # this process's share: close enough for a progress bar
            seen = max(progress.seen, 1)
            speed = progress.seen * ranks.world_size / progress.seconds
            reporter.steps_done(step, progress.loss_sum.item() / seen, progress.correct.item() / seen, speed)
        after_step(epoch, step)
    state.partial = None
    if state.lookahead is not None:
        state.lookahead.update(model, decay=1.0)  # end the epoch on the averaged weights
    ranks.copy_buffers_from_main(model)
    loss_sum, correct, seen = state.summed(progress.loss_sum, progress.correct, progress.seen)
    synchronize(ranks.device)
    seconds = time.perf_counter() - started
    return {
        "epoch": epoch,
        "train_loss": loss_sum / seen,
        "train_acc": correct / seen,
        "seconds": seconds,
        "images": seen,
    }


def average_weights(state: TrainState, epoch: int, global_step: int) -> None:
    """Lookahead: from LOOKAHEAD_START_EPOCH, every LOOKAHEAD_EVERY steps, pull the weights to their average."""
    if not state.settings.lookahead or epoch < LOOKAHEAD_START_EPOCH or global_step % LOOKAHEAD_EVERY:
        return
    if state.lookahead is None:
        state.lookahead = Lookahead(state.model)
    else:
        state.lookahead.update(state.model, lookahead_decay(global_step, state.total_steps))


def evaluate_splits(state: TrainState, dataset: Dataset) -> dict[str, float]:
    """Validation and test scores, plain and with the recipe's TTA (each process scores its shard), and the
    seconds the test split's predictions took: what delivering the accuracy costs after training."""
    metrics: dict[str, float] = {}
    release_freed_memory()  # evaluation's shapes differ from training's: the kept heap would not fit them
    for name, split in (("val", dataset.val), ("test", dataset.test)):
        if split is None:
            continue
        started = time.perf_counter()
        mine = state.ranks.shard(len(split))
        images = in_order(split.images[mine])
        settings = state.settings
        shard = predict(
            state.model, images, state.normalization, state.ranks.device, settings.tta, state.bf16, settings.tta_below
        )
        gathered = Logits(
            state.ranks.gather_rows(shard.plain, len(split)),
            state.ranks.gather_rows(shard.delivered, len(split)),
            shard.tta,
            state.ranks.gather_rows(shard.viewed, len(split)),
        )
        metrics |= Scores.of(gathered, split.labels).metrics(name)
        synchronize(state.ranks.device)
        metrics[f"{name}_seconds"] = time.perf_counter() - started
    release_freed_memory()  # nor would the heap evaluation leaves fit training's
    return metrics


def epoch_metrics(state: TrainState, dataset: Dataset, training: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl line: training figures, then validation and test scores, learning rate and speed."""
    seconds = training["seconds"]
    metrics = {key: training[key] for key in ("epoch", "train_loss", "train_acc")} | evaluate_splits(state, dataset)
    return metrics | {
        "lr": state.optimizer.param_groups[0]["lr"],
        "seconds": seconds,
        "images_per_s": training["images"] / seconds,
        "precision": state.precision,
    }
