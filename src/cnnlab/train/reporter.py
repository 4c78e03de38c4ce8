"""How training reports itself: a live progress bar on a terminal, one line per epoch elsewhere."""

from __future__ import annotations

import sys
from typing import Any, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cnnlab.models.inference import Scores


class Reporter(Protocol):
    def epoch_started(self, epoch: int, epochs: float, steps: int) -> None: ...
    def steps_done(self, steps: int, loss: float, accuracy: float, images_per_s: float) -> None: ...
    def epoch_done(self, metrics: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


def epoch_line(metrics: dict[str, Any], epochs: float) -> str:
    """An epoch's line: its training figures, then each scored split's loss and delivered accuracy."""
    parts = [f"epoch {metrics['epoch']}/{epochs:g}"]
    parts += [f"{key} {metrics[key]:.4f}" for key in ("train_loss", "train_accuracy") if key in metrics]
    for split in ("val", "test"):
        scores = Scores.from_metrics(metrics, split)
        if scores is not None:
            parts.append(f"{split}_loss {scores.plain_loss:.4f}  {split} {scores.describe()}")
    parts.append(f"{metrics['seconds']:.1f}s {metrics['images_per_s']:,.0f} img/s")
    return "  ".join(parts)


class LineReporter:
    """One line per epoch: for logs, pipes and --quiet."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(highlight=False, soft_wrap=True, markup=False)
        self.epochs = 0.0

    def epoch_started(self, epoch: int, epochs: float, steps: int) -> None:
        self.epochs = epochs

    def steps_done(self, steps: int, loss: float, accuracy: float, images_per_s: float) -> None:
        pass

    def epoch_done(self, metrics: dict[str, Any]) -> None:
        self.console.print(epoch_line(metrics, self.epochs))

    def message(self, text: str) -> None:
        self.console.print(text)

    def stop(self) -> None:
        pass


class BarReporter(LineReporter):
    """A bar per epoch with running loss, accuracy and images/s, then the epoch's line."""

    def __init__(self, console: Console | None = None):
        super().__init__(console)
        self.progress: Progress | None = None
        self.task = TaskID(0)

    def epoch_started(self, epoch: int, epochs: float, steps: int) -> None:
        super().epoch_started(epoch, epochs, steps)
        self.progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs:g}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.4f}  {task.fields[speed]:,.0f} img/s"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task("train", total=steps, loss=0.0, acc=0.0, speed=0.0)
        self.progress.start()

    def steps_done(self, steps: int, loss: float, accuracy: float, images_per_s: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=steps, loss=loss, acc=accuracy, speed=images_per_s)

    def epoch_done(self, metrics: dict[str, Any]) -> None:
        self.stop()
        super().epoch_done(metrics)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def default_reporter(quiet: bool = False) -> Reporter:
    return LineReporter() if quiet or not sys.stdout.isatty() else BarReporter()
