"""Image-folder datasets: a folder, or a .tar.gz/.tar/.zip of one, laid out by class.

Layouts: `train/<class>/*` beside any of `val/` (or `valid/`, `validation/`, `dev/`) and `test/`, each
holding the same class folders; or only `<class>/*` (a test split is then carved, seeded and
stratified). With a validation folder and no test folder, the validation folder is the test split (it is
what the model is scored on), and the layout says so. A single wrapping folder is looked through. A
layout that could be read two ways is refused (see `layout.py`). Decoding runs on every core in two
passes: headers first (to choose one image size and the channel count), then pixels, streamed into a .npy
in the cache that the splits read from disk (`DiskImages`): a dataset larger than memory loads too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import zipfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar

import numpy as np

from cnnlab import progress
from cnnlab.atomic import atomic_write, make_folder
from cnnlab.data import images as image_io
from cnnlab.data.cache import array_cache_path, load_arrays, save_arrays
from cnnlab.data.dataset import Dataset, Split, SplitName, split_stratified
from cnnlab.data.disk_images import DiskImages, write_npy_header
from cnnlab.data.labels import LabelFile
from cnnlab.data.layout import Layout, read_layout
from cnnlab.data.walk import tar_member_bytes, walk_files
from cnnlab.errors import CnnlabError, ConfigError

CACHE_CODES = {name: code for code, name in enumerate(SplitName)}  # the int8 each image's split is cached as

log = logging.getLogger("cnnlab")

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
T = TypeVar("T")
Decoded = tuple[np.ndarray, tuple[int, int], bool]  # pixels (H, W, C) uint8, native (H, W), is grayscale
Found = tuple[tuple[int, int], bool]  # what decoding learnt of a readable image: native (H, W), is grayscale
_CHUNK = 1000  # images per worker task: large enough to amortise inter-process transfer
_CHUNK_BYTES = 64 * 2**20  # and at most this many bytes of decoded pixels, which come back through a pipe


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
    path: Path,
    *,
    image_size: int | None,
    test_fraction: float,
    split_seed: int,
    cache_root: Path,
    strict: bool,
    label_file: LabelFile | None = None,
) -> Dataset:
    """The images of a folder (or an archive of one), labelled by their class folders or by a label file."""
    if not path.exists():
        raise CnnlabError(f"{path}: no such file or folder")
    cache_key = {"source": str(path.resolve()), "image_size": image_size, "strict": strict}
    if label_file is not None:
        cache_key |= label_file.identity()
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
    images_file = cache_file.with_suffix(".images.npy")  # the pixels, beside the small arrays that describe them
    arrays = load_arrays(cache_file)
    images = _stored_images(images_file) if arrays is not None else None
    if arrays is None or images is None:
        if entries is None:
            entries = _archive_entries(path)
        if strict:  # refused before any decoding
            _report_failures(path, skipped, len(entries) + len(skipped), strict)
        names = [entry.name for entry in entries]
        parts = [entry.parts for entry in entries]
        placing = label_file.layout(names, strict) if label_file else read_layout(path, parts)
        arrays = _decode_dataset(path, entries, placing, image_size, strict, images_file)
        save_arrays(cache_file, arrays)
        images = DiskImages(images_file)
    # The same warning on every load: the walk's skips now, the decoding's failures as the cache kept them.
    failures = [*skipped, *arrays["failures"].tolist()]
    _report_failures(path, failures, len(arrays["labels"]) + len(failures), strict)

    classes = tuple(str(name) for name in arrays["classes"])
    labels = arrays["labels"]
    labels = labels.astype(np.int64) if labels.ndim == 1 else labels.astype(np.uint8)
    everything = Split(images.take(arrays["rows"]), labels, arrays["names"], arrays["native"])
    layout = str(arrays["layout"])
    codes = arrays["split"]
    train, val, test = (everything.take(np.flatnonzero(codes == CACHE_CODES[name])) for name in SplitName)
    if not len(test) and len(val):  # a validation folder alone is what the model is scored on
        test, val = val, test
    elif not len(test):
        train, test = split_stratified(train, test_fraction, split_seed, "test")
        layout += f"; a seeded, stratified {test_fraction:g} of the images held out as the test split"
    return Dataset(
        name=path.name, classes=classes, train=train, test=test, val=val if len(val) else None, layout=layout
    )


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


def _stored_images(images_file: Path) -> DiskImages | None:
    """The cached pixels, or None when absent or damaged (the cache entry is then rebuilt)."""
    try:
        return DiskImages(images_file)
    except (CnnlabError, OSError):
        return None


def _decode_dataset(
    path: Path, entries: list[Entry], layout: Layout, image_size: int | None, strict: bool, images_file: Path
) -> dict[str, np.ndarray]:
    """Decode every entry the layout places into `images_file` (a row per entry, zeros for the unreadable) and
    return the arrays that describe them: which rows were kept, their labels and splits, the classes, layout and
    failures."""
    labelled = [(entries[i], class_name, split) for i, class_name, split in layout.placed]
    entries = [entry for entry, _, _ in labelled]

    # One pass over the pixels, with the size and channel count guessed from a sample of headers;
    # a second pass only when the whole dataset disagrees with the guess.
    size, channels = _guess_format(entries, image_size)
    decoded = _decode_to_file(entries, size, channels, images_file)
    kept = [i for i, result in enumerate(decoded) if not isinstance(result, str)]
    if kept:
        readable = [result for result in decoded if not isinstance(result, str)]
        native = Counter(size for size, _ in readable).most_common(1)[0][0]
        actual = ((image_size, image_size) if image_size else native, 1 if all(gray for _, gray in readable) else 3)
        if actual != (size, channels):
            size, channels = actual
            decoded = _decode_to_file(entries, size, channels, images_file)
    failures = [result for result in decoded if isinstance(result, str)]
    if strict:
        _report_failures(path, failures, len(entries), strict)
    if not kept:
        raise CnnlabError(f"{path}: none of its {len(entries)} files is a readable image")

    index = {name: i for i, name in enumerate(layout.classes)}
    found = [result for result in decoded if not isinstance(result, str)]
    if layout.label_sets is None:
        labels = np.array([index[labelled[i][1]] for i in kept], dtype=np.int64)
    else:  # multi-hot rows
        labels = np.zeros((len(kept), len(layout.classes)), dtype=np.uint8)
        for row, i in enumerate(kept):
            labels[row, [index[name] for name in layout.label_sets[i]]] = 1
    return {
        "rows": np.array(kept, dtype=np.int64),  # the rows of images_file that hold readable images
        "labels": labels,
        "split": np.array([CACHE_CODES[labelled[i][2]] for i in kept], dtype=np.int8),
        "names": np.array([entries[i].name for i in kept], dtype=str),
        "native": np.array([native for native, _ in found], dtype=np.int64).reshape(-1, 2),  # (height, width)
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


def _decode_to_file(entries: list[Entry], size: tuple[int, int], channels: int, images_file: Path) -> list[Found | str]:
    """Decode on every core, streaming the pixels to `images_file` chunk by chunk as they come: only the
    chunks in flight are ever in memory. Per entry: (native (H, W), is grayscale), or why it is unreadable."""
    found: list[Found | str] = []
    row_bytes = size[0] * size[1] * channels

    def write(handle: IO[bytes]) -> None:
        write_npy_header(handle, len(entries), (*size, channels))
        chunks = _chunks(entries, row_bytes)
        with progress.step("decoding", len(entries)) as advance:
            for chunk in _parallel_stream(_decode_chunk, [(chunk, size, channels) for chunk in chunks]):
                for result in chunk:
                    handle.write(bytes(row_bytes) if isinstance(result, str) else result[0].tobytes())
                    found.append(result if isinstance(result, str) else result[1:])
                advance(len(chunk))

    make_folder(images_file.parent)
    atomic_write(images_file, write)
    return found


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


def _chunks(entries: list[Entry], row_bytes: int) -> list[list[Entry]]:
    """Chunks of up to _CHUNK entries, fewer for large decoded images (at most _CHUNK_BYTES of pixels each)."""
    per_chunk = max(1, min(_CHUNK, _CHUNK_BYTES // row_bytes))
    return [entries[start : start + per_chunk] for start in range(0, len(entries), per_chunk)]


def _parallel_stream(function: Callable[..., list[T]], argument_lists: list[tuple[Any, ...]]) -> Iterator[list[T]]:
    """`function` over chunks on every core, the per-chunk results in order, with two chunks per worker in
    flight at most (so that results never pile up faster than they are consumed)."""
    workers = min(len(os.sched_getaffinity(0)), len(argument_lists))
    if workers <= 1:
        yield from (function(*arguments) for arguments in argument_lists)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[list[T]]] = deque()
        for arguments in argument_lists:
            pending.append(pool.submit(function, *arguments))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


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
