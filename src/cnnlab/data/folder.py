"""Image-folder datasets: a folder, or a .tar.gz/.tar/.zip of one, laid out by class.

Layouts: `train/<class>/*` beside any of `val/` (or `valid/`, `validation/`, `dev/`) and `test/`, each
holding the same class folders; or only `<class>/*` (a test split is then carved, seeded and
stratified). With a validation folder and no test folder, the validation folder is the test split (it is
what the model is scored on), and the layout says so. A single wrapping folder is looked through. A
layout that could be read two ways is refused (see `layout.py`). Decoding runs on every core in two
passes: headers first (to choose one image size and the channel count), then pixels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np

from cnnlab.data import images as image_io
from cnnlab.data.cache import array_cache_path, load_arrays, save_arrays
from cnnlab.data.dataset import Dataset, Split, split_stratified
from cnnlab.data.layout import TEST, TRAIN, VAL, read_layout
from cnnlab.data.walk import tar_member_bytes, walk_files
from cnnlab.errors import CnnlabError, ConfigError

log = logging.getLogger("cnnlab")

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
T = TypeVar("T")
Decoded = tuple[np.ndarray, tuple[int, int], bool]  # pixels (H, W, C) uint8, native (H, W), is grayscale
_CHUNK = 1000  # images per worker task: large enough to amortise inter-process transfer


@dataclass(slots=True)
class Entry:
    parts: tuple[str, ...]  # path inside the dataset root, split into folders and file name
    source: image_io.Source  # a file path, or the member's bytes when read from an archive

    @property
    def name(self) -> str:
        return "/".join(self.parts)


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def load_image_folder(
    path: Path, *, image_size: int | None, test_fraction: float, split_seed: int, cache_root: Path, strict: bool
) -> Dataset:
    if not path.exists():
        raise CnnlabError(f"{path}: no such file or folder")
    cache_key = {"source": str(path.resolve()), "image_size": image_size, "strict": strict}
    skipped: list[str] = []  # entries of a folder that the walk left out, with their reasons
    if is_archive(path):
        stat = path.stat()
        cache_key |= {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        entries = None
    elif path.is_dir():
        entries, cache_key["listing"], skipped = _scan_folder(path)
    else:
        raise CnnlabError(f"{path}: expected an image folder or a {'/'.join(ARCHIVE_SUFFIXES)} archive of one")

    cache_file = array_cache_path(cache_root, cache_key)
    arrays = load_arrays(cache_file)
    if arrays is None:
        if entries is None:
            entries = _archive_entries(path)
        arrays = _decode_dataset(path, entries, skipped, image_size, strict)
        save_arrays(cache_file, arrays)
    # The same warning on every load: the walk's skips now, the decoding's failures as the cache kept them.
    failures = [*skipped, *arrays["failures"].tolist()]
    _report_failures(path, failures, len(arrays["labels"]) + len(failures), strict)

    classes = tuple(str(name) for name in arrays["classes"])
    everything = Split(arrays["images"], arrays["labels"].astype(np.int64))
    split = arrays["split"]
    layout = str(arrays["layout"])
    train = everything.take(np.flatnonzero(split == TRAIN))
    val: Split | None = everything.take(np.flatnonzero(split == VAL)) if (split == VAL).any() else None
    if (split == TEST).any():
        test = everything.take(np.flatnonzero(split == TEST))
    elif val is not None:  # a validation folder alone is what the model is scored on
        test, val = val, None
    else:
        train, test = split_stratified(train, test_fraction, split_seed, "test")
        layout += f"; a seeded, stratified {test_fraction:g} of the images held out as the test split"
    return Dataset(name=path.name, classes=classes, train=train, test=test, val=val, layout=layout)


def _scan_folder(root: Path) -> tuple[list[Entry], str, list[str]]:
    """Every non-hidden file below root, sorted; a signature that changes when any file is added, removed,
    resized or touched (it runs on every cached load); and the entries skipped, with their reasons."""
    listing = walk_files(root)
    stamps = "\n".join(f"{found.path}\0{found.size}\0{found.mtime_ns}" for found in listing.files)
    entries = [Entry(found.parts, found.path) for found in listing.files]
    return entries, hashlib.sha256(stamps.encode()).hexdigest(), listing.skipped


def _archive_entries(path: Path) -> list[Entry]:
    entries = []
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.is_dir() and (parts := _member_parts(path, info.filename)):
                        entries.append(Entry(parts, archive.read(info)))
        else:
            with tarfile.open(path) as archive:
                for member in archive:
                    if member.isfile() and (parts := _member_parts(path, member.name)):
                        entries.append(Entry(parts, tar_member_bytes(archive, member)))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise CnnlabError(f"{path}: damaged or truncated archive ({error})") from None
    return sorted(entries, key=lambda entry: entry.parts)


def _member_parts(archive: Path, name: str) -> tuple[str, ...] | None:
    """A member's path parts; None for hidden files; an error for paths that would escape the root."""
    member = PurePosixPath(name.replace("\\", "/"))
    if member.is_absolute() or ".." in member.parts:
        raise CnnlabError(f"{archive}: refused, member {name!r} points outside the archive's folder")
    parts = tuple(part for part in member.parts if part not in ("", "."))
    if not parts or any(_hidden(part) or part == "__MACOSX" for part in parts):
        return None
    return parts


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _decode_dataset(
    path: Path, entries: list[Entry], skipped: list[str], image_size: int | None, strict: bool
) -> dict[str, np.ndarray]:
    if strict:  # refused before any decoding
        _report_failures(path, skipped, len(entries) + len(skipped), strict)
    layout = read_layout(path, [entry.parts for entry in entries])
    labelled = [(entries[i], class_name, split) for i, class_name, split in layout.placed]
    entries = [entry for entry, _, _ in labelled]

    # One pass over the pixels, with the size and channel count guessed from a sample of headers;
    # a second pass only when the whole dataset disagrees with the guess.
    size, channels = _guess_format(entries, image_size)
    decoded = _decode_all(entries, size, channels)
    kept = [i for i, result in enumerate(decoded) if not isinstance(result, str)]
    if kept:
        readable = [result for result in decoded if not isinstance(result, str)]
        native = Counter(size for _, size, _ in readable).most_common(1)[0][0]
        actual = ((image_size, image_size) if image_size else native, 1 if all(gray for *_, gray in readable) else 3)
        if actual != (size, channels):
            size, channels = actual
            decoded = _decode_all(entries, size, channels)
    failures = [result for result in decoded if isinstance(result, str)]
    if strict:
        _report_failures(path, failures, len(entries), strict)
    if not kept:
        raise CnnlabError(f"{path}: none of its {len(entries)} files is a readable image")

    index = {name: i for i, name in enumerate(layout.classes)}
    return {
        "images": np.stack([decoded[i][0] for i in kept]),
        "labels": np.array([index[labelled[i][1]] for i in kept], dtype=np.int64),
        "split": np.array([labelled[i][2] for i in kept], dtype=np.int8),  # TRAIN, VAL or TEST
        "classes": np.array(layout.classes),
        "layout": np.array(layout.description),
        "failures": np.array(failures, dtype=str),  # why each left-out file is not a readable image
    }


def _guess_format(entries: list[Entry], image_size: int | None) -> tuple[tuple[int, int], int]:
    """(size, channels) from the headers of up to 500 files spread over the dataset."""
    sample = entries[:: max(1, len(entries) // 500)]
    probes = [p for p in _probe_chunk(sample) if not isinstance(p, str)] or [(True, (32, 32))]
    size = (image_size, image_size) if image_size else Counter(s for _, s in probes).most_common(1)[0][0]
    return size, 1 if all(gray for gray, _ in probes) else 3


def _decode_all(entries: list[Entry], size: tuple[int, int], channels: int) -> list[Decoded | str]:
    return _parallel(_decode_chunk, [(chunk, size, channels) for chunk in _chunks(entries)])


def _report_failures(path: Path, failures: list[str], total: int, strict: bool) -> None:
    """One warning line (or, with --strict, one error) for every entry left out, with a few of the reasons."""
    if not failures:
        return
    examples = "; ".join(failures[:3])
    what = "not readable images or regular files inside the folder"
    if strict:
        raise ConfigError(
            f"{path}: {len(failures)} of {total} entries are {what} (data.strict): {examples}", "data.strict"
        )
    log.warning("%s: skipped %d of %d entries that are %s: %s", path, len(failures), total, what, examples)


def _chunks(entries: list[Entry]) -> list[list[Entry]]:
    return [entries[start : start + _CHUNK] for start in range(0, len(entries), _CHUNK)]


def _parallel(function: Callable[..., list[T]], argument_lists: list[tuple[Any, ...]]) -> list[T]:
    """Run `function` over chunks on every core and concatenate the per-chunk result lists."""
    workers = min(len(os.sched_getaffinity(0)), len(argument_lists))
    if workers <= 1:
        results = [function(*arguments) for arguments in argument_lists]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(function, *zip(*argument_lists, strict=True)))
    return [item for chunk in results for item in chunk]


def _probe_chunk(entries: list[Entry]) -> list[tuple[bool, tuple[int, int]] | str]:
    results: list[tuple[bool, tuple[int, int]] | str] = []
    for entry in entries:
        try:
            found = image_io.header(entry.source, entry.name)
            results.append((found.grayscale, (found.height, found.width)))
        except image_io.ImageError as error:
            results.append(str(error))
    return results


def _decode_chunk(entries: list[Entry], size: tuple[int, int], channels: int) -> list[Decoded | str]:
    """Per entry: (pixels, native (H, W), is grayscale), or the reason it is not a readable image."""
    results: list[Decoded | str] = []
    for entry in entries:
        try:
            image = image_io.read(entry.source, entry.name)
            native = (image.height, image.width)
            results.append((image_io.to_array(image, size, channels), native, image_io.is_grayscale(image)))
        except image_io.ImageError as error:
            results.append(str(error))
    return results
