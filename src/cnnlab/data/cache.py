"""The on-disk cache: downloads, and decoded arrays keyed by their source and decode settings."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.atomic import atomic_write, make_folder

# Bump when decoding changes, so that arrays decoded by older code are not reused.
# 2: image folders keep the reasons of the files they left out; 3: train/val/test folders and the layout read;
# 4: an image folder's pixels in a .npy of their own, read from disk; 5: each image's path and size before resizing
DECODER_VERSION = 5


def cache_root(cache_dir: str | None) -> Path:
    """--cache-dir, else $CNNLAB_CACHE, else ~/.cache/cnnlab."""
    chosen = cache_dir or os.environ.get("CNNLAB_CACHE") or Path.home() / ".cache" / "cnnlab"
    return Path(chosen).expanduser()


def array_cache_path(root: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps({**key, "decoder": DECODER_VERSION}, sort_keys=True).encode()).hexdigest()
    return root / "decoded" / f"{digest[:32]}.npz"


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent or unreadable (a damaged cache entry is rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically, so that a crash mid-write never leaves a half file under the final name."""
    make_folder(path.parent)
    named: dict[str, Any] = arrays  # numpy's stub would match a key named allow_pickle to its bool flag
    atomic_write(path, lambda handle: np.savez(handle, **named))
