"""Fault points: named places in a build where a test can kill the process or fail an I/O call.

``TAKEOFF_CACHE_KILL_AT=name`` (or ``name:N``, the N-th time the point is
reached) sends SIGKILL to the build's own process at that point: a real
``kill -9`` at a precise instant, so crash-safety tests need no timing luck.

``TAKEOFF_CACHE_FAIL_AT=name:ERRNO`` (or ``name:N:ERRNO``, with ERRNO a name
such as ``ENOSPC`` or ``EIO``) makes the point raise ``OSError`` instead, as
the write, fsync or rename right after it would on a full or failing disk.

``TAKEOFF_CACHE_STOP_AT=name[:N]`` sends SIGSTOP instead: the process waits
there until someone sends SIGCONT, which lets a test line several builds up
at the same instant.

Several specs may be given, separated by commas. ``TAKEOFF_CACHE_FAULT_TRACE=FILE``
appends the name and time of every point reached to FILE, which is how the
tests enumerate the points a build passes. The variables are read once, at import;
with none set a checkpoint costs one lookup in an empty dict. :func:`reset`
re-reads them (for tests that run builds in-process).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import Any

from takeoff_cache.core.env import FAIL_AT, FAULT_TRACE, KILL_AT, STOP_AT

# name -> list of (occurrence or 0 for every time, errno, or _KILL or _STOP)
_KILL, _STOP = 0, -1
_plan: dict[str, list[tuple[int, int]]] = {}
_seen: dict[str, int] = {}


def _occurrence(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"fault spec {spec!r}: occurrence must be a positive integer")
    return int(text)


def parse(
    kill_at: str | None, fail_at: str | None, stop_at: str | None = None
) -> dict[str, list[tuple[int, int]]]:
    """Turn the variables into a plan; malformed specs are refused loudly."""
    plan: dict[str, list[tuple[int, int]]] = {}
    for specs, action in ((kill_at, _KILL), (stop_at, _STOP)):
        for spec in filter(None, (s.strip() for s in (specs or "").split(","))):
            name, _, count = spec.partition(":")
            plan.setdefault(name, []).append((_occurrence(count, spec) if count else 0, action))
    for spec in filter(None, (s.strip() for s in (fail_at or "").split(","))):
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"fault spec {spec!r}: expected name[:N]:ERRNO")
        code = getattr(errno, parts[-1], None)
        if not isinstance(code, int) or not parts[-1].startswith("E"):
            raise ValueError(f"fault spec {spec!r}: {parts[-1]!r} is not an errno name")
        nth = _occurrence(parts[1], spec) if len(parts) == 3 else 0
        plan.setdefault(parts[0], []).append((nth, code))
    return plan


class _Tracer(dict[str, list[tuple[int, int]]]):
    """A plan that also records every point looked up in it."""

    def __init__(self, plan: dict[str, list[tuple[int, int]]], trace: str) -> None:
        super().__init__(plan)
        self.trace = trace

    def get(self, name: str, default: Any = None) -> Any:
        with open(self.trace, "a", encoding="utf-8") as fh:
            fh.write(f"{name} {time.time():.6f}\n")
        return super().get(name, default)


def reset() -> None:
    """Re-read the environment and restart the occurrence counts."""
    global _plan
    _plan = parse(os.environ.get(KILL_AT), os.environ.get(FAIL_AT), os.environ.get(STOP_AT))
    trace = os.environ.get(FAULT_TRACE)
    if trace:
        _plan = _Tracer(_plan, trace)
    _seen.clear()


def checkpoint(name: str, path: object = None) -> None:
    """Mark a fault point; ``path`` names the file the next operation touches (for messages)."""
    actions = _plan.get(name)
    if actions is None:
        return
    count = _seen[name] = _seen.get(name, 0) + 1
    for nth, code in actions:
        if nth not in (0, count):
            continue
        if code == _KILL:
            os.kill(os.getpid(), signal.SIGKILL)
        elif code == _STOP:
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            raise OSError(code, os.strerror(code), None if path is None else str(path))


reset()
