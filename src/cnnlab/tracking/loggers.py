"""Experiment trackers a run also logs to (`train.system.log`): TensorBoard and MLflow, behind one interface.

While training, the main process logs each step's loss and learning rate, each epoch's metrics line, and at the
start the config (as parameters) with the machine kind and precision. Once the run's report is written,
`publish` adds what only a finished run has: the confusion matrix and a sample of predictions as images, the
final metrics beside the config, and (MLflow) the model files and report as artifacts.

A tracker that fails (a server gone away, a full disk) costs one warning and is dropped for the rest of the run:
it never stops training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from cnnlab.config import RunConfig
from cnnlab.errors import CnnlabError, first_line
from cnnlab.machine import this_machine
from cnnlab.models.files import read_info
from cnnlab.models.inference import Scores
from cnnlab.run_dir import RunDir

log = logging.getLogger("cnnlab")


@dataclasses.dataclass(frozen=True)
class RunFacts:
    """What a tracker is told when a run starts."""

    config: RunConfig
    run_dir: RunDir
    precision: str
    machine_kind: str


def parameters_of(config: RunConfig) -> dict[str, str | int | float | bool]:
    """The config as flat key = value pairs (train.optim.lr = 0.1), as trackers store parameters."""
    return {key: "none" if value is None else value for key, value in _flat(dataclasses.asdict(config))}


class Tracker(Protocol):
    name: str

    def start(self, run: RunFacts) -> None: ...
    def log_steps(self, steps: list[tuple[int, float, float]]) -> None: ...  # (step, loss, learning rate)
    def log_epoch(self, metrics: dict[str, Any]) -> None: ...
    def publish(self, run_dir: RunDir, final: dict[str, float]) -> None: ...
    def stopped(self) -> None: ...  # training ended early: interrupted or failed
    def close(self) -> None: ...


class Trackers:
    """The run's trackers, each call handed to every one; one that raises is warned of once and dropped."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def _each(self, call: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, call)(*args)
            except Exception as error:
                log.warning("%s: %s; cnnlab goes on without %s", tracker.name, first_line(error), tracker.name)
                self.trackers.remove(tracker)
                with contextlib.suppress(Exception):
                    tracker.close()

    def start(self, run: RunFacts) -> None:
        self._each("start", run)

    def log_steps(self, steps: list[tuple[int, float, float]]) -> None:
        self._each("log_steps", steps)

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        self._each("log_epoch", metrics)

    def publish(self, run_dir: RunDir, final: dict[str, float]) -> None:
        self._each("publish", run_dir, final)

    def stopped(self) -> None:
        self._each("stopped")

    def close(self) -> None:
        self._each("close")

    def __bool__(self) -> bool:
        return bool(self.trackers)


def open_trackers(names: str, run_dir: RunDir) -> Trackers:
    """The trackers `train.system.log` names ("none", "tensorboard", "mlflow" or both), for `run_dir`. A tracker
    whose package is missing is refused in one line naming the extra that installs it."""
    chosen: list[Tracker] = []
    for name in [] if names == "none" else names.split(","):
        if name == "tensorboard":
            from cnnlab.tracking.tensorboard import TensorBoardTracker

            chosen.append(TensorBoardTracker(run_dir))
        elif name == "mlflow":
            from cnnlab.tracking.mlflow import MlflowTracker

            chosen.append(MlflowTracker(run_dir))
        else:
            raise CnnlabError(f"train.log: unknown tracker {name!r}; tensorboard or mlflow")
    return Trackers(chosen)


def start_trackers(config: RunConfig, run_dir: RunDir, precision: str) -> Trackers:
    trackers = open_trackers(config.train.system.log, run_dir)
    trackers.start(RunFacts(config, run_dir, precision, this_machine().kind))
    return trackers


def publish(run_dir: Path) -> None:
    """Log a finished run's images, final metrics and files to the trackers its config names (after its report
    is written, so that the report goes too)."""
    folder = RunDir.existing(run_dir)
    config = folder.read_config()
    if config.train.system.log == "none":
        return
    info = read_info(folder / RunDir.INFO)
    scores = Scores.from_metrics(info.metrics, "test")
    numbers = {} if scores is None else scores.metrics("test")
    final = {key: value for key, value in numbers.items() if isinstance(value, float)}  # as each epoch's, named
    trackers = open_trackers(config.train.system.log, folder)
    trackers.publish(folder, final)
    trackers.close()


def missing_extra(name: str, error: ImportError) -> CnnlabError:
    return CnnlabError(f"--log {name} needs the {name} extra: pip install 'cnnlab[{name}]' ({first_line(error)})")


def _flat(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value if isinstance(value, str | int | float | bool | None) else str(value)
