"""Training a resolved config in a child process and reading the run back from its folder: the one path by which
`compare` and `bench` run what they set side by side.

A child of its own gives each run its own peak memory and no caches warmed by the run before; what the run
delivered is read from its folder (model.json holds the metrics of the epoch whose weights it kept), never
recomputed.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.atomic import write_text
from cnnlab.config import RunConfig, to_toml
from cnnlab.errors import CnnlabError
from cnnlab.models.files import read_info
from cnnlab.models.inference import Scores
from cnnlab.run_dir import RunDir


@dataclass
class RunOutcome:
    """What one run delivered, read back from its folder: the row `compare` tabulates and `bench` adds its
    timings to."""

    model: str
    recipe: str | None
    epochs: int  # trained
    kept_epoch: int  # whose weights the model has: the last, or the one early stopping kept
    scores: Scores  # on the test split, at the kept epoch
    train_seconds: float  # training only, every epoch trained, without the per-epoch evaluations
    run_dir: str

    def fields(self) -> dict[str, Any]:
        """Its fields by name, as they are: to make a row that extends it, `ComparisonRow(**outcome.fields(), ...)`."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON files have it: the scores by their one pair of names, beside the other fields."""
        fields = dataclasses.asdict(self)
        del fields["scores"]
        return fields | self.scores.to_dict()


@dataclass
class ChildRun:
    config: RunConfig
    history: list[dict[str, Any]]  # every epoch trained, as metrics.jsonl has them
    kept: dict[str, Any]  # the metrics of the epoch whose weights the model has (early stopping may keep an earlier)
    peak_rss_mb: float

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out or "")

    @property
    def scores(self) -> Scores:
        """The kept epoch's test scores, plain and delivered."""
        return self.scores_of(self.kept)

    def scores_of(self, metrics: dict[str, Any]) -> Scores:
        """The test scores one of the run's metrics lines recorded."""
        scores = Scores.from_metrics(metrics, "test")
        if scores is None:
            raise CnnlabError(f"{self.run_dir}: the run recorded no test scores")
        return scores

    @property
    def kept_epoch(self) -> int:
        return int(self.kept.get("best_epoch", self.kept["epoch"]))

    @property
    def train_seconds(self) -> float:
        """Training only, every epoch trained, without the per-epoch evaluations."""
        return float(sum(metrics["seconds"] for metrics in self.history))

    def outcome(self) -> RunOutcome:
        train = self.config.train
        return RunOutcome(
            train.model,
            train.recipe,
            len(self.history),
            self.kept_epoch,
            self.scores,
            self.train_seconds,
            str(self.run_dir),
        )


def train_in_child(
    config: RunConfig, train_flags: Sequence[str] = (), echo: Callable[[str], object] | None = None
) -> ChildRun:
    """Train `config` (its `out` set) in a `cnnlab train` child process with any more `train_flags`, each line
    it prints handed to `echo`; a failed run is one error naming its last line."""
    assert config.out, "a child run needs its output folder"
    with tempfile.TemporaryDirectory() as scratch:
        config_file = Path(scratch) / RunDir.CONFIG
        write_text(config_file, to_toml(config))
        command = [sys.executable, "-m", "cnnlab", "train", "--config", str(config_file), "--no-report", "-q"]
        process = subprocess.Popen(
            [*command, *train_flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None  # stdout=PIPE
        lines = []
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if echo is not None:
                echo(lines[-1])
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        last = lines[-1] if lines else f"exit status {process.returncode}"
        raise CnnlabError(f"the run of {config.train.recipe or config.train.model} failed: {last}")
    info = read_info(RunDir(Path(config.out)) / RunDir.INFO)
    history = RunDir(Path(config.out)).read_metrics()
    return ChildRun(config, history, info.metrics, usage.ru_maxrss / 1024)  # Linux reports KiB
