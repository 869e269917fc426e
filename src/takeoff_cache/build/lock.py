"""Exclusive locks, enforced by a kernel ``flock``: one build per cache root (the
lock phase), one ``prepare`` per corpus (the workstation lock).

The kernel drops a lock when its process dies, so a killed run never leaves
anything locked; ``fallback_to_soft=False`` refuses to degrade to a lock file
whose mere existence blocks forever.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from filelock import FileLock, Timeout

from takeoff_cache.core.faults import checkpoint
from takeoff_cache.core.layout import LOCK_NAME
from takeoff_cache.errors import CacheIOError, LockHeldError


class ExclusiveLock:
    """The lock at ``path``; ``holder`` names who else may hold it (``"build"``), and
    ``point`` prefixes its fault-injection checkpoints."""

    def __init__(self, path: Path, holder: str, point: str = "lock") -> None:
        self.path = path
        self._holder = holder
        self._point = point
        # thread_local=False: Prefect may run the releasing task on another thread.
        # preserve_lock_file: unlinking a flock file lets two processes lock two inodes.
        self._lock = FileLock(
            str(self.path),
            timeout=0,
            thread_local=False,
            is_singleton=False,
            fallback_to_soft=False,
            preserve_lock_file=True,
        )

    def acquire(self) -> ExclusiveLock:
        checkpoint(f"{self._point}.acquire", self.path)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            checkpoint(f"{self._point}.refused", self.path)
            raise LockHeldError(
                f"lock: another {self._holder} holds {self.path}; wait for it to finish"
            ) from None
        except OSError as exc:
            raise CacheIOError(f"lock: cannot open {self.path}: {exc.strerror}") from exc
        try:
            checkpoint(f"{self._point}.acquired", self.path)
        except OSError:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def __enter__(self) -> ExclusiveLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._lock.is_locked


class BuildLock(ExclusiveLock):
    def __init__(self, cache_root: Path) -> None:
        super().__init__(cache_root / LOCK_NAME, "build")

    def acquire(self) -> ExclusiveLock:
        """Take the cache's lock and empty its file: the lock file is only ever locked,
        and ``verify`` refuses one that holds bytes, so a build must not leave any."""
        super().acquire()
        try:
            # Not through a link: what it leads to is not the cache's to empty.
            fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                if os.fstat(fd).st_size:
                    os.ftruncate(fd, 0)
                    os.fsync(fd)
            finally:
                os.close(fd)  # a second descriptor: the flock stays with the first
        except OSError as exc:
            self.release()
            raise CacheIOError(f"lock: cannot empty {self.path}: {exc.strerror}") from exc
        return self


def adopt_or_acquire(lock: ExclusiveLock, held: Iterable[ExclusiveLock] = ()) -> ExclusiveLock:
    """The one of ``held`` (locks this process already holds, handed over by its
    caller) that is ``lock``'s file, else ``lock`` acquired now.

    flock locks belong to an open file: a second open of the same file in this
    process would be refused, so a lock taken before a flow started is adopted.
    """
    path = lock.path.resolve()
    for early in held:
        if early.held and early.path.resolve() == path:
            return early
    return lock.acquire()
