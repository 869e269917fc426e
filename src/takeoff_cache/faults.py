"""Fault points: named places in a build where a test can kill the process or fail an I/O call.

``TAKEOFF_CACHE_KILL_AT=name`` (or ``name:N``, the N-th time the point is
reached) sends SIGKILL to the build's own process at that point: a real
``kill -9`` at a precise instant, so crash-safety tests need no timing luck.

``TAKEOFF_CACHE_FAIL_AT=name:ERRNO`` (or ``name:N:ERRNO``, with ERRNO a name
such as ``ENOSPC`` or ``EIO``) makes the point raise ``OSError`` instead, as
the write, fsync or rename right after it would on a full or failing disk.

Several specs may be given, separated by commas. The variables are read once,
at import; with neither set a checkpoint costs one lookup in an empty dict.
:func:`reset` re-reads them (for tests that run builds in-process).
"""

from __future__ import annotations

import errno
import os
import signal

KILL_ENV = "TAKEOFF_CACHE_KILL_AT"
FAIL_ENV = "TAKEOFF_CACHE_FAIL_AT"

# name -> list of (occurrence or 0 for every time, errno or 0 for a kill)
_plan: dict[str, list[tuple[int, int]]] = {}
_seen: dict[str, int] = {}


def _occurrence(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"fault spec {spec!r}: occurrence must be a positive integer")
    return int(text)


def parse(kill_at: str | None, fail_at: str | None) -> dict[str, list[tuple[int, int]]]:
    """Turn the two variables into a plan; malformed specs are refused loudly."""
    plan: dict[str, list[tuple[int, int]]] = {}
    for spec in filter(None, (s.strip() for s in (kill_at or "").split(","))):
        name, _, count = spec.partition(":")
        plan.setdefault(name, []).append((_occurrence(count, spec) if count else 0, 0))
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


def reset() -> None:
    """Re-read the environment and restart the occurrence counts."""
    global _plan
    _plan = parse(os.environ.get(KILL_ENV), os.environ.get(FAIL_ENV))
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
        if code == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(code, os.strerror(code), None if path is None else str(path))


reset()
