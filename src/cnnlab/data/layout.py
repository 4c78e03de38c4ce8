"""Reading an image folder's layout: which folders are splits and which are classes.

Two layouts are read: split folders (`train/` beside any of `val/`, `valid/`, `validation/`, `dev/` and
`test/`, each holding one folder per class) and class folders only (`<class>/*`). A single wrapping folder
is looked through. Anything that could be read two ways is refused in one line that says what was found
and what is expected: split folders beside other folders (a split name used as a class?), two folders
for one split, split folders without `train/`, class folders that hold sub-folders, and a class with no
images in one of the split folders.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cnnlab.data.dataset import SplitName
from cnnlab.errors import CnnlabError

log = logging.getLogger("cnnlab")

SPLIT_FOLDERS = {
    "train": SplitName.TRAIN,
    "training": SplitName.TRAIN,
    "val": SplitName.VAL,
    "valid": SplitName.VAL,
    "validation": SplitName.VAL,
    "dev": SplitName.VAL,
    "test": SplitName.TEST,
    "testing": SplitName.TEST,
}
EXPECTED = "expected train/<class>/* with val/<class>/* and/or test/<class>/*, or only <class>/* folders"

Parts = tuple[str, ...]  # a file's path inside the dataset root, split into folders and file name


@dataclass(frozen=True)
class Layout:
    placed: list[tuple[int, str, SplitName]]  # (index into the files, class name, split) of each placed file
    classes: tuple[str, ...]  # sorted
    description: str  # how the folder was read, in words, for the user
    # Multi-label data (from a label file): each placed file's classes, in the order of `placed`; its class name
    # there is the first of them, or "" for none.
    label_sets: list[tuple[str, ...]] | None = None


def read_layout(path: Path, files: list[Parts]) -> Layout:
    """Place every file in a class and a split, or refuse a layout that is ambiguous or likely misread."""
    if not files:
        raise CnnlabError(f"{path}: empty, no files found")
    depth = 0  # look through wrapping folders such as an archive's single top folder (not a lone train/)
    while (
        len({parts[depth] for parts in files}) == 1
        and all(len(parts) > depth + 2 for parts in files)
        and files[0][depth].lower() not in SPLIT_FOLDERS
    ):
        depth += 1
    tops = {parts[depth] for parts in files if len(parts) > depth + 1}
    splits = {name: SPLIT_FOLDERS[name.lower()] for name in tops if name.lower() in SPLIT_FOLDERS}
    if splits:
        placed, description = _split_folders(path, files, depth, tops, splits)
    else:
        placed, description = _class_folders(path, files, depth)
    if not placed:
        raise CnnlabError(f"{path}: no class folders found; {EXPECTED}")
    classes = sorted({class_name for _, class_name, _ in placed})
    if len(classes) < 2:
        raise CnnlabError(f"{path}: only one class ({classes[0]}); {EXPECTED}")
    if len(placed) < len(files):
        log.warning("%s: ignored %d file(s) outside the class folders", path, len(files) - len(placed))
    inside = "/".join(files[0][:depth])
    return Layout(placed, tuple(classes), description + (f", inside {inside}/" if inside else ""))


def _split_folders(
    path: Path, files: list[Parts], depth: int, tops: set[str], splits: dict[str, SplitName]
) -> tuple[list[tuple[int, str, SplitName]], str]:
    named = ", ".join(f"{name}/" for name in sorted(splits))
    others = sorted(tops - set(splits))
    if others:
        listed = ", ".join(f"{name}/" for name in others[:4]) + (" ..." if len(others) > 4 else "")
        raise CnnlabError(f"{path}: split folders ({named}) beside other folders ({listed}); {EXPECTED}")
    for role in SplitName:
        folders = sorted(name for name, split in splits.items() if split == role)
        if len(folders) > 1:
            raise CnnlabError(f"{path}: {' and '.join(folders)} are both {role.in_words} folders; keep one")
    if SplitName.TRAIN not in splits.values():
        raise CnnlabError(f"{path}: {named} but no train/ folder; {EXPECTED}")
    _refuse_nested(path, [parts for parts in files if len(parts) > depth + 3], depth, 2)
    placed = [(i, parts[depth + 1], splits[parts[depth]]) for i, parts in enumerate(files) if len(parts) == depth + 3]
    counts = Counter((split, class_name) for _, class_name, split in placed)
    folder_of = {split: name for name, split in splits.items()}
    train = folder_of[SplitName.TRAIN]
    for class_name in sorted({class_name for _, class_name, _ in placed}):
        for split in (split for split in SplitName if split in folder_of):
            if not counts[(split, class_name)]:
                raise CnnlabError(
                    f"{path}: class {class_name!r} has no images in {folder_of[split]}/ "
                    f"({counts[(SplitName.TRAIN, class_name)]} in {train}/); every split folder needs a folder for "
                    "every class"
                )
    roles = set(splits.values())
    if roles == {SplitName.TRAIN, SplitName.VAL}:
        return placed, f"split folders {named}: no test folder, so {folder_of[SplitName.VAL]}/ is the test split"
    if roles == {SplitName.TRAIN}:
        return placed, f"a {train}/ folder only"
    return placed, f"split folders {named}" + (
        f" ({folder_of[SplitName.VAL]}/ for validation)" if SplitName.VAL in roles else ""
    )


def _class_folders(path: Path, files: list[Parts], depth: int) -> tuple[list[tuple[int, str, SplitName]], str]:
    _refuse_nested(path, [parts for parts in files if len(parts) > depth + 2], depth, 1)
    placed = [(i, parts[depth], SplitName.TRAIN) for i, parts in enumerate(files) if len(parts) == depth + 2]
    return placed, "one folder per class"


def _refuse_nested(path: Path, nested: list[Parts], depth: int, class_level: int) -> None:
    """Class folders that hold sub-folders: the classes could be either level, so refuse."""
    if not nested:
        return
    folders = sorted({"/".join(parts[depth : depth + class_level + 1]) for parts in nested})
    listed = ", ".join(f"{folder}/" for folder in folders[:3]) + (" ..." if len(folders) > 3 else "")
    looks_split = any(folder.rsplit("/", 1)[-1].lower() in SPLIT_FOLDERS for folder in folders)
    hint = "; they look like <class>/<split>/: put the split folders outside, as train/<class>/*" if looks_split else ""
    raise CnnlabError(
        f"{path}: class folders hold sub-folders ({listed}), so it is unclear which level names the classes; "
        f"{EXPECTED}{hint}"
    )
