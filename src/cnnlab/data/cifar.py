"""The official CIFAR-10 and CIFAR-100 python archives: download, verify, extract, parse.

The archives hold pickles. Pickles can run code, so the checksum is verified before anything is
unpickled, and the unpickler only admits the few numpy globals that these files need.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np

from cnnlab.atomic import atomic_write, make_folder
from cnnlab.data.dataset import Dataset, Split
from cnnlab.data.download import download
from cnnlab.data.walk import tar_member_bytes
from cnnlab.errors import CnnlabError


@dataclass(frozen=True)
class CifarSource:
    name: str
    url: str
    md5: str  # of the archive, as published next to it
    folder: str  # the archive's top folder
    train_members: tuple[str, ...]
    test_members: tuple[str, ...]
    meta_member: str
    label_key: str
    class_names_key: str

    @property
    def archive_name(self) -> str:
        return PurePosixPath(self.url).name

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.train_members, *self.test_members, self.meta_member)


CIFAR10 = CifarSource(
    name="cifar10",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    folder="cifar-10-batches-py",
    train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_members=("test_batch",),
    meta_member="batches.meta",
    label_key="labels",
    class_names_key="label_names",
)
CIFAR100 = CifarSource(
    name="cifar100",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    folder="cifar-100-python",
    train_members=("train",),
    test_members=("test",),
    meta_member="meta",
    label_key="fine_labels",
    class_names_key="fine_label_names",
)
SOURCES = {source.name: source for source in (CIFAR10, CIFAR100)}


def load_cifar(source: CifarSource, cache_root: Path, local: Path | None = None) -> Dataset:
    """From `local` (the archive or its extracted folder) if given, else downloaded into the cache."""
    if local is None:
        archive = download(source.url, cache_root / "downloads" / source.archive_name, md5=source.md5)
        folder = cache_root / source.folder
        if not all((folder / member).is_file() for member in source.members):
            extract_members(source, archive, folder)
        local = folder
    if local.is_dir():
        folder = local / source.folder if (local / source.folder).is_dir() else local
        blobs = {}
        for member in source.members:
            if not (folder / member).is_file():
                raise CnnlabError(f"{local}: missing {member}, expected the extracted {source.folder} folder")
            blobs[member] = (folder / member).read_bytes()
    else:
        blobs = _read_members(source, local)
    return _parse(source, blobs, str(local))


def identify(path: Path) -> CifarSource | None:
    """The CIFAR source whose official layout `path` has, if any (archive or extracted folder)."""
    for source in SOURCES.values():
        if path.is_dir() and any(
            (folder / source.meta_member).is_file() and (folder / source.test_members[0]).is_file()
            for folder in (path, path / source.folder)
        ):
            return source
        if path.is_file() and path.name.lower().endswith((".tar.gz", ".tgz", ".tar")):
            try:
                with tarfile.open(path) as archive:
                    first = archive.next()
            except (tarfile.TarError, EOFError, OSError):
                return None
            if first is not None and PurePosixPath(first.name).parts[0] == source.folder:
                return source
    return None


def extract_members(source: CifarSource, archive: Path, folder: Path) -> None:
    """Write only the expected members, by their base names, into `folder`; links and other names are
    never written, so no member can land outside it."""
    make_folder(folder)
    for member, data in _read_members(source, archive).items():
        atomic_write(folder / member, data)


def _read_members(source: CifarSource, archive: Path) -> dict[str, bytes]:
    wanted = {f"{source.folder}/{member}": member for member in source.members}
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(archive) as tar:
            for info in tar:
                if info.name in wanted and info.isfile():
                    blobs[wanted[info.name]] = tar_member_bytes(tar, info)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise CnnlabError(f"{archive}: damaged or truncated archive ({error})") from None
    missing = sorted(set(wanted.values()) - set(blobs))
    if missing:
        raise CnnlabError(f"{archive}: not a complete {source.name} archive, missing {', '.join(missing)}")
    return blobs


def _parse(source: CifarSource, blobs: dict[str, bytes], where: str) -> Dataset:
    meta = _unpickle(blobs[source.meta_member], f"{where}: {source.meta_member}")
    classes = tuple(_text(name) for name in _field(meta, source.class_names_key, where))

    def split(members: tuple[str, ...]) -> Split:
        images, labels = [], []
        for member in members:
            batch = _unpickle(blobs[member], f"{where}: {member}")
            data = np.asarray(_field(batch, "data", where), dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise CnnlabError(f"{where}: {member} has data of shape {data.shape}, expected (N, 3072)")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, H, W, C)
            labels.append(np.asarray(_field(batch, source.label_key, where), dtype=np.int64))
        result = Split(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))
        if result.labels.min() < 0 or result.labels.max() >= len(classes):
            raise CnnlabError(f"{where}: labels outside 0..{len(classes) - 1}")
        return result

    return Dataset(
        name=source.name, classes=classes, train=split(source.train_members), test=split(source.test_members)
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch needs: numpy arrays and dtypes, and plain containers."""

    _ALLOWED: ClassVar[dict[tuple[str, str], tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(*self._ALLOWED[(module, name)])


def _unpickle(data: bytes, where: str) -> dict[Any, Any]:
    try:
        # latin1 decodes the Python 2 strings of the official files the way numpy needs.
        value = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise CnnlabError(f"{where}: not a CIFAR batch pickle ({error})") from None
    if not isinstance(value, dict):
        raise CnnlabError(f"{where}: not a CIFAR batch pickle (a {type(value).__name__}, expected a dict)")
    return value


def _field(mapping: dict[Any, Any], key: str, where: str) -> Any:
    for candidate in (key, key.encode()):
        if candidate in mapping:
            return mapping[candidate]
    raise CnnlabError(f"{where}: no {key!r} entry")


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
