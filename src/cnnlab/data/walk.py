"""Listing the files below a user's folder without tripping over what real folders hold.

Symbolic-link loops, dangling links, links that lead outside the folder, unreadable sub-folders, files
that vanish mid-scan, and FIFOs, sockets or devices (reading one could block forever) are skipped, each
with its reason, for the caller to count in one warning (or refuse, with --strict). Links inside the folder
are followed, but no real folder is listed twice. Hidden names (".DS_Store", ".git") are left out.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Found:
    parts: tuple[str, ...]  # the path below the root, split into folders and file name
    path: str  # where to read it
    size: int  # bytes
    mtime_ns: int


@dataclass
class Listing:
    files: list[Found] = field(default_factory=list)  # sorted by parts
    skipped: list[str] = field(default_factory=list)  # "PATH: reason", one per entry left out


def walk_files(root: Path) -> Listing:
    """Every non-hidden regular file below `root` (a folder), sorted, and what was skipped and why."""
    listing = Listing()
    real_root = os.path.realpath(root)
    visited: set[tuple[int, int]] = set()  # (device, inode) of every folder listed

    def visit(folder: str, parts: tuple[str, ...]) -> None:
        try:
            folder_stat = os.stat(folder)
            if (folder_stat.st_dev, folder_stat.st_ino) in visited:
                listing.skipped.append(f"{folder}: a link back to a folder already listed (a loop or a duplicate)")
                return
            visited.add((folder_stat.st_dev, folder_stat.st_ino))
            with os.scandir(folder) as entries:
                children = sorted((entry for entry in entries if not entry.name.startswith(".")), key=lambda e: e.name)
        except OSError as error:
            listing.skipped.append(f"{folder}: unreadable folder ({error.strerror or error})")
            return
        for child in children:
            reason = _outside(child, real_root)
            if reason:
                listing.skipped.append(f"{child.path}: {reason}")
                continue
            try:
                child_stat = os.stat(child.path)  # follows links: they stay inside the root (checked above)
            except OSError as error:  # gone since the listing, or a link loop of files
                listing.skipped.append(f"{child.path}: {_vanished(error)}")
                continue
            if stat.S_ISDIR(child_stat.st_mode):
                visit(child.path, (*parts, child.name))
            elif stat.S_ISREG(child_stat.st_mode):
                listing.files.append(
                    Found((*parts, child.name), child.path, child_stat.st_size, child_stat.st_mtime_ns)
                )
            else:
                listing.skipped.append(f"{child.path}: not a regular file (a FIFO, socket or device)")

    visit(str(root), ())
    return listing


def _outside(entry: os.DirEntry[str], real_root: str) -> str | None:
    """Why a symbolic link is not followed, or None for plain entries and links that stay inside."""
    try:
        if not entry.is_symlink():
            return None
    except OSError as error:
        return _vanished(error)
    target = os.path.realpath(entry.path)  # resolves chains; a loop resolves to some path that does not exist
    if not os.path.exists(target):
        return "a dangling or looping symbolic link"
    if os.path.commonpath([real_root, target]) != real_root:
        return f"a symbolic link to {target}, outside the folder (not followed)"
    return None


def _vanished(error: OSError) -> str:
    return f"vanished during the scan ({error.strerror or error})"


def tar_member_bytes(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A regular file's bytes from a tar archive (extractfile gives None only for what is not a regular file)."""
    handle = archive.extractfile(member)
    if handle is None:
        raise tarfile.TarError(f"{member.name} is not a regular file")
    return handle.read()
