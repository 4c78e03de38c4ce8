"""Head-only fine-tuning: the frozen pretrained body runs once per image, then the classifier trains on the
features it gave, epoch by epoch, in milliseconds (fastai's first `fine_tune` phase, without the repeated
body passes)."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.data import Dataset, Split
from cnnlab.data.loader import in_order
from cnnlab.data.transforms import to_input
from cnnlab.errors import ConfigError
from cnnlab.models.inference import Logits, Scores
from cnnlab.train.loop import train_epochs
from cnnlab.train.progress import Reporter
from cnnlab.train.state import NonFiniteLoss, Recorder, TrainState

FEATURE_BATCH = 64  # images per body pass: bounds the activations of a 224 px network to a few hundred MB


@torch.no_grad()
def body_features(state: TrainState, split: Split, reporter: Reporter, name: str) -> torch.Tensor:
    """(N, F) features of a split's images from the frozen body, in eval mode (BatchNorm as pretrained)."""
    assert state.spec.split_head is not None
    features, _ = state.spec.split_head(state.model)
    state.model.eval()
    started, rows = time.perf_counter(), []
    with torch.autocast(state.ranks.device.type, dtype=torch.bfloat16, enabled=state.bf16):
        for batch in in_order(split.images, FEATURE_BATCH):
            rows.append(features(to_input(batch.to(state.ranks.device), state.normalization)).float())
    seconds = time.perf_counter() - started
    reporter.message(f"features of {len(split):,} {name} images in {seconds:.1f}s ({len(split) / seconds:,.0f} img/s)")
    return torch.cat(rows)


def fine_tune(state: TrainState, dataset: Dataset, recorder: Recorder, reporter: Reporter) -> None:
    """The head alone on cached features, then, with `unfreeze_epochs`, the whole network from the best head.
    One early stopping spans both phases: the model ends on the best epoch of either."""
    if state.unfrozen_at is None:
        train_head(state, dataset, recorder, reporter)
        if not state.settings.unfreeze_epochs:
            return
        state.unfreeze(len(state.history))
        recorder.save_checkpoint(len(state.history), state.steps_in_epoch(len(state.history)))
        reporter.message(f"unfreezing: the whole network trains for {state.settings.unfreeze_epochs:g} epochs")
    train_epochs(state, dataset, recorder, reporter)


def train_head(state: TrainState, dataset: Dataset, recorder: Recorder, reporter: Reporter) -> None:
    """Train the classifier on cached features, epoch by epoch, as `loop.train_epochs` runs epochs (with its
    checkpoints, signals and early stopping)."""
    if state.spec.split_head is None:
        raise ConfigError(f"train.head_only needs a model with a pretrained body; {state.spec.name} has none",
                          "train.head_only")  # fmt: skip
    if state.ranks.world_size > 1:
        raise ConfigError("train.head_only trains in seconds in one process; leave out nproc", "train.head_only")
    _, head = state.spec.split_head(state.model)
    splits = dataset.splits()
    cached = {name: body_features(state, split, reporter, name) for name, split in splits.items()}
    labels = {name: torch.from_numpy(split.labels).to(state.ranks.device) for name, split in splits.items()}
    train_epochs(state, dataset, recorder, reporter, lambda epoch, _: _epoch(state, head, cached, labels, epoch))


def _epoch(
    state: TrainState, head: nn.Module, cached: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], epoch: int
) -> dict[str, Any]:
    settings, generator = state.settings, state.batches.random
    started = time.perf_counter()
    head.train()
    features, targets = cached["train"], labels["train"]
    order = torch.randperm(len(targets), generator=generator).to(features.device)
    loss_sum, correct, seen = 0.0, 0, 0
    for start in range(0, len(order), settings.batch_size)[: state.steps_in_epoch(epoch)]:
        batch = order[start : start + settings.batch_size]
        logits = head(features[batch])
        loss = F.cross_entropy(
            logits, targets[batch], weight=state.class_weights, label_smoothing=settings.label_smoothing
        )
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch}; the last checkpoint is kept")
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        state.optimizer.step()
        state.schedule.step()
        loss_sum += loss.item() * len(batch)
        correct += int((logits.argmax(1) == targets[batch]).sum())
        seen += len(batch)
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen}
    head.eval()
    with torch.no_grad():
        for name in ("val", "test"):
            if name in cached:
                logits = head(cached[name]).float().cpu()
                metrics |= Scores.of(Logits.seen_once(logits), labels[name].cpu()).metrics(name)
    lr = state.optimizer.param_groups[0]["lr"]
    return metrics | {"lr": lr, "seconds": seconds, "images_per_s": seen / seconds, "precision": state.precision}
