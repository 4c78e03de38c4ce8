"""Downloading a file into the cache with a progress bar, verified against its checksum."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import IO, Any

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from cnnlab.atomic import atomic_write, make_folder
from cnnlab.errors import CnnlabError

_BLOCK = 1 << 20


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, destination: Path, *, md5: str = "", sha256: str = "", timeout: float = 60.0) -> Path:
    """Fetch `url` to `destination` unless a file with the right checksum (`md5` or `sha256`) is already there.

    The bytes are written with `atomic_write`, whose temporary takes the final name only once the whole
    body has arrived and its checksum matches: a truncated or tampered download never takes the final name.
    """
    algorithm, expected = ("sha256", sha256) if sha256 else ("md5", md5)
    if not expected:
        raise ValueError("download needs the md5 or sha256 the file must have")
    if destination.is_file() and file_digest(destination, algorithm) == expected:
        return destination
    make_folder(destination.parent)
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, HTTPException, OSError) as error:
        raise _failed(url, error) from None
    with response:
        atomic_write(destination, lambda out: _receive(response, out, url, (algorithm, expected), destination.name))
    return destination


def _receive(response: Any, out: IO[bytes], url: str, checksum: tuple[str, str], name: str) -> None:
    """Copy the response body into `out`, checking its (algorithm, hex digest). Network failures are a
    CnnlabError (not an OSError, which `atomic_write` reports as a failure to write), so the two are told apart."""
    algorithm, expected = checksum
    digest = hashlib.new(algorithm)
    total = int(response.headers.get("Content-Length") or 0) or None
    columns = (TextColumn(f"downloading {name}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("download", total=total)
        while True:
            try:
                block = response.read(_BLOCK)
            except (urllib.error.URLError, HTTPException, OSError) as error:
                raise _failed(url, error) from None
            if not block:
                break
            out.write(block)
            digest.update(block)
            progress.advance(task, len(block))
    if digest.hexdigest() != expected:
        raise CnnlabError(
            f"download of {url} is corrupt or truncated: {algorithm} {digest.hexdigest()}, expected {expected}"
        )


def _failed(url: str, error: BaseException) -> CnnlabError:
    if isinstance(error, urllib.error.HTTPError):
        return CnnlabError(f"download of {url} failed: HTTP {error.code} {error.reason}")
    return CnnlabError(f"download of {url} failed: {getattr(error, 'reason', None) or error}")
