"""Progress of a long step (decoding images, caching features, evaluating with TTA): on an interactive terminal a
transient bar with the count, the time spent and an estimate of the time left; elsewhere (a log, a pipe, or
inside `plain_lines`, which --quiet sets) one plain line once the step is done, when it took a while. Both go to
stderr, so that what a command prints on stdout (a table, JSON) stays clean."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import TypeVar

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
Advance = Callable[[int], None]  # told how many more items of the step are done

LINE_AFTER_S = 2.0  # a step shorter than this says nothing in plain lines
# Set within `plain_lines`: bars off (the scope of a --quiet command, not a setting of the process).
_bars_allowed: ContextVar[bool] = ContextVar("cnnlab_progress_bars", default=True)


@contextlib.contextmanager
def plain_lines() -> Iterator[None]:
    """No bars within: plain lines only, as on a log."""
    token = _bars_allowed.set(False)
    try:
        yield
    finally:
        _bars_allowed.reset(token)


@contextlib.contextmanager
def step(what: str, total: int, unit: str = "images", line: bool = True) -> Iterator[Advance]:
    """A step of `total` items, told of each one done through the `Advance` it yields (`line`: False where the
    caller says what the step did itself)."""
    console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
    started = time.perf_counter()
    if _bars_allowed.get() and sys.stderr.isatty():
        with bar(what, total, console) as advance:
            yield advance
    else:
        yield lambda done: None
        seconds = time.perf_counter() - started
        if line and seconds >= LINE_AFTER_S:
            console.print(f"{what}: {total:,} {unit} in {seconds:.1f}s")


@contextlib.contextmanager
def bar(what: str, total: int, console: Console) -> Iterator[Advance]:
    """A transient bar on `console`: the count, the time spent and the time left."""
    columns = (
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(what, total=total)
        yield lambda done: progress.advance(task, done)


def tracked(batches: Iterable[torch.Tensor], total: int, what: str, line: bool = True) -> Iterator[torch.Tensor]:
    """`batches` (of images: their first dimension) as they come, shown as a step of `total` images."""
    with step(what, total, line=line) as advance:
        for batch in batches:
            yield batch
            advance(len(batch))
