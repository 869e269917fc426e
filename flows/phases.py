"""One build-cache run: its report, its timed phases, and what its end must undo.

A :class:`BuildRun` is the flow's context: each ``with run.phase(name)`` times a
phase into the report and names the disk in a failure that library code left
unnamed; what a phase acquires for the rest of the build (the lock, the
staging folder) is entered into the run and left, in reverse order, when it
ends. However the run ends, its report is published and handed to a caller in
the same process (the CLI), through :func:`recorded_outcomes`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import Any

from prefect.client.schemas.objects import State
from prefect.states import Failed
from takeoff_cache_prefect.tasks.build import publish_report

from takeoff_cache.build.report import BuildReport
from takeoff_cache.errors import BadTilesError, CacheIOError, TakeoffCacheError

Outcome = dict[str, Any] | TakeoffCacheError

# What the runs of this flow ended with, for a caller in the same process (the CLI).
# The run's final state as the API hands it back can lack its data: a state update
# the client retried after the server had already taken it is answered with the
# server's copy, which holds no unpersisted result. The flow itself always knows.
_outcomes: ContextVar[list[Outcome] | None] = ContextVar("build_cache_outcomes", default=None)


@contextmanager
def recorded_outcomes() -> Iterator[list[Outcome]]:
    """Collect, in order, the report (or the error) of each run started in this block."""
    outcomes: list[Outcome] = []
    token = _outcomes.set(outcomes)
    try:
        yield outcomes
    finally:
        _outcomes.reset(token)


def report_of(outcomes: list[Outcome], state: State) -> dict[str, Any]:
    """The report a build-cache run ended with, from what it recorded (its state's
    copy can lack it); the error it ended with is raised."""
    outcome = outcomes[-1] if outcomes else state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        raise outcome
    if not isinstance(outcome, dict):
        raise TypeError(f"build-cache returned {type(outcome).__name__}, not a report")
    return outcome


def _record(outcome: Outcome) -> None:
    outcomes = _outcomes.get()
    if outcomes is not None:
        outcomes.append(outcome)


class BuildRun(ExitStack):
    def __init__(self, cache_root: str | None) -> None:
        super().__init__()
        self.report = BuildReport()
        self._cache_root = os.path.abspath(cache_root or ".")
        self._started = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except OSError as exc:
            if isinstance(exc, TakeoffCacheError):
                raise
            # The disk failed under library code that had no better name for it.
            raise CacheIOError(f"{name}: {_os_error_text(exc)}") from exc
        finally:
            self.report.phases[name] = round(time.perf_counter() - start, 4)

    def end(self, outcome: str | None = None, **fields: Any) -> dict[str, Any] | State:
        """Close the report (``outcome`` and ``fields`` set on it) and publish it."""
        if outcome is not None:
            self.report.outcome = outcome
        for name, value in fields.items():
            setattr(self.report, name, value)
        self.report.elapsed_s = round(time.perf_counter() - self._started, 4)
        # Submitted, not awaited: the artifact is written while the run winds down
        # (the flow's task runner waits for it before the run ends). A lost UI
        # artifact must not change the build's outcome, so its future is never read.
        with contextlib.suppress(Exception):
            publish_report.submit(self.report, self._cache_root)
        data = self.report.to_json()
        _record(data)
        if self.report.outcome == "failure":
            # A soft failure (no tiles, bad tiles) shows as a Failed run with its reason
            # in the UI; callers asking for the state still get the report as its data.
            return Failed(message=self.report.failure_reason, data=data)
        return data

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        # Whatever was entered (staging, then the lock) is left first: a failure
        # ends with the cache as it was and the lock free.
        suppressed = super().__exit__(kind, exc, tb)
        if isinstance(exc, BadTilesError):
            # A soft end: the flow returns its report (see ``end``).
            self.report.failure_reason = str(exc)
            self.report.descriptors_generated = exc.generated
            self.report.descriptors_reused = exc.reused
            return True
        if isinstance(exc, TakeoffCacheError):
            self.report.failure_reason = str(exc)
            self.end("failure")
            _record(exc)
        return bool(suppressed)


def _os_error_text(exc: OSError) -> str:
    files = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    reason = exc.strerror or str(exc)
    return f"{files}: {reason}" if files else reason
