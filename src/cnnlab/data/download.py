"""Downloading a file into the cache with a progress bar, verified against its checksum."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from cnnlab.atomic import WriteError
from cnnlab.errors import CnnlabError

_BLOCK = 1 << 20


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, destination: Path, *, md5: str, timeout: float = 60.0) -> Path:
    """Fetch `url` to `destination` unless a file with the right checksum is already there.

    The bytes go to `destination.part` first and are renamed only once their MD5 matches, so a
    truncated or tampered download never takes the final name.
    """
    if destination.is_file() and file_digest(destination, "md5") == md5:
        return destination
    partial = destination.with_name(destination.name + ".part")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        out = open(partial, "wb")  # noqa: SIM115 (closed below, before the checksum is read)
    except OSError as error:
        raise WriteError.of(partial, error) from None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with Progress(
                TextColumn(f"downloading {destination.name}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                transient=True,
            ) as progress:
                task = progress.add_task("download", total=total)
                while block := response.read(_BLOCK):
                    _write_block(out, block, partial)
                    progress.advance(task, len(block))
    except WriteError:
        partial.unlink(missing_ok=True)
        raise
    except urllib.error.HTTPError as error:
        partial.unlink(missing_ok=True)
        raise CnnlabError(f"download of {url} failed: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, HTTPException, OSError) as error:
        partial.unlink(missing_ok=True)
        reason = getattr(error, "reason", None) or error
        raise CnnlabError(f"download of {url} failed: {reason}") from None
    actual = file_digest(partial, "md5")
    if actual != md5:
        partial.unlink()
        raise CnnlabError(f"download of {url} is corrupt or truncated: md5 {actual}, expected {md5}")
    os.replace(partial, destination)
    return destination


def _write_block(out: BinaryIO, block: bytes, path: Path) -> None:
    """Write failures (a full disk) are ours to report, apart from the network's."""
    try:
        out.write(block)
    except OSError as error:
        raise WriteError.of(path, error) from None
