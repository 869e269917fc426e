"""The lock phase: one build per cache root, enforced by a kernel ``flock``.

The kernel drops the lock when its process dies, so a killed build never
leaves a cache locked; ``fallback_to_soft=False`` refuses to degrade to a
lock file whose mere existence blocks forever.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import CacheIOError, LockHeldError
from .faults import checkpoint
from .layout import LOCK_NAME


class BuildLock:
    def __init__(self, cache_root: Path) -> None:
        self.path = cache_root / LOCK_NAME
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

    def acquire(self) -> BuildLock:
        checkpoint("lock.acquire", self.path)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            checkpoint("lock.refused", self.path)
            raise LockHeldError(
                f"lock: another build holds {self.path}; wait for it to finish"
            ) from None
        except OSError as exc:
            raise CacheIOError(f"lock: cannot open {self.path}: {exc.strerror}") from exc
        try:
            checkpoint("lock.acquired", self.path)
        except OSError:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def __enter__(self) -> BuildLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._lock.is_locked


# Locks this process took before its flow started (see ``held_early``). flock
# locks belong to an open file, so the lock phase must adopt the one already
# held: a second open of the same file in this process would be refused.
_early: dict[Path, BuildLock] = {}


def acquire(cache_root: Path) -> BuildLock:
    early = _early.get((cache_root / LOCK_NAME).resolve())
    if early is not None and early.held:
        return early
    return BuildLock(cache_root).acquire()


@contextmanager
def held_early(cache_root: Path) -> Iterator[BuildLock]:
    """Take a validated request's cache lock before Prefect starts, so a second build
    is refused at once; the flow's lock phase adopts it.

    Starting Prefect, and recording a refused run as Failed, take seconds. Only
    after validation: the lock file is the first write to a cache root, and an
    invalid request (an untrusted key) must leave it untouched.
    """
    path = (cache_root / LOCK_NAME).resolve()
    lock = BuildLock(cache_root).acquire()
    _early[path] = lock
    try:
        yield lock
    finally:
        _early.pop(path, None)
        lock.release()
