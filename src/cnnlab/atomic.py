"""Files written whole or not at all, and write failures that say which file and why in one line."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

from cnnlab.errors import CnnlabError

TEMPORARY_SUFFIX = ".tmp"


class WriteError(CnnlabError):
    """A file could not be written: a full disk, a quota, a read-only or vanished folder. `consequence` says
    what is left intact and how to go on."""

    exit_code = 74  # EX_IOERR, from BSD's sysexits.h

    def __init__(self, path: Path, reason: str, consequence: str = ""):
        super().__init__(f"cannot write {path}: {reason}" + (f"; {consequence}" if consequence else ""))
        self.path, self.reason = path, reason

    @classmethod
    def of(cls, path: Path, error: OSError) -> WriteError:
        """The operating system's words for `error` ("No space left on device"), without the errno number."""
        return cls(path, error.strerror or str(error) or type(error).__name__)


def atomic_write(path: Path, data: bytes | memoryview | Callable[[IO[bytes]], None]) -> None:
    """Write `data` (bytes, or a function writing to a binary file) to `path` all at once.

    The bytes go to a temporary file in the same folder (`.NAME.*.tmp`), which is flushed, fsynced and
    renamed over `path`; then the folder is fsynced: a crash at any moment leaves the old file or the
    new one, never a mix. On any OSError the temporary is removed and a WriteError names `path`."""
    temporary = path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}"
    try:
        # O_EXCL: never another's file; mode 0o666 less the umask, as a plain open gives (mkstemp's is 0o600)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise WriteError.of(path, error) from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise WriteError.of(path, error) from None
        raise
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder; the rename has happened
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def make_folder(folder: Path) -> None:
    """Create `folder` and its parents if missing; a failure is a WriteError naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WriteError.of(folder, error) from None


def write_text(path: Path, text: str) -> None:
    """A small text file (report, JSON, CSV), written atomically."""
    atomic_write(path, text.encode())


def append_line(path: Path, line: str) -> None:
    """Append one line to a log (metrics.jsonl); a failure is a WriteError naming the file."""
    try:
        with open(path, "a") as log:
            log.write(line + "\n")
    except OSError as error:
        raise WriteError.of(path, error) from None


def remove_temporaries(folder: Path, *names: str) -> None:
    """Delete the temporaries of `names` that a crash during `atomic_write` left in `folder`."""
    for name in names:
        for stray in folder.glob(f".{name}.*{TEMPORARY_SUFFIX}"):
            stray.unlink(missing_ok=True)
