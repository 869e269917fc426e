"""Running the build-cache flow from the command line, in this process.

The CLI calls :func:`run_build` with the request's raw fields and the build
options; Prefect is configured and imported here, never in the library.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from takeoff_cache.errors import TakeoffCacheError
from takeoff_cache.options import BuildOptions

# Prefect's names for the flow-run heartbeat interval (the second is its legacy alias).
HEARTBEAT_SETTINGS = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


def prefect_env(verbose: bool) -> None:
    """Defaults for Prefect, set before it is imported: no telemetry, quiet unless asked."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The Python client's own usage events, off before it would ask the server.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY", "false")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    # The embedded API starts in a subprocess; on a busy 2-core host 20 s is not enough.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not verbose:
        # Run logs still reach the Prefect API (and UI); only the terminal copy is muted,
        # so an operator sees our one-line errors, not Prefect's tracebacks.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")


@contextlib.contextmanager
def heartbeats_only_when_asked() -> Iterator[None]:
    """Flow-run heartbeats only when the operator set their interval, toward a server.

    Heartbeats let an automation on a Prefect server mark a killed run
    Crashed (Prefect's zombie-flow recipe, docs/operations.md). Without that
    automation, or toward the temporary API (which ends with this process),
    they reach no one, yet Prefect sends them by default and joins their
    thread, which sleeps in one-second steps, at the end of every run.
    Deployment runs do not come through here and keep Prefect's setting.
    """
    from prefect.context import get_settings_context
    from prefect.settings import get_current_settings, temporary_settings

    profile = get_settings_context().profile.settings
    asked = any(name in os.environ for name in HEARTBEAT_SETTINGS) or any(
        getattr(setting, "name", None) in HEARTBEAT_SETTINGS for setting in profile
    )
    if asked and get_current_settings().api.url:
        yield
        return
    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        yield


class _NoTracebackForExpectedErrors(logging.Filter):
    """Run logs keep the one-line reason of an error we raised on purpose, not its
    traceback: that is for the unexpected (``-v`` shows run logs on the terminal)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TakeoffCacheError):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_expected_errors() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForExpectedErrors) for f in logger.filters):
            logger.addFilter(_NoTracebackForExpectedErrors())


def run_build(raw: dict[str, Any], options: BuildOptions, verbose: bool) -> dict[str, Any]:
    """Run build-cache for one request; return its report or raise its typed error."""
    prefect_env(verbose)
    from takeoff_cache_prefect.tempapi import serving, start_early

    # Before Prefect and the flow are imported, so the server starts meanwhile.
    server = start_early()
    from takeoff_cache_prefect.flows.build import build_cache
    from takeoff_cache_prefect.flows.phases import recorded_outcomes

    quiet_expected_errors()

    params = {k: v for k, v in raw.items() if v is not None}
    params.update(
        work_dir=str(options.work_dir),
        backend=options.backend,
        coverage=options.coverage,
        expires_in_s=options.expires_in_s,
        dask_address=options.dask_address,
        self_test=options.self_test,
        min_recall=options.min_recall,
    )
    # As a state: a soft failure is a Failed run, and an unexpected error is the
    # state's data rather than a traceback through Prefect's engine.
    # Heartbeats are decided first: toward a temporary API they reach no one.
    with (
        heartbeats_only_when_asked(),
        serving(server, verbose),
        recorded_outcomes() as outcomes,
    ):
        state = build_cache(**params, return_state=True)
    if outcomes:
        # What the flow itself ended with; the state's copy can lack it.
        outcome = outcomes[-1]
        if isinstance(outcome, TakeoffCacheError):
            raise outcome
        return outcome
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    if not isinstance(result, dict):
        raise TypeError(f"build-cache returned {type(result).__name__}, not a report")
    return result
