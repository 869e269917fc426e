"""What a caller in this process hands a flow run beside its parameters.

A flow's parameters are recorded by Prefect's API and must be plain values;
these are not: the locks the command line took before Prefect started (the
flow's lock phases adopt them), where the download's progress is shown, and
where a companion's build output is relayed. Each is set by ``handed`` around
the run and read by the task that needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from takeoff_cache.build.lock import ExclusiveLock
    from takeoff_cache.prepare.download import DownloadProgress

held_locks: ContextVar[tuple[ExclusiveLock, ...]] = ContextVar("held_locks", default=())
download_progress: ContextVar[Callable[[DownloadProgress], None] | None] = ContextVar(
    "download_progress", default=None
)
companion_lines: ContextVar[Callable[[str], None] | None] = ContextVar(
    "companion_lines", default=None
)


@contextmanager
def handed(
    locks: tuple[ExclusiveLock, ...] = (),
    progress: Callable[[DownloadProgress], None] | None = None,
    lines: Callable[[str], None] | None = None,
) -> Iterator[None]:
    tokens = held_locks.set(locks), download_progress.set(progress), companion_lines.set(lines)
    try:
        yield
    finally:
        held_locks.reset(tokens[0])
        download_progress.reset(tokens[1])
        companion_lines.reset(tokens[2])
