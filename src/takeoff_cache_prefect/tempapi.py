"""Prefect's temporary API, started before Prefect is imported.

With no API URL, Prefect starts a temporary API server in a subprocess when a
flow first needs it. By then this process has already imported Prefect and the
flow, and the server then imports Prefect itself and starts while this process
only polls it. Started here instead, before the imports, the two start-ups run
side by side (docs/design.md has the figures). It is the same server: Prefect's
own application and command line, in its ephemeral mode.

The server is started on a guess, because reading Prefect's settings imports
Prefect. The guess is that neither the environment nor the active profile names
an API URL. Once Prefect is loaded, :func:`serving` reads the settings. If they
name an API, or do not allow a temporary one, the early server is stopped
unused, and Prefect goes its own way.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# uvicorn's exit status when its port was taken meanwhile (Prefect retries on it too).
_PORT_TAKEN = 3
_FALSE = ("0", "false", "no", "off")


class EarlyServer:
    """A temporary Prefect API server in a subprocess, stopped when this process exits
    (an ``atexit`` hook: after Prefect's workers, which drain at thread shutdown), or
    on Linux when the thread that made it ends: make it on the main thread."""

    def __init__(self) -> None:
        app_dir = _prefect_app_dir()
        if app_dir is None:
            raise OSError("prefect is not installed")
        self._app_dir = app_dir
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = self._spawn()
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> subprocess.Popen[bytes]:
        # As Prefect starts its own: no UI, ephemeral mode (only the services a
        # temporary API needs), errors only on the shared stderr. One change, which
        # an operator's own setting overrides: task runs are recorded in batches.
        # Prefect's default, one database transaction per task-run event, keeps a
        # core busy beside the build on a small host (docs/design.md). This server
        # has no UI to show the runs sooner, and writes what it holds when it stops.
        env = {
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "500",
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "2",
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        args = [sys.executable, "-c", _LAUNCH, str(os.getpid()), "--app-dir", str(self._app_dir)]
        args += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        return subprocess.Popen(args, env=env)

    def wait_healthy(self, timeout_s: float) -> bool:
        """Wait until the API answers its health check; False if it never does."""
        deadline = time.monotonic() + timeout_s
        # Straight to 127.0.0.1: an http_proxy in the environment must not see it.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline and self.process is not None:
            status = self.process.poll()
            if status == _PORT_TAKEN:
                self.port = _free_port()
                self.process = self._spawn()
            elif status is not None:
                return False
            with (
                contextlib.suppress(OSError),
                opener.open(f"{self.url}/health", timeout=2) as response,
            ):
                if response.status == 200:
                    return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# Runs uvicorn as ``python -m uvicorn`` would, once the server is tied to this
# process: on Linux the kernel sends it SIGTERM when the thread that started it
# ends, even by SIGKILL, where the atexit hook never runs. A killed build leaves
# no server behind (it stops as on ``stop``, writing what it holds). argv[1] is
# the starter's pid: had it died before the tie was made, the server exits.
_LAUNCH = """
import os, runpy, signal, sys
starter = int(sys.argv.pop(1))
if sys.platform == "linux":
    import ctypes
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass
    if os.getppid() != starter:
        sys.exit(0)
sys.argv[0] = "uvicorn"
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prefect_app_dir() -> Path | None:
    """The folder holding the ``prefect`` package, found without importing it."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


def _profile_names_api() -> bool:
    """Whether the active Prefect profile sets an API URL (or cannot be read: then
    assume it does, and leave the server to Prefect)."""
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True
    active = os.environ.get("PREFECT_PROFILE") or doc.get("active") or "ephemeral"
    profile = doc.get("profiles", {}).get(active, {})
    return not isinstance(profile, dict) or "PREFECT_API_URL" in profile


def api_configured() -> bool:
    """Whether Prefect will talk to a configured API rather than a temporary one.

    Where Prefect is already loaded (a caller in a long-lived process, a test
    harness) its settings say; otherwise the environment and the active profile
    are read without importing it.
    """
    if "prefect" in sys.modules:
        from prefect.settings import get_current_settings

        return bool(get_current_settings().api.url)
    return bool(os.environ.get("PREFECT_API_URL")) or _profile_names_api()


def start_early() -> EarlyServer | None:
    """Start a temporary API now if Prefect will most likely need one; else None.

    None too where Prefect is already loaded (a caller in a long-lived process):
    there is no import left to overlap, and Prefect's settings decide alone.
    """
    if "prefect" in sys.modules or api_configured():
        return None
    for name in ("PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"):
        if os.environ.get(name, "").strip().lower() in _FALSE:
            return None
    try:
        return EarlyServer()
    except OSError:
        return None  # Prefect starts its own, or says why it cannot


@contextlib.contextmanager
def serving(server: EarlyServer | None, verbose: bool = False) -> Iterator[None]:
    """Within: Prefect's client uses ``server`` if the settings want a temporary API.

    Otherwise (an API URL is set, temporary ones are off, or the server did not
    come up) the server is stopped and Prefect's settings apply unchanged.
    """
    if server is None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    wanted = not settings.api.url and settings.server.ephemeral.enabled
    timeout_s = float(settings.server.ephemeral.startup_timeout_seconds)
    if not wanted or not server.wait_healthy(timeout_s):
        server.stop()
        yield
        return
    if verbose:
        print(f"takeoff-cache: temporary Prefect API on {server.url}", file=sys.stderr)
    # Not stopped on the way out: Prefect's log and event workers send what they
    # still hold when the process exits (before atexit hooks run), through the
    # clients they made during the run, and the server stops after them.
    with temporary_settings(updates={PREFECT_API_URL: server.url}):
        yield
