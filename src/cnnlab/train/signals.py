"""Stopping on a signal at a step boundary, after a checkpoint, instead of dying mid-step."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from cnnlab.errors import CnnlabError


class TrainingStopped(CnnlabError):
    """Training was asked to stop by a signal and saved a checkpoint first; exits 128 + the signal number."""

    def __init__(self, signal_number: int, run_dir: Path, epoch: int, step: int):
        name = signal.Signals(signal_number).name
        super().__init__(f"stopped by {name} at epoch {epoch} step {step}; checkpoint saved in {run_dir}")
        self.exit_code = 128 + signal_number
        self.resumable(run_dir)


class StopOnSignal:
    """While active, SIGINT and SIGTERM only set `signal`: training stops at the next step boundary, after
    saving, instead of dying mid-step. Outside the main thread (where handlers cannot be set) it does nothing."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        self.signal = number

    def __exit__(self, *_exc: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
