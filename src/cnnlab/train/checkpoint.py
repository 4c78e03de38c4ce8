"""Checkpoints: written whole or not at all, and read back without running any pickled code."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from cnnlab.errors import CnnlabError, first_line

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, fsync it, rename it over the old checkpoint and
    fsync the folder: a crash at any moment leaves either the previous checkpoint or the new one."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as handle:
        try:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            os.unlink(handle.name)
            raise
    os.replace(handle.name, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CnnlabError(f"{path}: no checkpoint there; nothing to resume")
    try:
        # weights_only refuses any pickled object but tensors and plain containers, with no fallback.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise CnnlabError(f"{path}: not a readable cnnlab checkpoint ({first_line(error)})") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CnnlabError(f"{path}: not a cnnlab checkpoint")
    return state
