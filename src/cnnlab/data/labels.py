"""Label files: which images of a folder carry which labels, read from a CSV, TSV, JSON or JSON-lines file.

Shapes read, detected from the file and said in one line:
- one row per image, `path,label`; a cell may hold several labels (`"sea sunset"`, `sea;sunset`, `sea|sunset`, or a
  JSON list), which makes the data multi-label;
- one row per image with a 0/1 column per label (one-hot, or multi-hot);
- one row per image and label (the long form: an image on several rows);
- JSON: a list of {"image"/"file"/"path": ..., "label"/"labels": ...} objects, or {path: labels}.
The path and label columns are found by their names, or named; a file that could be read two ways is refused in
one line naming the choices, unless both readings agree. An optional `split` column (train/val/test) is kept.
Paths are relative to the data folder; an ID without an extension is the one file of that stem. Nothing is ever
moved or rewritten.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cnnlab.data.dataset import SplitName
from cnnlab.data.layout import Layout
from cnnlab.errors import CnnlabError

log = logging.getLogger("cnnlab")

PATH_NAMES = (
    "path",
    "paths",
    "filepath",
    "file",
    "files",
    "filename",
    "filenames",
    "file_name",
    "image",
    "images",
    "image_path",
    "image_name",
    "img",
    "image_id",
    "id",
)
LABEL_NAMES = ("label", "labels", "class", "classes", "category", "categories", "tags", "tag", "target")
VAL_NAMES = ("val", "valid", "validation", "dev")  # as the folder layouts name a validation split
SPLIT_NAMES = {"train": SplitName.TRAIN, "test": SplitName.TEST} | dict.fromkeys(VAL_NAMES, SplitName.VAL)
# Between labels in one cell, in the order they are looked for (a ',' inside a quoted CSV cell is one of them).
SEPARATORS = (";", "|", ",", " ")
FORMATS = (".csv", ".tsv", ".json", ".jsonl")
EXAMPLES = 3  # paths named in a line that counts what was skipped or refused
READER_VERSION = 1  # in the decode cache's key: raise it when a file would be read otherwise


@dataclass(frozen=True)
class LabelFile:
    """Where an image folder's labels are, when not in its folder names (`data.labels`)."""

    path: Path
    path_column: str | None = None  # default: found by its name
    label_column: str | None = None

    def identity(self) -> dict[str, Any]:
        """What a cache of the labelled dataset is keyed on: the file's bytes and how its columns are chosen."""
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest() if self.path.is_file() else "missing"
        columns = {"path_column": self.path_column, "label_column": self.label_column}
        return {"labels": digest, "labels_reader": READER_VERSION, **columns}

    def layout(self, files: list[str], strict: bool) -> Layout:
        """The folder's images placed by this file: each named image in its class and split (train, unless the
        file's split column says otherwise), in the file's order. Several labels on an image are refused until
        multi-label training is built."""
        table = read_label_file(
            self.path, files, path_column=self.path_column, label_column=self.label_column, strict=strict
        )
        if table.multi_label:
            several = [row.path for row in table.rows if len(row.labels) != 1]
            raise CnnlabError(
                f"{self.path}: {len(several):,} images have other than one label (first "
                f"{', '.join(several[:EXAMPLES])}; read as {table.reading.split(': ', 1)[1]}); this cnnlab trains "
                "one label per image"
            )
        index = {name: i for i, name in enumerate(files)}
        placed = [(index[row.path], row.labels[0], row.split or SplitName.TRAIN) for row in table.rows]
        return Layout(placed, table.classes, table.reading)


@dataclass(frozen=True)
class LabelRow:
    path: str  # relative to the data folder, '/'-separated, as the folder's files are named
    labels: tuple[str, ...]  # sorted; empty: none of the labels (multi-label data only)
    split: SplitName | None  # from the file's split column; None: the seeded carve decides


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
) -> LabelTable:
    """The label file's table over `files` (the data folder's files, '/'-separated paths relative to it)."""
    if not path.is_file():
        raise CnnlabError(f"{path}: no such label file")
    if path.suffix.lower() not in FORMATS:
        raise CnnlabError(f"{path}: a label file is {', '.join(FORMATS)}; not {path.suffix or 'without a suffix'}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as spreadsheets write, is left out
    except UnicodeDecodeError as error:
        raise CnnlabError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    records, shape = _records(path, text)
    if not records:
        raise CnnlabError(f"{path}: no rows")
    columns = list(records[0])
    path_key = _column(path, columns, path_column, PATH_NAMES, "path", records)
    split_key = next((key for key in columns if key.strip().lower() == "split"), None)
    label_keys, how = _label_columns(
        path, records, [k for k in columns if k not in (path_key, split_key)], label_column
    )
    table = _rows(path, records, path_key, label_keys, split_key)
    rows = _resolved(path, table, files, strict)
    classes = tuple(sorted({label for row in rows for label in row.labels}))
    separators = sorted({image.separator for image in table.values() if image.separator})
    gathered = how == "column" and not separators and any(len(image.labels) > 1 for image in table.values())
    reading = f"{path.name}: {shape}, {len(rows):,} images; paths in '{path_key}', labels "
    reading += f"in '{label_keys[0]}'" if how == "column" else f"as {len(label_keys)} 0/1 columns"
    reading += " (the long form: an image on several rows)" if gathered else ""
    reading += f", several in a cell split at {' and '.join(map(repr, separators))}" if separators else ""
    reading += f", splits in '{split_key}'" if split_key else ""
    if len(classes) < 2:
        raise CnnlabError(f"{path}: {len(classes)} label(s) ({', '.join(classes)}); a classifier needs at least two")
    return LabelTable(rows, classes, reading)


def _records(path: Path, text: str) -> tuple[list[dict[str, Any]], str]:
    """The file's records as {column: value}, and its shape in words."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        lines = [line for line in io.StringIO(text, newline="").read().splitlines() if line.strip()]
        if not lines:
            return [], "CSV"
        delimiter = "\t" if suffix == ".tsv" else _delimiter(lines[0])
        reader = csv.DictReader(lines, delimiter=delimiter)
        if reader.fieldnames is None or len(set(reader.fieldnames)) != len(reader.fieldnames):
            raise CnnlabError(f"{path}: the header row names a column twice or none: {reader.fieldnames}")
        records = [dict(row) for row in reader]
        ragged = [n for n, row in enumerate(records, start=2) if None in row or None in row.values()]
        if ragged:
            raise CnnlabError(
                f"{path}: {len(ragged)} row(s) have another number of cells than the header, first line {ragged[0]}"
            )
        kind = {"\t": "TSV", ";": "CSV separated by ';'", ",": "CSV"}[delimiter]
        return records, f"{kind}, one row per line"
    try:
        if suffix == ".jsonl":
            values: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            values = json.loads(text)
    except json.JSONDecodeError as error:
        raise CnnlabError(f"{path}: not valid JSON (line {error.lineno}: {error.msg})") from None
    if isinstance(values, dict):
        return [{"path": key, "labels": value} for key, value in values.items()], "JSON object of path: labels"
    if isinstance(values, list) and all(isinstance(value, dict) for value in values):
        keys = list(dict.fromkeys(key for value in values for key in value))  # an object may leave a key out
        records = [{key: value.get(key) for key in keys} for value in values]
        return records, "JSON list of objects" if suffix == ".json" else "JSON lines"
    raise CnnlabError(f"{path}: expected a list of objects or an object of path: labels")


def _delimiter(header: str) -> str:
    """',' or ';' (as European spreadsheets write CSV), whichever splits the header row; refused when both do."""
    commas, semicolons = header.count(","), header.count(";")
    if commas and semicolons:
        raise CnnlabError(f"the header row {header!r} has both ',' and ';': which separates the columns is unclear")
    return ";" if semicolons else ","


def _column(
    path: Path,
    columns: list[str],
    named: str | None,
    candidates: tuple[str, ...],
    what: str,
    records: list[dict[str, Any]],
) -> str:
    """The column named `named`, or the one whose name is among `candidates`; two candidates must agree."""
    if named is not None:
        if named not in columns:
            raise CnnlabError(f"{path}: no column {named!r} for the {what}s; columns: {', '.join(columns)}")
        return named
    found = [key for key in columns if key.strip().lower() in candidates]
    if not found:
        flag = f"--{what}-column"
        raise CnnlabError(f"{path}: no {what} column among {', '.join(columns)}; name it with {flag}")
    if len(found) > 1 and any(record[found[0]] != record[other] for record in records for other in found[1:]):
        raise CnnlabError(
            f"{path}: {len(found)} columns could hold the {what}s ({', '.join(found)}) and they differ; "
            f"name one with --{what}-column"
        )
    return found[0]


def _label_columns(
    path: Path, records: list[dict[str, Any]], others: list[str], named: str | None
) -> tuple[list[str], str]:
    """The label column ("column") or the 0/1 columns ("one-hot"); a file holding both is refused unless they agree
    on every row."""
    if named is not None:
        return [_column(path, others, named, LABEL_NAMES, "label", records)], "column"
    named_columns = [key for key in others if key.strip().lower() in LABEL_NAMES]
    binary = [key for key in others if key not in named_columns and all(_is_bit(r[key]) for r in records)]
    one_hot = binary if len(binary) >= 2 else []
    if named_columns:
        column = _column(path, named_columns, None, LABEL_NAMES, "label", records)
        agree = all(set(_cell_labels(r[column])[0]) == {k for k in one_hot if _bit(r[k])} for r in records)
        if one_hot and not agree:
            raise CnnlabError(
                f"{path}: labels could be read from '{column}' or from the 0/1 columns {', '.join(one_hot)}, and "
                "they differ; name the one to use with --label-column, or remove the other"
            )
        return [column], "column"
    if one_hot:
        return one_hot, "one-hot"
    if len(others) == 1:
        return others, "column"
    raise CnnlabError(f"{path}: no label column among {', '.join(others) or 'none'}; name it with --label-column")


def _is_bit(value: Any) -> bool:
    return (isinstance(value, bool | int) and value in (0, 1)) or str(value).strip() in ("0", "1")


def _bit(value: Any) -> bool:
    return str(value).strip() == "1" or value is True


def _cell_labels(value: Any) -> tuple[list[str], str | None]:
    """A cell's labels, and the separator they were split at (None: one label, or a list)."""
    if value is None or isinstance(value, list):
        return sorted({_name(item) for item in value or [] if _name(item)}), None
    text = _name(value)
    if text.startswith("[") and text.endswith("]"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            try:
                items = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise CnnlabError(f"a label cell looks like a list but is not one: {text}") from None
        return _cell_labels(list(items))
    for separator in SEPARATORS:
        if separator in text:
            parts = re.split(re.escape(separator) if separator != " " else r"\s+", text)
            return sorted({part.strip() for part in parts if part.strip()}), separator
    return ([text] if text else []), None


def _name(value: Any) -> str:
    """A label as a class name: numbers stay their digits ("1"), text is stripped."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


@dataclass
class _Image:
    labels: set[str]
    split: SplitName | None
    separator: str | None


def _rows(
    path: Path, records: list[dict[str, Any]], path_key: str, label_keys: list[str], split_key: str | None
) -> dict[str, _Image]:
    """Each image's labels and split, by its path as written. An image on several rows of one label each is the long
    form; identical rows are merged; rows that give one image different label sets or splits are refused."""
    read = []
    for number, record in enumerate(records, start=1):
        name = str(record[path_key] if record[path_key] is not None else "").strip().replace("\\", "/")
        if not name:
            raise CnnlabError(f"{path}: row {number} has no path in '{path_key}'")
        if len(label_keys) > 1:
            labels, separator = [key for key in label_keys if _bit(record[key])], None
        else:
            labels, separator = _cell_labels(record[label_keys[0]])
        read.append((name, labels, separator, _split(path, record[split_key], number) if split_key else None))
    long_form = len(label_keys) == 1 and all(len(labels) <= 1 for _, labels, _, _ in read)
    images: dict[str, _Image] = {}
    conflicts = []
    for name, labels, separator, split in read:
        seen = images.setdefault(name, _Image(set(labels), split, separator))
        if seen.split != split:
            conflicts.append(f"{name} (split {seen.split} and {split})")
        elif seen.labels != set(labels):
            if not long_form:
                conflicts.append(f"{name} ({' '.join(sorted(seen.labels))} and {' '.join(labels)})")
            seen.labels |= set(labels)
    if conflicts:
        raise CnnlabError(
            f"{path}: {len(conflicts)} image(s) on several rows that disagree: {'; '.join(conflicts[:EXAMPLES])}"
        )
    return images


def _split(path: Path, value: Any, number: int) -> SplitName:
    text = str(value if value is not None else "").strip().lower()
    if text not in SPLIT_NAMES:
        raise CnnlabError(f"{path}: row {number}: split {value!r} is none of train, val, test")
    return SPLIT_NAMES[text]


def _resolved(path: Path, images: dict[str, _Image], files: list[str], strict: bool) -> list[LabelRow]:
    """The rows whose image is among `files`, each by the file's own path; what is left out is said in one line each
    (with `strict`, refused)."""
    present = set(files)
    by_stem: dict[str, list[str]] = defaultdict(list)
    for name in files:
        by_stem[str(PurePosixPath(name).with_suffix(""))].append(name)
    # An archive's single top folder is looked through, as the folder layouts do.
    tops = {name.split("/", 1)[0] for name in files}
    wrapper = f"{next(iter(tops))}/" if len(tops) == 1 and all("/" in name for name in files) else ""
    multi = any(len(image.labels) > 1 for image in images.values())
    rows, missing, unlabelled, ambiguous = [], [], [], []
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
        elif not image.labels and not multi:
            unlabelled.append(written)
        else:
            rows.append(LabelRow(name, tuple(sorted(image.labels)), image.split))
    if ambiguous:
        raise CnnlabError(f"{path}: {len(ambiguous)} ID(s) match several files: {'; '.join(ambiguous[:EXAMPLES])}")
    named = {row.path for row in rows}
    unnamed = [name for name in files if name not in named and name != path.name]
    for count_of, what in (
        (missing, "rows whose image is not in the folder"),
        (unlabelled, "rows with no label (an image needs one unless the data is multi-label)"),
        (unnamed, "files in the folder that the label file does not name"),
    ):
        _left_out(path, count_of, what, strict)
    if not rows:
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
