"""Process-level settings that make CPU training faster."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def keep_freed_memory() -> bool:
    """Stop glibc from handing large freed blocks back to the OS after every training step.

    By default glibc serves blocks over its mmap threshold (at most 32 MiB) with fresh mmaps and unmaps
    them on free, so every step page-faults its gradients and activations in again: that cost the
    tutorial MLP (a 37 MB first-layer gradient) a third of its step time and the tutorial CNN about 20%.
    Raising both thresholds lets freed memory be reused. Returns False where there is no glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
