"""Running the build-cache and prepare-flight flows from the command line, in this process.

The CLI calls :func:`run_build` with the request's raw fields and the build
options, :func:`run_prepare` with prepare-flight's parameters; Prefect is
configured and imported here, never in the library.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from takeoff_cache.build.options import OPTION_FIELDS, BuildOptions
from takeoff_cache.errors import TakeoffCacheError

if TYPE_CHECKING:
    from takeoff_cache.build.lock import ExclusiveLock
    from takeoff_cache.prepare.download import DownloadProgress
    from takeoff_cache.prepare.report import PrepareReport

# Retries of a failed call to the API (Prefect's default is 5: 2+4+8+16+32 s of waits).
CLIENT_MAX_RETRIES = 2
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
    # An API that stops answering mid-run (a configured server that went down) is
    # given up on within seconds per call, not Prefect's five retries of a minute
    # in all: a command stuck on it for minutes helps no one (docs/operations.md).
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", str(CLIENT_MAX_RETRIES))
    if not verbose:
        # Run logs still reach the Prefect API (and UI); only the terminal copy is muted,
        # so an operator sees our one-line errors, not Prefect's tracebacks, nor its
        # workers' complaints about an API that went away.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_INTERNAL_LOGGING_LEVEL", "CRITICAL")
        logging.raiseExceptions = False


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
    from prefect.context import SettingsContext, get_settings_context

    context = get_settings_context()
    settings = context.settings
    asked = any(name in os.environ for name in HEARTBEAT_SETTINGS) or any(
        getattr(setting, "name", None) in HEARTBEAT_SETTINGS for setting in context.profile.settings
    )
    if asked and settings.api.url:
        yield
        return
    # A copy with the one field changed: Prefect's temporary_settings validates every
    # setting again, a tenth of a second of each run.
    flows = settings.flows.model_copy(update={"heartbeat_frequency": None})
    with SettingsContext(
        profile=context.profile, settings=settings.model_copy(update={"flows": flows})
    ):
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


@contextlib.contextmanager
def _session(server: Any, verbose: bool) -> Iterator[None]:
    """Around a flow run from the command line: quiet expected errors, heartbeats
    only when asked (toward a temporary API they reach no one), the API served
    and watched."""
    from takeoff_cache_prefect.tempapi import serving

    quiet_expected_errors()
    with heartbeats_only_when_asked(), serving(server, verbose), _watched():
        yield


@contextlib.contextmanager
def _watched() -> Iterator[None]:
    """An API that goes away mid-run ends it within seconds (``tempapi.ApiGone``)."""
    from prefect.settings import get_current_settings

    from takeoff_cache_prefect.tempapi import api_watched

    with api_watched(get_current_settings().api.url):
        yield


def _start(verbose: bool) -> Any:
    """Prefect's defaults, then the temporary API started before Prefect is imported,
    so the server starts while the caller imports its flow."""
    prefect_env(verbose)
    from takeoff_cache_prefect.tempapi import start_early

    return start_early()


@contextlib.contextmanager
def _loading() -> Iterator[None]:
    """Around importing Prefect and the flows: no garbage collection while a thousand
    modules create their objects (a sixth of the import's time went to collections that
    found nothing to free), then those objects set aside from later collections, since
    they live as long as the process (``gc.freeze``)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _flow_options(options: BuildOptions) -> dict[str, Any]:
    out = {f.name: getattr(options, f.name) for f in OPTION_FIELDS}
    out["work_dir"] = str(options.work_dir)
    return out


def run_build(
    raw: dict[str, Any],
    options: BuildOptions,
    verbose: bool,
    held: tuple[ExclusiveLock, ...] = (),
) -> dict[str, Any]:
    """Run build-cache for one request; return its report or raise its typed error.

    ``held`` are locks this process took before (the cache's): the run adopts them.
    """
    server = _start(verbose)
    with _loading():
        from takeoff_cache_prefect.context import handed
        from takeoff_cache_prefect.flows.build import build_cache
        from takeoff_cache_prefect.flows.phases import recorded_outcomes, report_of

    params = {k: v for k, v in raw.items() if v is not None}
    params.update(_flow_options(options))
    # As a state: a soft failure is a Failed run, and an unexpected error is the
    # state's data rather than a traceback through Prefect's engine.
    with _session(server, verbose), handed(held), recorded_outcomes() as outcomes:
        state = build_cache(**params, return_state=True)
    return report_of(outcomes, state)


def run_prepare(
    params: dict[str, Any],
    options: BuildOptions,
    verbose: bool,
    progress: Callable[[DownloadProgress], None] | None = None,
    lines: Callable[[str], None] | None = None,
    held: tuple[ExclusiveLock, ...] = (),
) -> tuple[PrepareReport, TakeoffCacheError | None]:
    """Run prepare-flight; return its report and the error that stopped it, if one did.

    ``progress`` sees the download's progress, ``lines`` what a companion's build
    prints, and ``held`` are locks this process took before (the corpus's), which
    the run adopts: none of them can be a flow parameter.
    """
    server = _start(verbose)
    with _loading():
        from takeoff_cache_prefect.context import handed
        from takeoff_cache_prefect.flows.prepare import prepare_flight, recorded_prepares

    params = {**params, **_flow_options(options)}
    with (
        _session(server, verbose),
        handed(held, progress, lines),
        recorded_prepares() as outcomes,
    ):
        state = prepare_flight(**params, return_state=True)
    if outcomes:
        return outcomes[-1]
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    raise TypeError(f"prepare-flight returned {type(result).__name__}, not a report")
