"""File-system helpers that never leave a half-written file behind."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from .faults import checkpoint

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes, read in chunks."""
    with open(path, "rb") as fh:
        return sha256_stream(fh)


def sha256_stream(fh: BinaryIO) -> str:
    """The hex SHA-256 of what is left to read of ``fh``, read in chunks."""
    digest = hashlib.sha256()
    while chunk := fh.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(
    path: Path, data: bytes, mode: int = 0o644, *, point: str = "fsutil"
) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    The bytes go to a temporary file in the same directory, are fsynced, and
    the file is renamed over ``path``; the directory is fsynced so the rename
    survives a power cut. ``point`` names the fault points before the write,
    the fsync and the rename (``<point>.write`` …, see faults.py).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    checkpoint(f"{point}.write", tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            checkpoint(f"{point}.fsync", tmp)
            os.fsync(fh.fileno())
        checkpoint(f"{point}.rename", path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(src: Path, dst: Path, *, link: bool = True) -> None:
    """Place ``src`` at ``dst`` by hard link where the file system allows, else by copy.

    Engines are immutable once stored, so sharing the inode is safe; a copy is
    written through a temporary name and fsynced so ``dst`` is never partial.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    checkpoint("fsutil.link", dst)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
