"""A run's random generators: torch's global ones seeded for the run, and every global generator's state kept in
checkpoints, so that a resumed run draws exactly what it would have drawn."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


@contextlib.contextmanager
def reproducible(seed: int, device: torch.device) -> Iterator[None]:
    """For one run, and put back as they were after it: torch's global generators seeded (dropout draws from
    them), and cuDNN held to deterministic kernels (its default ones add in varying order on a GPU, so that
    two runs, or a run and its resumption, drift apart by rounding)."""
    kernels = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            yield
        finally:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = kernels


def global_rng_states() -> dict[str, Any]:
    """Python's, numpy's and torch's global generators, as plain lists and tensors (loadable with weights_only).

    Training draws only from its own seeded generators; these are kept so that any code that does use the
    global ones (a custom model's dropout, say) also resumes exactly."""
    name, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, np.asarray(keys).tolist(), position, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }


def restore_global_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
