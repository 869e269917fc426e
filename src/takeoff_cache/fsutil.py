"""File-system helpers that never leave a half-written file behind."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .faults import checkpoint

_CHUNK = 1 << 20
_TEMP_MARK = ".tmp-"


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


def temp_path(path: Path) -> Path:
    """The temporary name beside ``path`` that a write goes to before its rename."""
    return path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a :func:`temp_path` name (one a killed writer may have left)."""
    return name.startswith(".") and _TEMP_MARK in name


@contextmanager
def atomic_output(path: Path, *, point: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on a clean exit, make it ``path``.

    Readers see the old file or the new one, never a mix: the temporary file
    is fsynced and renamed over ``path``, and the directory is fsynced so the
    rename survives a power cut. On any error the temporary file is removed.
    ``point`` names the fault points before the fsync and the rename
    (``<point>.fsync``, ``<point>.rename``, see faults.py).
    """
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)  # left by a killed writer whose pid this one now has
    try:
        yield tmp
        if point is not None:
            checkpoint(f"{point}.fsync", tmp)
        fsync_file(tmp)
        if point is not None:
            checkpoint(f"{point}.rename", path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(
    path: Path, data: bytes, mode: int = 0o644, *, point: str = "fsutil"
) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_output`.

    ``point`` names the fault points before the write, the fsync and the
    rename (``<point>.write`` …, see faults.py).
    """
    with atomic_output(path, point=point) as tmp:
        checkpoint(f"{point}.write", tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)


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
    with atomic_output(dst) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)
