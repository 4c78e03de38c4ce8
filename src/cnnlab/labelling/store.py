"""The label file a person edits in the labelling page: every decision written to it at once, with a history.

The file is CSV, `path,label,excluded`, one row per labelled or excluded image (a multi-label image's labels in
one cell separated by ';'; an image with no row is unlabelled), and `split` when the file it started from had one
(kept as it was; an image labelled here goes to train). Each decision rewrites it whole and atomically
(`atomic_write`), then appends a line to `NAME.history.jsonl` beside it (who, when, which queue, the value before
and after), fsynced: a decision the page shows as saved is on disk. Decisions are serialised by a lock, and one
server holds the file (an exclusive lock on `NAME.lock`), so two tabs or two people lose nothing: the later
decision wins and the history keeps both. Undo restores a person's last decision's previous value, unless
someone changed the image since. Images are never moved, renamed or edited.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cnnlab.atomic import WriteError, atomic_write, remove_temporaries
from cnnlab.data.labels import HISTORY_SUFFIX, read_label_file
from cnnlab.errors import CnnlabError

SEPARATOR = ";"  # between a multi-label image's labels in one cell


@dataclass(frozen=True)
class Entry:
    """What the label file says of one image."""

    labels: tuple[str, ...] | None  # sorted; None: unlabelled; () multi-label data's "none of the classes"
    excluded: bool = False  # left out of training (its labels kept, for when it is brought back)

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels) if self.labels is not None else None, "excluded": self.excluded}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Entry:
        labels = value.get("labels")
        return cls(tuple(labels) if labels is not None else None, bool(value.get("excluded", False)))


UNLABELLED = Entry(None)


@dataclass(frozen=True)
class Decision:
    number: int  # its line in the history, from 1
    path: str
    before: Entry
    after: Entry
    who: str
    queue: str
    time: float  # seconds since the epoch
    undoes: int | None = None  # the decision this one undid

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "path": self.path,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "who": self.who,
            "queue": self.queue,
            "time": self.time,
            "undoes": self.undoes,
        }


class Conflict(CnnlabError):
    """An undo of a decision that someone changed since."""


class LabelStore:
    """The labels of `files` (paths relative to the data folder), from `path` (which need not exist yet, and may
    start from `initial` labels, as the folder's class folders give them)."""

    def __init__(self, path: Path, files: list[str], initial: dict[str, tuple[str, ...]] | None = None):
        if path.suffix.lower() != ".csv":
            raise CnnlabError(f"{path}: the labelling page writes CSV; give a .csv label file")
        self.path = path
        self.history_path = path.with_name(path.name + HISTORY_SUFFIX)
        self._lock = threading.Lock()
        self._held = _hold(path.with_name(f".{path.name}.lock"))
        remove_temporaries(path.parent, path.name)  # a write that a crash cut short; held, no one else writes
        self.entries: dict[str, Entry] = {name: Entry(labels) for name, labels in (initial or {}).items()}
        self.reading = "no label file yet: every image starts unlabelled" if not initial else "labels from folders"
        self.splits: dict[str, str] = {}  # the split column's value of each image that has one
        if path.exists():
            self.entries, self.splits, self.reading = _read(path, files)
        self.history = _read_history(self.history_path)
        self._undone = {decision.undoes for decision in self.history if decision.undoes is not None}

    def close(self) -> None:
        self._held.close()

    def entry(self, name: str) -> Entry:
        return self.entries.get(name, UNLABELLED)

    def decide(self, name: str, after: Entry, who: str, queue: str, undoes: int | None = None) -> Decision:
        """Record `after` for image `name`: the label file rewritten, then the history appended."""
        with self._lock:
            return self._record(name, after, who, queue, undoes)

    def _record(self, name: str, after: Entry, who: str, queue: str, undoes: int | None) -> Decision:
        before = self.entry(name)
        decision = Decision(len(self.history) + 1, name, before, after, who, queue, time.time(), undoes)
        entries = dict(self.entries)
        entries[name] = after
        if after == UNLABELLED:
            del entries[name]
        atomic_write(self.path, _csv(entries, self.splits))
        self.entries = entries
        _append(self.history_path, json.dumps(decision.to_dict()))
        self.history.append(decision)
        if undoes is not None:
            self._undone.add(undoes)
        return decision

    def undo(self, who: str) -> Decision | None:
        """Undo `who`'s last decision not yet undone: its image gets its previous value back. None: nothing to
        undo; Conflict: someone changed the image since."""
        with self._lock:
            last = next(
                (
                    decision
                    for decision in reversed(self.history)
                    if decision.who == who and decision.undoes is None and decision.number not in self._undone
                ),
                None,
            )
            if last is None:
                return None
            later = [d for d in self.history[last.number :] if d.path == last.path and d.who != who]
            if later and self.entry(last.path) != last.after:
                raise Conflict(f"{last.path} was changed by {later[-1].who} since; undo left it as it is")
            return self._record(last.path, last.before, who, last.queue, undoes=last.number)


def _hold(lock_path: Path) -> IO[str]:
    """An exclusive lock on `lock_path`, held while the store is open: one server per label file."""
    try:
        handle = open(lock_path, "a+")  # noqa: SIM115 - held open for the store's life
    except OSError as error:
        raise WriteError.of(lock_path, error) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise CnnlabError(f"{lock_path.name[1:-5]} is open in another labelling page; close that one first") from None
    return handle


def _csv(entries: dict[str, Entry], splits: dict[str, str]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "label", "excluded", *(["split"] if splits else [])])
    for name in sorted(entries):
        entry = entries[name]
        split = [splits.get(name, "train")] if splits else []
        writer.writerow([name, SEPARATOR.join(entry.labels or ()), int(entry.excluded), *split])
    return text.getvalue().encode()


def _read(path: Path, files: list[str]) -> tuple[dict[str, Entry], dict[str, str], str]:
    table = read_label_file(path, files, editing=True)
    entries = {row.path: Entry(row.labels, row.excluded) for row in table.rows}
    splits = {row.path: row.split.value for row in table.rows if row.split is not None}
    return entries, splits, table.reading


def _append(path: Path, line: str) -> None:
    try:
        with open(path, "a") as history:
            history.write(line + "\n")
            history.flush()
            os.fsync(history.fileno())
    except OSError as error:
        raise WriteError.of(path, error) from None


def _read_history(path: Path) -> list[Decision]:
    """The decisions recorded; a last line cut short by a crash is left out."""
    if not path.exists():
        return []
    decisions: list[Decision] = []
    for line in path.read_text().splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        decisions.append(
            Decision(
                len(decisions) + 1,
                value["path"],
                Entry.from_dict(value["before"]),
                Entry.from_dict(value["after"]),
                value["who"],
                value["queue"],
                value["time"],
                value.get("undoes"),
            )
        )
    return decisions
