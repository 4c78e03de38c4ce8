"""A run folder: the one place that knows its file names, how each is written and read, and what may resume.

    config.toml          the resolved RunConfig, headed by the precision it ran in
    metrics.jsonl        a JSON line per finished epoch
    sessions.jsonl       a JSON line each time the run starts or resumes: when, on what machine, in what precision
    checkpoint.pt        the whole training state, replaced atomically at each epoch end (and every N steps)
    model.safetensors    the final weights, and model.json describing them (see cnnlab.models.files)
    .lock                while a run writes the folder: flocked by that process, and holding its pid
    report.json, confusion_matrix.csv, report.html, *.png   written by evaluate and report
    tensorboard/, tracking.json   with train.system.log: TensorBoard's event files, the MLflow run's id

Every file is written through `cnnlab.atomic` (temporary in the same folder, fsync, rename, fsync the
folder), so a crash leaves the previous version or the new one.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import io
import json
import logging
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from cnnlab.atomic import append_line, atomic_write, remove_temporaries, write_text
from cnnlab.config import RunConfig, build, load_toml, to_toml
from cnnlab.data.dataset import Dataset
from cnnlab.errors import CnnlabError, first_line
from cnnlab.machine import this_machine

log = logging.getLogger("cnnlab")

# Bump when the checkpoint's contents change shape; a checkpoint of another format is refused, not misread.
# 3: the config in sections, and early stopping's best epoch; 2: the data order lives in the batch loader's state;
# 1 (unversioned) before.
CHECKPOINT_FORMAT = 3


@dataclass(frozen=True)
class RunDir:
    path: Path

    CONFIG = "config.toml"
    METRICS = "metrics.jsonl"
    CHECKPOINT = "checkpoint.pt"
    WEIGHTS = "model.safetensors"
    INFO = "model.json"
    DATA = "data.csv"  # what the run trained and was scored on: each image's path, class and split
    EVALUATION = "report.json"
    CONFUSION = "confusion_matrix.csv"
    REPORT = "report.html"
    LOCK = ".lock"
    SESSIONS = "sessions.jsonl"
    TENSORBOARD = "tensorboard"  # a folder of event files, with --log tensorboard
    TRACKING = "tracking.json"  # the MLflow run this run logs to, with --log mlflow

    @classmethod
    @contextlib.contextmanager
    def claim(cls, config: RunConfig) -> Iterator[RunDir]:
        """A new run's folder, locked while the run writes it: `config.out`, or runs/<model>-<data>-<time>.
        Refuses a folder that another process is writing, or that holds a run (checked once locked, so that
        of two runs started into one folder, exactly one trains)."""
        if config.out:
            path = Path(config.out).expanduser()
            if not path.parent.is_dir():
                raise CnnlabError(f"{path.parent}: the output folder's parent does not exist")
            run_dir = cls._writable(path, parents=False)
        else:
            run_dir = cls._writable(cls.default_path(config), parents=True)
        with run_dir.locked():
            run_dir._check_unused()
            yield run_dir

    def _check_unused(self) -> None:
        if self.has_checkpoint:
            raise CnnlabError(
                f"{self.path}: already holds a run; resume it, or choose another output folder"
            ).resumable(self.path)
        if (self / self.WEIGHTS).exists():
            raise CnnlabError(
                f"{self.path}: already holds a finished run ({self.WEIGHTS}, no checkpoint to resume); "
                "choose another output folder"
            )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock while a run writes it; a second process is refused in one line naming the
        first. The lock is an flock, which the kernel drops when its process ends however it ends: a pid left
        in the file by a killed run is a stale lock, taken over with a warning. The file goes when the run ends."""
        path = self / self.LOCK
        handle = self._take_lock(path)
        with handle:
            handle.seek(0)
            stale = handle.read().strip()
            if stale:
                log.warning("%s: took over the lock left by pid %s, which no longer runs", self.path, stale)
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            try:
                yield
            finally:
                path.unlink(missing_ok=True)  # before the flock goes: a newcomer then locks a new file
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _take_lock(self, path: Path) -> IO[str]:
        """The lock file, flocked by this process: the one at `path` (a file unlinked by a run that ended
        while this one opened it is no lock, and is opened again)."""
        while True:
            try:
                handle = open(path, "a+")  # noqa: SIM115  # held open for the whole run
            except OSError as error:
                raise CnnlabError(f"{path}: cannot create the run folder's lock ({error.strerror})") from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                handle.close()
                raise CnnlabError(
                    f"{self.path}: another cnnlab run (pid {owner}) is writing this folder; wait for it to end, "
                    "or choose another output folder"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                    return handle
            handle.close()

    @classmethod
    def default_path(cls, config: RunConfig) -> Path:
        """runs/<model>-<data>-<time>, numbered when that name is taken."""
        stem = f"{config.train.model}-{config.data.label}-{datetime.now():%Y%m%d-%H%M%S}"
        path, suffix = Path("runs") / stem, 1
        while path.exists():
            suffix += 1
            path = path.with_name(f"{stem}-{suffix}")
        return path

    @classmethod
    def _writable(cls, path: Path, parents: bool) -> RunDir:
        try:
            path.mkdir(parents=parents, exist_ok=True)
            (path / ".write-test").touch()
            (path / ".write-test").unlink()
        except OSError as error:
            raise CnnlabError(f"{path}: cannot write the run folder ({error.strerror})") from None
        return cls(path)

    @classmethod
    def existing(cls, path: Path) -> RunDir:
        if not path.is_dir():
            raise CnnlabError(f"{path}: no such run folder")
        return cls(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    @property
    def has_checkpoint(self) -> bool:
        return (self / self.CHECKPOINT).is_file()

    def write_data(self, dataset: Dataset) -> None:
        """data.csv: each image of a dataset read from files, with its class (for multi-label data, its classes,
        separated by ";") and split, as training read them."""
        table = io.StringIO(newline="")
        writer = csv.writer(table)
        writer.writerow(["path", "labels" if dataset.multi_label else "label", "split"])
        for name, split in dataset.splits().items():
            if split.names is None:
                return  # a dataset of arrays (digits, CIFAR archives): its order is its own
            for path, label in zip(split.names.tolist(), split.labels.tolist(), strict=True):
                carried = [dataset.classes[k] for k in np.flatnonzero(label)] if isinstance(label, list) else None
                writer.writerow([path, dataset.classes[label] if carried is None else ";".join(carried), name])
        write_text(self / self.DATA, table.getvalue())

    def write_config(self, config: RunConfig, precision: str) -> None:
        """config.toml: the resolved config, headed by a comment with the precision it resolved to here."""
        header = f"# precision {config.train.system.precision} ran as {precision} on {this_machine().describe()}\n"
        write_text(self / self.CONFIG, header + to_toml(config))

    def read_config(self) -> RunConfig:
        path = self / self.CONFIG
        return build(RunConfig, load_toml(path), str(path))

    def config_text(self) -> str:
        path = self / self.CONFIG
        return path.read_text() if path.is_file() else ""

    def record_session(self, precision: str) -> None:
        """A line in sessions.jsonl: this process starts (or resumes) training the run, now, here."""
        machine = this_machine()
        line = {
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "precision": precision,
            "machine_kind": machine.kind,
            "machine": machine.describe(),
        }
        append_line(self / self.SESSIONS, json.dumps(line))

    def read_sessions(self) -> list[dict[str, Any]]:
        return _json_lines(self / self.SESSIONS)

    @property
    def status(self) -> str:
        """ "running" while a process holds the folder's lock, "finished" once the final weights are written,
        "stopped" otherwise (interrupted, failed or killed: its checkpoint resumes it)."""
        with contextlib.suppress(FileNotFoundError), open(self / self.LOCK) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return "running"
            fcntl.flock(handle, fcntl.LOCK_UN)
        return "finished" if (self / self.WEIGHTS).is_file() else "stopped"

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Replace the checkpoint atomically. The state is serialised in memory first, so that a write failure
        surfaces as the operating system's reason (a WriteError: "No space left on device")."""
        buffer = io.BytesIO()
        torch.save({**state, "format_version": CHECKPOINT_FORMAT}, buffer)
        atomic_write(self / self.CHECKPOINT, buffer.getbuffer())

    def load_checkpoint(self) -> dict[str, Any]:
        """The checkpoint, read without running any pickled code (weights_only: tensors and plain containers)."""
        path = self / self.CHECKPOINT
        if not path.is_file():
            raise CnnlabError(f"{path}: no checkpoint there; nothing to resume")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
            raise CnnlabError(f"{path}: not a readable cnnlab checkpoint ({first_line(error)})") from None
        if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
            raise CnnlabError(f"{path}: not a cnnlab checkpoint")
        found = state.get("format_version", 1)
        if found != CHECKPOINT_FORMAT:
            raise CnnlabError(
                f"{path}: checkpoint format {found}, and this cnnlab resumes format {CHECKPOINT_FORMAT}; "
                "resume it with the cnnlab that wrote it, or train anew"
            )
        return state

    def restart_metrics(self, history: list[dict[str, Any]]) -> None:
        """Clear what a crash left (stray temporaries) and rewrite the metrics log from a checkpoint's history,
        dropping any epoch logged after that checkpoint was written."""
        remove_temporaries(self.path, self.CHECKPOINT, self.METRICS, self.WEIGHTS, self.INFO)
        write_text(self / self.METRICS, "".join(json.dumps(metrics) + "\n" for metrics in history))

    def append_metrics(self, metrics: dict[str, Any]) -> None:
        append_line(self / self.METRICS, json.dumps(metrics))

    def read_metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's lines, in this release's names whichever release wrote them."""
        lines = _json_lines(self / self.METRICS)
        oldest = any(key.endswith("_acc_tta") for line in lines[:1] for key in line)
        tta = self.read_config().train.inference.tta if oldest else "none"  # the views those lines do not name
        return [metrics_in_current_names(line, tta) for line in lines]

    def check_same_run(self, config: RunConfig, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume when config.toml no longer describes the checkpointed run (epochs may change)."""
        saved = checkpoint.get("config", {})
        before = _leaves({"data": saved.get("data", {}), "train": saved.get("train", {})})
        now = _leaves({"data": dataclasses.asdict(config.data), "train": dataclasses.asdict(config.train)})
        conflicts = [
            key
            for key in sorted(set(before) | set(now))
            if key != "train.optim.epochs" and before.get(key) != now.get(key)
        ]
        if conflicts:
            raise CnnlabError(
                f"{self.path}: {self.CONFIG} differs from the checkpointed run in {', '.join(conflicts)}; "
                "only epochs may change on resume"
            )

    def check_compatible(self, checkpoint: dict[str, Any], classes: list[str], input_shape: list[int]) -> None:
        """Refuse a checkpoint whose classes or input shape differ from what the data gives now."""
        if checkpoint.get("classes") != classes or checkpoint.get("input_shape") != input_shape:
            raise CnnlabError(
                f"{self.path}: the checkpoint was trained on classes {checkpoint.get('classes')} at input "
                f"{checkpoint.get('input_shape')}, but the data now gives {classes} at {input_shape}"
            )


# How metrics.jsonl lines of earlier releases named a split's scores, and the names they have now (`Scores`).
SPLIT_KEY_RENAMES = (
    ("{split}_acc", "{split}_plain_accuracy"),
    ("{split}_loss", "{split}_plain_loss"),
    ("{split}_delivered_acc", "{split}_delivered_accuracy"),
)


def metrics_in_current_names(metrics: dict[str, Any], tta: str = "none") -> dict[str, Any]:
    """A metrics line (or a model's kept metrics) of any release in this release's names: `train_accuracy`, and
    for each split `<split>_plain_accuracy`, `<split>_delivered_accuracy` and their losses. Lines written before
    the delivered entries had `<split>_acc_tta` alone, with the model's `tta`: their delivered loss is unknown."""
    renamed = {("train_accuracy" if key == "train_acc" else key): value for key, value in metrics.items()}
    for split in ("val", "test"):
        if f"{split}_acc" not in renamed:
            continue
        for old, new in SPLIT_KEY_RENAMES:
            if old.format(split=split) in renamed:
                renamed[new.format(split=split)] = renamed.pop(old.format(split=split))
        if f"{split}_delivered_accuracy" in renamed:
            continue
        older = renamed.pop(f"{split}_acc_tta", None)
        plain_loss, plain = renamed[f"{split}_plain_loss"], renamed[f"{split}_plain_accuracy"]
        renamed |= {
            f"{split}_delivered_loss": plain_loss if older is None else float("nan"),
            f"{split}_delivered_accuracy": plain if older is None else older,
            f"{split}_tta": "none" if older is None else tta,
            f"{split}_tta_share": 0.0 if older is None else renamed.get(f"{split}_tta_share", 1.0),
        }
    return renamed


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """A JSON-lines file's records. A last line cut short is left out: a crash mid-append leaves one, and the
    lines before it are whole (`--resume` continues from them and rewrites the file)."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
    return records


def _leaves(tables: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train.optim.lr": 0.1, ...}: every value of nested tables by its dotted key."""
    leaves: dict[str, Any] = {}
    for key, value in tables.items():
        if isinstance(value, dict) and value:
            leaves |= _leaves(value, f"{prefix}{key}.")
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves
