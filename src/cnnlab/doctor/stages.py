"""How the doctor reports its long steps: a progress bar per step on a terminal, a line per step elsewhere."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator

from rich.console import Console

from cnnlab.progress import Advance, bar


class Stages:
    """Each step of an examination, timed, with the process's peak memory at its end; shown as a bar where the
    output is a terminal (or `bars`)."""

    def __init__(self, console: Console | None = None, bars: bool | None = None, quiet: bool = False):
        self.console = console or Console(highlight=False, soft_wrap=True, markup=False)
        self.bars = sys.stdout.isatty() if bars is None else bars
        self.quiet = quiet
        self.seconds: dict[str, float] = {}  # each step's wall time
        self.peak_mb: dict[str, float] = {}  # the process's peak resident memory when each step ended, in MB

    @contextlib.contextmanager
    def step(self, name: str, total: int) -> Iterator[Advance]:
        started = time.perf_counter()
        if self.bars and not self.quiet:
            with bar(name, total, self.console) as advance:
                yield advance
        else:
            yield lambda done: None
        self.seconds[name] = time.perf_counter() - started
        self.peak_mb[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        if not self.quiet:
            self.console.print(f"{name}: {total:,} in {self.seconds[name]:.1f}s, peak RSS {self.peak_mb[name]:,.0f} MB")
