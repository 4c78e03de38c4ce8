"""Every run under a folder at a glance: what it trained, what it delivered, how long it took, and where.

A run folder is any folder with a config.toml under the one listed (runs of `compare` and `bench` sit one level
down). Its figures are read back from its files, never recomputed: a finished run's delivered accuracy is its
model.json's (the epoch whose weights it kept), an unfinished one's the last epoch's that scored the test split.
Times compare only between runs of one machine kind, so the table keeps each kind apart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cnnlab.errors import CnnlabError, first_line
from cnnlab.models.files import read_info
from cnnlab.models.inference import Scores
from cnnlab.run_dir import RunDir

log = logging.getLogger("cnnlab")

UNKNOWN_MACHINE = "unknown machine"  # runs written before sessions.jsonl recorded one
SORT_KEYS = ("date", "accuracy", "time", "name", "model", "data")


@dataclass
class RunSummary:
    name: str  # the folder, relative to the one listed
    model: str
    data: str
    recipe: str | None
    epochs: int  # epochs trained so far
    epochs_planned: float
    delivered_accuracy: float | None  # test, with the model's TTA where it has one; None: not scored
    plain_accuracy: float | None  # test, each image seen once (multi-label models: the exact match, both)
    tta: str
    seconds: float  # training, every epoch so far, without the per-epoch evaluations
    machine_kind: str
    precision: str
    started: str  # ISO 8601, local time with its offset
    status: str  # "finished", "stopped" or "running" (see RunDir.status)
    history: list[dict[str, Any]] = field(repr=False, default_factory=list)  # metrics.jsonl
    delivered_map: float | None = None  # multi-label models: test mean average precision, their headline

    @property
    def headline(self) -> str:
        """The test score a table shows: "94.12%" accuracy (with its TTA), or a multi-label model's "mAP 0.9280"."""
        if self.delivered_map is not None:
            return f"mAP {self.delivered_map:.4f}"
        if self.delivered_accuracy is None:
            return "-"
        return f"{self.delivered_accuracy:.2%}" + ("" if self.tta == "none" else f" with {self.tta} TTA")

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in vars(self).items() if key != "history"}


def find_runs(root: Path) -> list[RunSummary]:
    """Every run folder under `root` (itself included), in no particular order; a folder whose files cannot be
    read is left out with a warning naming it."""
    if not root.is_dir():
        raise CnnlabError(f"{root}: no such folder of runs")
    runs = []
    for config in sorted(root.rglob(RunDir.CONFIG)):
        if any(part.startswith(".") for part in config.relative_to(root).parts):
            continue
        try:
            runs.append(summarize(RunDir(config.parent), root))
        except (CnnlabError, OSError, ValueError, KeyError) as error:
            log.warning("%s: not read as a run (%s)", config.parent, first_line(error))
    return runs


def summarize(folder: RunDir, root: Path) -> RunSummary:
    config = folder.read_config()
    history = folder.read_metrics()
    sessions = folder.read_sessions()
    status = folder.status
    if status == "finished":  # the kept epoch's scores, which may be an earlier one's
        scores = Scores.from_metrics(read_info(folder / RunDir.INFO).metrics, "test")
    else:
        scored = [scores for scores in (Scores.from_metrics(m, "test") for m in history) if scores is not None]
        scores = scored[-1] if scored else None
    first = sessions[0] if sessions else {}
    started = first.get("started") or datetime.fromtimestamp((folder / RunDir.CONFIG).stat().st_mtime).astimezone()
    return RunSummary(
        name=str(folder.path.relative_to(root)) if folder.path != root else folder.path.name,
        model=config.train.model,
        data=config.data.label,
        recipe=config.train.recipe,
        epochs=len(history),
        epochs_planned=config.train.optim.epochs,
        delivered_accuracy=scores.delivered_accuracy if scores else None,
        plain_accuracy=scores.plain_accuracy if scores else None,
        tta=scores.tta if scores else "none",
        seconds=float(sum(m.get("seconds", 0.0) for m in history)),
        machine_kind=machine_kind_of(sessions),
        precision=precision_of(sessions, history),
        started=started if isinstance(started, str) else started.isoformat(timespec="seconds"),
        status=status,
        history=history,
        delivered_map=scores.delivered_map if scores else None,
    )


def machine_kind_of(sessions: list[dict[str, Any]]) -> str:
    """The machine kind(s) a run trained on, from its sessions.jsonl: "A", or "A + B" when resumed elsewhere."""
    return " + ".join(dict.fromkeys(session["machine_kind"] for session in sessions)) or UNKNOWN_MACHINE


def precision_of(sessions: list[dict[str, Any]], history: list[dict[str, Any]]) -> str:
    """The precision(s) a run trained in: its sessions', or its metrics lines' for a run older than sessions.jsonl."""
    recorded = [session["precision"] for session in sessions] or [m["precision"] for m in history if "precision" in m]
    return " + ".join(dict.fromkeys(recorded))


def select(runs: list[RunSummary], model: str | None = None, data: str | None = None) -> list[RunSummary]:
    """The runs of `model` and of `data` (each a name, or a part of one)."""
    return [run for run in runs if (model is None or model in run.model) and (data is None or data in run.data)]


def by_machine(runs: list[RunSummary], sort: str = "date") -> dict[str, list[RunSummary]]:
    """The runs of each machine kind, each kind's sorted by `sort` (accuracy and time: best first; date: newest
    first; names: alphabetically); kinds in order of their runs' count, most first."""
    if sort not in SORT_KEYS:
        raise CnnlabError(f"--sort {sort}: sort by one of {', '.join(SORT_KEYS)}")
    keys = {
        "date": lambda r: r.started,
        "accuracy": lambda r: -1.0 if r.delivered_accuracy is None else (r.delivered_map or r.delivered_accuracy),
        "time": lambda r: -r.seconds,  # reversed below: the shortest first
        "name": lambda r: r.name,
        "model": lambda r: (r.model, r.name),
        "data": lambda r: (r.data, r.name),
    }
    descending = sort in ("date", "accuracy", "time")
    kinds: dict[str, list[RunSummary]] = {}
    for run in runs:
        kinds.setdefault(run.machine_kind, []).append(run)
    ordered = sorted(kinds.items(), key=lambda item: (-len(item[1]), item[0]))
    return {kind: sorted(group, key=keys[sort], reverse=descending) for kind, group in ordered}
