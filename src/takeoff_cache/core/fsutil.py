"""File-system helpers that never leave a half-written file behind."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from takeoff_cache.core.faults import checkpoint

_CHUNK = 1 << 20
_TEMP_MARK = ".tmp-"
# Linux's FICLONE ioctl, _IOW(0x94, 9, int): share the source's extents copy-on-write.
_FICLONE = 0x40049409
# What a file system without clones or in-kernel copies answers; anything else is a real error.
_UNSUPPORTED = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.ENOTTY, errno.EOPNOTSUPP, errno.EBADF}
)


def kind_problem(path: Path, want: str) -> str | None:
    """Why ``path`` is not a ``want`` ("file", "folder" or "file or folder"), symlinks
    followed; None if it is.

    Only stat is called, so a FIFO or a device is named without being opened
    (opening a FIFO blocks until a writer comes).
    """
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "does not exist"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    return _mode_problem(mode, want)


def _mode_problem(mode: int, want: str) -> str | None:
    if stat.S_ISREG(mode):
        return None if "file" in want else "is a file, not a folder"
    if stat.S_ISDIR(mode):
        return None if "folder" in want else "is a folder, not a file"
    return f"is a FIFO, socket or device, not a {want}"


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them.

    The file is opened without blocking and checked on the open descriptor, so a
    FIFO, a device (``/dev/zero``) or a folder is refused at once, never read or
    waited on, even if it took the name after a stat. Raises ``OSError`` when it
    cannot be opened or read, ``ValueError`` whose text follows the path ("is a
    FIFO, socket or device, not a file", "is larger than N bytes") otherwise.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if problem := _mode_problem(st.st_mode, "file"):
            raise ValueError(problem)
        too_large = f"is larger than {max_bytes:,} bytes"
        if st.st_size > max_bytes:
            raise ValueError(too_large)
        parts: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(_CHUNK, max_bytes + 1 - size)):
            parts.append(chunk)
            size += len(chunk)
            if size > max_bytes:  # it grew since the fstat
                raise ValueError(too_large)
        return b"".join(parts)
    finally:
        os.close(fd)


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


def temp_target(name: str) -> str | None:
    """The name that the :func:`temp_path` name ``name`` was to become; None for other names."""
    if not is_temp_name(name):
        return None
    return name[1:].rsplit(_TEMP_MARK, 1)[0] or None


@contextmanager
def atomic_output(
    path: Path, *, point: str | None = None, read_only: bool = False
) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on a clean exit, make it ``path``.

    Readers see the old file or the new one, never a mix: the temporary file
    is fsynced and renamed over ``path``, and the directory is fsynced so the
    rename survives a power cut. On any error the temporary file is removed.
    ``point`` names the fault points before the fsync and the rename
    (``<point>.fsync``, ``<point>.rename``, see faults.py). ``read_only``
    makes the file mode 0444 before it takes the name: the work folder's
    engines and indexes are never written in place once stored.
    """
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)  # left by a killed writer whose pid this one now has
    try:
        yield tmp
        if read_only:
            os.chmod(tmp, 0o444)
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
        _write_whole(tmp, data, mode)


def _write_whole(tmp: Path, data: bytes, mode: int) -> None:
    """Write ``tmp`` so that its name appears only once it holds all of ``data``.

    Where Linux offers O_TMPFILE, the bytes go to a nameless file that is given
    its name when complete: a process killed mid-write leaves no partial file
    (in a cache's staging folder, one that ``verify`` could not vouch for).
    """
    try:
        fd = os.open(tmp.parent, os.O_TMPFILE | os.O_WRONLY, mode)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        try:
            with os.fdopen(fd, "wb", closefd=False) as fh:
                fh.write(data)
            os.fsync(fd)
            # Through the descriptor's /proc entry, followed (linkat with
            # AT_SYMLINK_FOLLOW, which os.link uses only with a dir fd).
            proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.link(str(fd), tmp, src_dir_fd=proc, follow_symlinks=True)
            finally:
                os.close(proc)
            return
        except OSError:
            pass  # no /proc, or a file system that cannot link it: write it by name
        finally:
            os.close(fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_file(src: Path, dst: Path) -> None:
    """Place a copy of ``src`` at ``dst`` that shares nothing writable with it.

    A copy-on-write clone where the file system offers one (Linux ``FICLONE``:
    btrfs, XFS), else an in-kernel copy (``copy_file_range``), else a plain
    one; never a hard link, so damaging one cache's file leaves every other
    cache and the work folder's store intact. The copy is written through a
    temporary name and fsynced, so ``dst`` is never partial.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    checkpoint("fsutil.copy", dst)
    with atomic_output(dst) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        _copy_contents(fin, fout)


def _copy_contents(fin: BinaryIO, fout: BinaryIO) -> None:
    try:
        fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
        return
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED and exc.errno != errno.EPERM:
            raise
    size = os.fstat(fin.fileno()).st_size
    try:
        copied = 0
        while copied < size:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), size - copied)
            if n == 0:
                break  # the source shrank under us: verify's digest check will say so
            copied += n
        return
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    # Start over: an in-kernel copy may have stopped part-way.
    fin.seek(0)
    fout.seek(0)
    fout.truncate()
    while chunk := fin.read(_CHUNK):
        fout.write(chunk)
