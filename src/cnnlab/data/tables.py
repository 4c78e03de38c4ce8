"""Label files as tables: the records of a CSV, TSV, JSON or JSON-lines file, the columns that hold the paths and
the labels (found by name, or named), each cell's labels, and each image's labels and split gathered from its
rows. `labels.py` places them in a folder of images."""

from __future__ import annotations

import ast
import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.data.dataset import SplitName
from cnnlab.errors import CnnlabError

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
EXCLUDED_NAMES = ("excluded", "exclude")  # a 0/1 column: 1 leaves the image out of training (the labelling page's)
LABEL_NAMES = ("label", "labels", "class", "classes", "category", "categories", "tags", "tag", "target")
VAL_NAMES = ("val", "valid", "validation", "dev")  # as the folder layouts name a validation split
SPLIT_NAMES = {"train": SplitName.TRAIN, "test": SplitName.TEST} | dict.fromkeys(VAL_NAMES, SplitName.VAL)
# Between labels in one cell, in the order they are looked for (a ',' inside a quoted CSV cell is one of them).
SEPARATORS = (";", "|", ",", " ")
EXAMPLES = 3  # paths named in a line that counts what was skipped or refused


def read_records(path: Path, text: str) -> tuple[list[dict[str, Any]], str]:
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


def find_column(
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


def label_columns(
    path: Path, records: list[dict[str, Any]], others: list[str], named: str | None
) -> tuple[list[str], str]:
    """The label column ("column") or the 0/1 columns ("one-hot"); a file holding both is refused unless they agree
    on every row."""
    if named is not None:
        return [find_column(path, others, named, LABEL_NAMES, "label", records)], "column"
    named_columns = [key for key in others if key.strip().lower() in LABEL_NAMES]
    binary = [key for key in others if key not in named_columns and all(_is_bit(r[key]) for r in records)]
    one_hot = binary if len(binary) >= 2 else []
    if named_columns:
        column = find_column(path, named_columns, None, LABEL_NAMES, "label", records)
        if one_hot and not all(set(cell_labels(r[column])[0]) == {k for k in one_hot if _bit(r[k])} for r in records):
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


def cell_labels(value: Any) -> tuple[list[str], str | None]:
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
        return cell_labels(list(items))
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
class TableImage:
    labels: set[str]
    split: SplitName | None
    separator: str | None
    excluded: bool = False


def images_of(
    path: Path,
    records: list[dict[str, Any]],
    path_key: str,
    label_keys: list[str],
    split_key: str | None,
    excluded_key: str | None = None,
) -> dict[str, TableImage]:
    """Each image's labels, split and exclusion, by its path as written. An image on several rows of one label each
    is the long form; identical rows are merged; rows that give one image different label sets or splits are
    refused; an image is excluded when any of its rows says so."""
    read = []
    for number, record in enumerate(records, start=1):
        name = str(record[path_key] if record[path_key] is not None else "").strip().replace("\\", "/")
        if not name:
            raise CnnlabError(f"{path}: row {number} has no path in '{path_key}'")
        if len(label_keys) > 1:
            labels, separator = [key for key in label_keys if _bit(record[key])], None
        else:
            labels, separator = cell_labels(record[label_keys[0]])
        split = _split(path, record[split_key], number) if split_key else None
        excluded = excluded_key is not None and _excluded(path, record[excluded_key], number)
        read.append((name, labels, separator, split, excluded))
    long_form = len(label_keys) == 1 and all(len(labels) <= 1 for _, labels, _, _, _ in read)
    images: dict[str, TableImage] = {}
    conflicts = []
    for name, labels, separator, split, excluded in read:
        seen = images.setdefault(name, TableImage(set(labels), split, separator))
        seen.excluded |= excluded
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


def _excluded(path: Path, value: Any, number: int) -> bool:
    """An excluded cell: 1 or true leaves the image out; 0, false or blank keeps it; anything else is refused."""
    text = str(value if value is not None else "").strip().lower()
    if text not in ("", "0", "1", "true", "false"):
        raise CnnlabError(f"{path}: row {number}: excluded {value!r} is none of 0, 1 (or blank)")
    return text in ("1", "true")


def _split(path: Path, value: Any, number: int) -> SplitName:
    text = str(value if value is not None else "").strip().lower()
    if text not in SPLIT_NAMES:
        raise CnnlabError(f"{path}: row {number}: split {value!r} is none of train, val, test")
    return SPLIT_NAMES[text]
