"""Label files: which images of a folder carry which labels, read from a CSV, TSV, JSON or JSON-lines file.

Shapes read, detected from the file and said in one line:
- one row per image, `path,label`; a cell may hold several labels (`"sea sunset"`, `sea;sunset`, `sea|sunset`, or a
  JSON list), which makes the data multi-label;
- one row per image with a 0/1 column per label (one-hot, or multi-hot);
- one row per image and label (the long form: an image on several rows);
- JSON: a list of {"image"/"file"/"path": ..., "label"/"labels": ...} objects, or {path: labels}.
The path and label columns are found by their names, or named; a file that could be read two ways is refused in
one line naming the choices, unless both readings agree. An optional `split` column (train/val/test) is kept; an
optional `excluded` column (0/1, as the labelling page writes) leaves its 1 rows out of training.
Paths are relative to the data folder; an ID without an extension is the one file of that stem; `class_names`
renames the labels. Nothing is ever moved or rewritten. Reading the file as a table is `tables.py`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from cnnlab.data.dataset import SplitName
from cnnlab.data.layout import Layout
from cnnlab.data.tables import (
    EXAMPLES,
    EXCLUDED_NAMES,
    PATH_NAMES,
    TableImage,
    find_column,
    images_of,
    label_columns,
    read_records,
)
from cnnlab.errors import CnnlabError, ConfigError

log = logging.getLogger("cnnlab")

FORMATS = (".csv", ".tsv", ".json", ".jsonl")
HISTORY_SUFFIX = ".history.jsonl"  # the labelling page's history of a label file, beside it (`labelling.store`)
READER_VERSION = 2  # in the decode cache's key: raise it when a file would be read otherwise


@dataclass(frozen=True)
class LabelFile:
    """Where an image folder's labels are, when not in its folder names (`data.labels`)."""

    path: Path
    path_column: str | None = None  # default: found by its name
    label_column: str | None = None
    class_names: str | None = None  # "1=cat,2=dog": names for the file's labels

    def identity(self) -> dict[str, Any]:
        """What a cache of the labelled dataset is keyed on: the file's name (its format, and the name its reading
        line gives it) and bytes, and how its columns are chosen."""
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest() if self.path.is_file() else "missing"
        columns = {"path_column": self.path_column, "label_column": self.label_column, "names": self.class_names}
        return {"labels": digest, "labels_name": self.path.name, "labels_reader": READER_VERSION, **columns}

    def layout(self, files: list[str], strict: bool) -> Layout:
        """The folder's images placed by this file: each named image in its class and split (train, unless the
        file's split column says otherwise), in the file's order; multi-label when any image has other than one
        label."""
        names = named_classes(self.class_names) if self.class_names else None
        table = read_label_file(
            self.path, files, path_column=self.path_column, label_column=self.label_column, strict=strict, names=names
        )
        index = {name: i for i, name in enumerate(files)}
        placed = [(index[row.path], (*row.labels, "")[0], row.split or SplitName.TRAIN) for row in table.rows]
        if not table.multi_label:
            return Layout(placed, table.classes, table.reading)
        several = sum(len(row.labels) != 1 for row in table.rows)
        reading = f"{table.reading}; multi-label (images with other than one label: {several:,})"
        return Layout(placed, table.classes, reading, [row.labels for row in table.rows])


@dataclass(frozen=True)
class LabelRow:
    path: str  # relative to the data folder, '/'-separated, as the folder's files are named
    labels: tuple[str, ...]  # sorted; empty: none of the labels (multi-label data only)
    split: SplitName | None  # from the file's split column; None: the seeded carve decides
    excluded: bool = False  # the file's excluded column says 1 (read only when editing)


@dataclass(frozen=True)
class LabelTable:
    rows: list[LabelRow]  # in the file's order, one per image
    classes: tuple[str, ...]  # sorted
    reading: str  # how the file was read, in words

    @property
    def multi_label(self) -> bool:
        """Whether any image has other than exactly one label."""
        return any(len(row.labels) != 1 for row in self.rows)


def read_label_file(
    path: Path,
    files: list[str],
    *,
    path_column: str | None = None,
    label_column: str | None = None,
    strict: bool = False,
    names: dict[str, str] | None = None,
    editing: bool = False,
) -> LabelTable:
    """The label file's table over `files` (the data folder's files, '/'-separated paths relative to it), its labels
    renamed by `names` when given (each label must have one). Rows marked excluded are left out, unless `editing`
    (the labelling page's reading: excluded rows kept and marked, rows with no label kept, and no class count
    required)."""
    if not path.is_file():
        raise CnnlabError(f"{path}: no such label file")
    if path.suffix.lower() not in FORMATS:
        raise CnnlabError(f"{path}: a label file is {', '.join(FORMATS)}; not {path.suffix or 'without a suffix'}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as spreadsheets write, is left out
    except UnicodeDecodeError as error:
        raise CnnlabError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    records, shape = read_records(path, text)
    if not records and editing:
        return LabelTable([], (), f"{path.name}: no rows yet")
    if not records:
        raise CnnlabError(f"{path}: no rows")
    columns = list(records[0])
    path_key = find_column(path, columns, path_column, PATH_NAMES, "path", records)
    split_key = next((key for key in columns if key.strip().lower() == "split"), None)
    excluded_key = next((key for key in columns if key.strip().lower() in EXCLUDED_NAMES), None)
    reserved = (path_key, split_key, excluded_key)
    label_keys, how = label_columns(path, records, [k for k in columns if k not in reserved], label_column)
    table = images_of(path, records, path_key, label_keys, split_key, excluded_key)
    excluded = {name for name, image in table.items() if image.excluded}
    if not editing:
        table = {name: image for name, image in table.items() if not image.excluded}
    rows = _resolved(path, table, files, strict, editing)
    if names is not None:
        rows = _renamed(path, rows, names)
    classes = tuple(sorted({label for row in rows for label in row.labels}))
    separators = sorted({image.separator for image in table.values() if image.separator})
    gathered = how == "column" and not separators and any(len(image.labels) > 1 for image in table.values())
    reading = f"{path.name}: {shape}, {len(rows):,} images; paths in '{path_key}', labels "
    reading += f"in '{label_keys[0]}'" if how == "column" else f"as {len(label_keys)} 0/1 columns"
    reading += " (the long form: an image on several rows)" if gathered else ""
    reading += f", several in a cell split at {' and '.join(map(repr, separators))}" if separators else ""
    reading += f", splits in '{split_key}'" if split_key else ""
    reading += f", {len(excluded):,} excluded in '{excluded_key}'" if excluded else ""
    if len(classes) < 2 and not editing:
        raise CnnlabError(f"{path}: {len(classes)} label(s) ({', '.join(classes)}); a classifier needs at least two")
    return LabelTable(rows, classes, reading)


def _resolved(
    path: Path, images: dict[str, TableImage], files: list[str], strict: bool, editing: bool = False
) -> list[LabelRow]:
    """The rows whose image is among `files`, each by the file's own path; what is left out is said in one line each
    (with `strict`, refused). When `editing`, rows with no label are kept and unnamed files are not counted."""
    present = set(files)
    by_stem: dict[str, list[str]] = defaultdict(list)
    for name in files:
        by_stem[str(PurePosixPath(name).with_suffix(""))].append(name)
    # An archive's single top folder is looked through, as the folder layouts do.
    tops = {name.split("/", 1)[0] for name in files}
    wrapper = f"{next(iter(tops))}/" if len(tops) == 1 and all("/" in name for name in files) else ""
    multi = any(len(image.labels) > 1 for image in images.values())
    rows, missing, unlabelled, ambiguous = [], [], [], []
    named = set()  # the folder's files that some row names
    for written, image in images.items():
        name = _inside(path, written)
        name = wrapper + name if wrapper and not name.startswith(wrapper) else name
        if name not in present and not PurePosixPath(name).suffix:
            matches = by_stem.get(name, [])
            if len(matches) > 1:
                ambiguous.append(f"{written} ({', '.join(matches[:EXAMPLES])})")
            name = matches[0] if len(matches) == 1 else name
        if name not in present:
            missing.append(written)
            continue
        named.add(name)
        if not image.labels and not multi and not editing:
            unlabelled.append(written)
        else:
            rows.append(LabelRow(name, tuple(sorted(image.labels)), image.split, image.excluded))
    if ambiguous:
        raise CnnlabError(f"{path}: {len(ambiguous)} ID(s) match several files: {'; '.join(ambiguous[:EXAMPLES])}")
    own = (path.name, path.name + HISTORY_SUFFIX)
    unnamed = [name for name in files if name not in named and name not in own] if not editing else []
    for count_of, what in (
        (missing, "rows whose image is not in the folder"),
        (unlabelled, "rows with no label (an image needs one unless the data is multi-label)"),
        (unnamed, "files in the folder that the label file does not name"),
    ):
        _left_out(path, count_of, what, strict)
    if not rows and not editing:
        raise CnnlabError(f"{path}: none of its rows names an image of the folder")
    return rows


def _left_out(path: Path, items: list[str], what: str, strict: bool) -> None:
    if not items:
        return
    more = ", ..." if len(items) > EXAMPLES else ""
    line = f"{path}: {len(items):,} {what}, left out: {', '.join(items[:EXAMPLES])}{more}"
    if strict:
        raise CnnlabError(line.replace(", left out:", " (data.strict):"))
    log.warning("%s", line)


def _inside(path: Path, written: str) -> str:
    """A path as the label file wrote it, relative to the data folder; one that is absolute or leads out is refused."""
    posix = PurePosixPath(written)
    if posix.is_absolute() or re.match(r"^[A-Za-z]:", written):
        raise CnnlabError(f"{path}: {written!r} is an absolute path; paths are relative to the data folder")
    parts: list[str] = []
    for part in posix.parts:
        if part == "..":
            if not parts:
                raise CnnlabError(f"{path}: {written!r} leads out of the data folder")
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts)


def named_classes(text: str) -> dict[str, str]:
    """`data.class_names` ("1=cat,2=dog") as {label: name}; a malformed item, or a label or name given twice, is
    refused."""
    pairs = [item.partition("=") for item in text.split(",") if item.strip()]
    if not pairs or any(not sep or not key.strip() or not name.strip() for key, sep, name in pairs):
        raise ConfigError(f"data.class_names {text!r}: give label=name pairs, as 1=cat,2=dog", "data.class_names")
    mapping = {key.strip(): name.strip() for key, _, name in pairs}
    if len(mapping) < len(pairs) or len(set(mapping.values())) < len(mapping):
        raise ConfigError(f"data.class_names {text!r}: a label or a name is given twice", "data.class_names")
    return mapping


def _renamed(path: Path, rows: list[LabelRow], names: dict[str, str]) -> list[LabelRow]:
    unnamed = sorted({label for row in rows for label in row.labels} - set(names))
    if unnamed:
        raise CnnlabError(f"{path}: label(s) {', '.join(unnamed[:EXAMPLES])} have no name in data.class_names")
    return [replace(row, labels=tuple(sorted(names[label] for label in row.labels))) for row in rows]
