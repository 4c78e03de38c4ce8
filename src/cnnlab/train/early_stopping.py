"""Early stopping: the weights of the epoch with the lowest validation loss, kept through checkpoints."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EarlyStopping:
    """Remembers the weights of the epoch with the lowest validation loss; with `patience` 0 it does nothing.
    Its state goes into every checkpoint, so that a run resumed after its best epoch still ends on it."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # (val loss, epoch, weights)

    def should_stop(self, model: nn.Module, metrics: dict[str, Any], phase_start: int) -> bool:
        """After epoch `metrics["epoch"]`: whether `patience` epochs since the later of the best epoch and
        `phase_start` (the phase's first epoch, which gets its own epochs to improve on an earlier best) have
        brought no better validation loss."""
        if not self.patience or "val_plain_loss" not in metrics:
            return False
        if self.best is None or metrics["val_plain_loss"] < self.best[0]:
            self.best = (metrics["val_plain_loss"], metrics["epoch"], copy.deepcopy(model.state_dict()))
        return bool(metrics["epoch"] - max(self.best[1], phase_start - 1) >= self.patience)

    @property
    def best_epoch(self) -> int | None:
        """The epoch whose weights are kept: the model has them once training has ended."""
        return self.best[1] if self.best is not None else None

    def state_dict(self) -> dict[str, Any] | None:
        if self.best is None:
            return None
        loss, epoch, weights = self.best
        return {"val_loss": loss, "epoch": epoch, "weights": weights}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.best = None if state is None else (state["val_loss"], state["epoch"], state["weights"])
