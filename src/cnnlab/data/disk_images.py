"""Images that stay on disk: the rows of a uint8 (N, H, W, C) .npy file, read only when asked for.

Rows are read with `os.pread` into fresh arrays, never memory-mapped: a mapped page counts in the process's
resident memory once touched, so an epoch over a mapping would grow it to the file's size, while read rows
are freed with the batch (the page cache still keeps the file warm). Like a numpy array, a slice or `take`
is a view (here: a list of row numbers) and an index array reads a copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any, overload

import numpy as np

from cnnlab.errors import CnnlabError


class DiskImages:
    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as handle:
            try:
                version = np.lib.format.read_magic(handle)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran_order, dtype = read_header(handle)
            except ValueError as error:
                raise CnnlabError(f"{path}: not a readable .npy file ({error})") from None
            self.offset = handle.tell()  # bytes before the first row
        if dtype != np.uint8 or len(shape) != 4 or fortran_order:
            raise CnnlabError(f"{path}: expected (N, H, W, C) uint8 rows in C order, got {shape} {dtype}")
        self.stored_shape: tuple[int, int, int, int] = shape
        self.row_bytes = int(np.prod(shape[1:]))
        if os.path.getsize(path) < self.offset + shape[0] * self.row_bytes:
            raise CnnlabError(f"{path}: truncated ({os.path.getsize(path):,} bytes for {shape[0]:,} images)")
        self.rows = np.arange(shape[0])  # the stored row of each image, in order (a view's: some of them)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        _, height, width, channels = self.stored_shape
        return len(self.rows), height, width, channels

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: np.ndarray, axis: int = 0) -> DiskImages:
        """The images at `indices`, still on disk (numpy's `take`, without the copy)."""
        if axis != 0:
            raise ValueError("DiskImages.take selects images: axis 0 only")
        return self.view(self.rows[indices])

    @overload
    def __getitem__(self, key: slice) -> DiskImages: ...

    @overload
    def __getitem__(self, key: int | np.integer[Any] | np.ndarray | list[int]) -> np.ndarray: ...

    def __getitem__(self, key: slice | int | np.integer[Any] | np.ndarray | list[int]) -> DiskImages | np.ndarray:
        """A slice is a view on disk; an int, a list or an index array reads those images into memory."""
        if isinstance(key, slice):
            return self.view(self.rows[key])
        if isinstance(key, int | np.integer):
            image: np.ndarray = self.read(self.rows[np.array([key])])[0]
            return image
        return self.read(self.rows[np.asarray(key)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        pixels = self.read(self.rows)
        return pixels if dtype is None else pixels.astype(dtype)

    def read(self, stored: np.ndarray) -> np.ndarray:
        """The stored rows `stored`, in that order: each run of rows that follow each other on disk is one read."""
        out = np.empty((len(stored), *self.stored_shape[1:]), dtype=np.uint8)
        flat = out.reshape(len(stored), self.row_bytes)
        order = np.argsort(stored, kind="stable")
        in_file_order = stored[order]
        runs = np.split(np.arange(len(order)), np.flatnonzero(np.diff(in_file_order) != 1) + 1)
        with open(self.path, "rb", buffering=0) as handle:
            for run in runs:
                if not len(run):
                    continue
                first, count = int(in_file_order[run[0]]), len(run)
                data = os.pread(handle.fileno(), count * self.row_bytes, self.offset + first * self.row_bytes)
                if len(data) != count * self.row_bytes:
                    raise CnnlabError(f"{self.path}: truncated while reading rows {first} to {first + count}")
                flat[order[run]] = np.frombuffer(data, dtype=np.uint8).reshape(count, self.row_bytes)
        return out

    def view(self, rows: np.ndarray) -> DiskImages:
        """These images' file, as the stored rows `rows`."""
        view = object.__new__(DiskImages)
        view.__dict__.update(self.__dict__)
        view.rows = rows
        return view


def write_npy_header(handle: IO[bytes], count: int, shape: tuple[int, int, int]) -> None:
    """Begin a .npy file of `count` (H, W, C) uint8 images; their rows follow, written in order."""
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
        "fortran_order": False,
        "shape": (count, *shape),
    }
    np.lib.format.write_array_header_2_0(handle, header)
