"""Checkpoints: written whole or not at all, and read back without running any pickled code."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from cnnlab.atomic import atomic_write
from cnnlab.errors import CnnlabError, first_line

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Replace the checkpoint atomically: a crash at any moment leaves either the previous one or the new one.

    The state is serialised in memory first, so that a write failure surfaces as the operating system's
    reason (a WriteError: "No space left on device") rather than as a serialiser's internal error."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getbuffer())


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
