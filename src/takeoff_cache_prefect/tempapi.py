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

Unless the idle time (``core.env.PREFECT_IDLE_MIN``) is 0, the server is a warm one
(:class:`WarmServer`): started detached by the first command, with Prefect's UI,
it stays up between commands and stops itself after that many minutes unused
(:data:`DEFAULT_IDLE_MIN`). Later commands find it through a state file under
``PREFECT_HOME`` and pay no start-up; its database keeps every run for the UI.
A per-process temporary server (:class:`EarlyServer`) is the fallback, and
what the variable set to 0 asks for.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from takeoff_cache.core.env import PREFECT_IDLE_MIN, SECRETS
from takeoff_cache.core.fsutil import atomic_write_bytes
from takeoff_cache.errors import InvalidRequestError

# uvicorn's exit status when its port was taken meanwhile (Prefect retries on it too).
_PORT_TAKEN = 3
_FALSE = ("0", "false", "no", "off")

# How long the warm API stays up with no command using it and no request to it.
DEFAULT_IDLE_MIN = 30.0
# Its folder under PREFECT_HOME: the state file naming it, its locks and its log.
STATE_DIR = "takeoff-cache-api"
STATE_FILE = "server.json"


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
        # In a session of its own: a signal to the build's process group (a terminal's
        # Ctrl-C, ``timeout``, ``kill -- -PGID``) must not stop the API the build then
        # reports its stop to. The parent-death tie below ends it with the build.
        return subprocess.Popen(args, env=env, start_new_session=True)

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


class WarmServer:
    """The local Prefect API that outlives a command, shared by the commands that follow.

    Its folder under ``PREFECT_HOME`` holds ``server.json`` (its url, pid, and the
    interpreter and Prefect it runs), ``start.lock``, which a command holds while it
    checks, starts or waits for the server (two commands starting at once share
    one), ``use.lock``, which each command using it holds shared until it exits,
    and ``server.log``. The server (:data:`_WARM_LAUNCH`) stops itself once no
    command has used it, and no request reached it, for ``idle_s``, or when its
    state file no longer names it.
    """

    def __init__(self, home: Path, idle_s: float) -> None:
        app_dir = _prefect_app_dir()
        if app_dir is None:
            raise OSError("prefect is not installed")
        self._app_dir = app_dir
        self.idle_s = idle_s
        self.dir = home / STATE_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.started = False
        self.process: subprocess.Popen[bytes] | None = None
        # Held for this process's life: the server is in use while any command holds it.
        self._use: IO[bytes] | None = _flocked(self.dir / "use.lock", fcntl.LOCK_SH)
        # Held until the server answers (wait_healthy): a second command waits for it.
        self._starting: IO[bytes] | None = _flocked(self.dir / "start.lock", fcntl.LOCK_EX)
        found = _read_state(self.dir / STATE_FILE)
        if (
            found is not None
            and found.get("fingerprint") == _fingerprint()
            and _is_ours(found, self.dir)
            and _healthy(str(found["url"]), _FOUND_TIMEOUT_S)
        ):
            self.port, self.pid = int(found["port"]), int(found["pid"])
            return
        if found is not None and _is_ours(found, self.dir):
            _terminate(int(found["pid"]))  # another version, or one that stopped answering
        self.port = _free_port()
        self._spawn()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> None:
        env = {
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "500",
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "2",
            # Nothing here schedules runs for workers: the services for that stay off.
            **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in _UNUSED_SERVICES},
            **os.environ,
        }
        # It outlives this command: none of this command's secrets go with it.
        for name in ("PREFECT__SERVER_EPHEMERAL", "PREFECT__SERVER_FINAL", "PREFECT_API_URL"):
            env.pop(name, None)
        for name in SECRETS:
            env.pop(name, None)
        args = [sys.executable, "-c", _WARM_LAUNCH, str(self.dir), str(self.idle_s)]
        args += [str(self._app_dir), str(self.port)]
        with open(self.dir / "server.log", "ab") as log:
            # Detached: its own session, no terminal, nothing of this process's output,
            # so that neither a signal to this command nor its end stops it.
            self.process = subprocess.Popen(
                args,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.pid = self.process.pid
        self.started = True
        state = {"url": self.url, "port": self.port, "pid": self.pid}
        state["fingerprint"] = _fingerprint()
        state["idle_s"] = self.idle_s
        atomic_write_bytes(self.dir / STATE_FILE, json.dumps(state).encode(), point="warmapi")

    def wait_healthy(self, timeout_s: float) -> bool:
        """Wait until it answers; then the next command may look for it."""
        try:
            if not self.started:
                return True
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.process is not None:
                status = self.process.poll()
                if status == _PORT_TAKEN:
                    self.port = _free_port()
                    self._spawn()
                elif status is not None:
                    return False
                if _healthy(self.url, 2.0):
                    return True
                time.sleep(0.1)
            return False
        finally:
            self._release_start()

    def _release_start(self) -> None:
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.close()

    def stop(self) -> None:
        """Not needed here (a configured API, or it never answered): leave it. One that
        never answered is stopped; one that did stops itself once idle."""
        if self.started and self.process is not None and not _healthy(self.url, 0.5):
            _terminate(self.pid)
            with contextlib.suppress(OSError):
                (self.dir / STATE_FILE).unlink()
        self._release_start()
        use, self._use = self._use, None
        if use is not None:
            use.close()


# Services of a full server that only deployments and workers need.
_UNUSED_SERVICES = (
    "SCHEDULER",
    "LATE_RUNS",
    "FOREMAN",
    "PAUSE_EXPIRATIONS",
    "CANCELLATION_CLEANUP",
    "REPOSSESSOR",
)
# A running server answers its health check in milliseconds; a starting one is waited for.
_FOUND_TIMEOUT_S = 120.0


def _flocked(path: Path, how: int) -> IO[bytes]:
    handle = open(path, "ab")  # noqa: SIM115 - held past this function, closed by the caller
    fcntl.flock(handle, how)
    return handle


def _fingerprint() -> str:
    """What the server runs: another interpreter or Prefect means another server."""
    try:
        version = importlib.metadata.version("prefect")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return f"{sys.executable} prefect {version}"


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _is_ours(state: dict[str, Any], folder: Path) -> bool:
    """Whether the state's pid is still a warm server of this folder (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{int(state['pid'])}/cmdline").read_bytes()
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return str(folder).encode() in cmdline.split(b"\0")


def _healthy(url: str, timeout_s: float) -> bool:
    """Whether the API at ``url`` answers its health check within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    # Straight to 127.0.0.1: an http_proxy in the environment must not see it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        with (
            contextlib.suppress(OSError),
            opener.open(f"{url}/health", timeout=max(0.2, min(2.0, timeout_s))) as response,
        ):
            if response.status == 200:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _terminate(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)


def stop_warm(home: Path | None = None, timeout_s: float = 30.0) -> bool:
    """Stop the warm API of ``home`` (PREFECT_HOME) now; whether one was running."""
    folder = (home or _prefect_home()) / STATE_DIR
    state = _read_state(folder / STATE_FILE)
    if state is None or not _is_ours(state, folder):
        return False
    pid = int(state["pid"])
    _terminate(pid)
    deadline = time.monotonic() + timeout_s
    while _is_ours(state, folder) and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


# The warm server: Prefect's application (with its UI) under uvicorn, with a watch
# that stops it once idle. argv: its folder, the idle seconds, the folder holding
# the prefect package, the port. Idle means: no command holds ``use.lock``, none is
# starting it (``start.lock``), and no request came for the idle time. Unused, it
# also stops at once when ``server.json`` no longer names it (removed by hand), and
# whenever its folder is gone (PREFECT_HOME removed, as a test's temporary one).
_WARM_LAUNCH = """
import fcntl, json, os, sys, threading, time
folder, idle_s, app_dir, port = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
sys.path.insert(0, app_dir)
import uvicorn
from prefect.server.api.server import create_app

app = create_app()
last = [time.monotonic()]

async def watched(scope, receive, send):
    last[0] = time.monotonic()
    await app(scope, receive, send)

server = uvicorn.Server(
    uvicorn.Config(watched, host="127.0.0.1", port=port, log_level="error", lifespan="on")
)

def free(name):
    with open(os.path.join(folder, name), "ab") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

def named():
    try:
        with open(os.path.join(folder, "server.json"), encoding="utf-8") as handle:
            return json.load(handle).get("pid") == os.getpid()
    except (OSError, ValueError, AttributeError):
        return False

def watch():
    step = max(0.5, min(5.0, idle_s / 4))
    while not server.should_exit:
        time.sleep(step)
        try:
            if not idle():
                continue
        except OSError:
            pass  # its folder is gone (PREFECT_HOME removed): nothing can find it
        break
    server.should_exit = True

def idle():
    with open(os.path.join(folder, "start.lock"), "ab") as starting:
        try:
            fcntl.flock(starting, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a command is starting or finding it
        if not free("use.lock"):
            last[0] = time.monotonic()
            return False
        if not named():
            return True
        if time.monotonic() - last[0] < idle_s:
            return False
        os.unlink(os.path.join(folder, "server.json"))
        return True

threading.Thread(target=watch, daemon=True).start()
server.run()
"""


class ApiGone(KeyboardInterrupt):
    """Raised in the main thread when the run's Prefect API stopped answering: the
    run unwinds as on a stop (staging settled, lock released), rather than wait on
    Prefect's client retrying each of its calls."""

    exit_status = 1
    reason = "the Prefect API stopped answering"


# How long the API may go without answering before the run gives up on it, and
# how often it is asked: a server restarting is back well within this.
API_GONE_S = 10.0
_API_POLL_S = 1.0


def _answers(url: str) -> bool:
    """Whether the API's server is there: its port takes a connection within 2 s.

    A server that went away refuses the connection, resets it or never takes it.
    One that is only slow to answer HTTP (a loaded host, a burst of writes to its
    database) is there, and a run must not give up on it: asking for ``/health``
    with a 2 s timeout did, under load, in the middle of healthy builds.
    """
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "localhost", port), timeout=2):
            return True
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def api_watched(url: str | None, gone_after_s: float = API_GONE_S) -> Iterator[None]:
    """Within: if the API at ``url`` stops answering for ``gone_after_s``,
    :class:`ApiGone` is raised in the main thread, and a connection error of
    Prefect's client that ends the run while the API does not answer becomes one.
    Only on the main thread; a Prefect Cloud URL is left to Prefect's own retries."""
    if (
        not url
        or threading.current_thread() is not threading.main_thread()
        or "api.prefect.cloud" in url
    ):
        yield
        return
    done = threading.Event()
    main_id = threading.main_thread().ident

    def watch() -> None:
        failing_since: float | None = None
        while not done.wait(_API_POLL_S):
            if _answers(url):
                failing_since = None
                continue
            now = time.monotonic()
            failing_since = failing_since if failing_since is not None else now
            if now - failing_since >= gone_after_s and not done.is_set() and main_id:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(main_id), ctypes.py_object(ApiGone)
                )
                return

    thread = threading.Thread(target=watch, name="api-watch", daemon=True)
    thread.start()
    try:
        yield
    except Exception as exc:
        # Prefect's own call gave up first: the same stop, if the API is indeed gone.
        if _from_http_client(exc) and not _answers(url):
            raise ApiGone from exc
        raise
    finally:
        done.set()


def _from_http_client(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection failure of Prefect's HTTP client (httpx)."""
    return any(
        cls.__module__.split(".")[0] in ("httpx", "httpcore") and "Error" in cls.__name__
        for cls in type(exc).__mro__
    )


def _prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def idle_minutes() -> float:
    """The idle time (``core.env.PREFECT_IDLE_MIN``): how long the warm API stays up unused;
    0 where there is to be none."""
    text = os.environ.get(PREFECT_IDLE_MIN, "").strip().lower()
    if not text:
        return DEFAULT_IDLE_MIN
    if text in _FALSE:
        return 0.0
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not 0 <= minutes < 1e6:
        raise InvalidRequestError(
            f"{PREFECT_IDLE_MIN}={text!r}: expected minutes (0 or off: no warm Prefect API)"
        )
    return minutes


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
    home = _prefect_home()
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


def start_early() -> EarlyServer | WarmServer | None:
    """Find or start the warm API, or start a temporary one, if Prefect will most
    likely need one; else None.

    None too where Prefect is already loaded (a caller in a long-lived process):
    there is no import left to overlap, and Prefect's settings decide alone.
    """
    if "prefect" in sys.modules or api_configured():
        return None
    for name in ("PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"):
        if os.environ.get(name, "").strip().lower() in _FALSE:
            return None
    idle_min = idle_minutes()
    if idle_min > 0:
        with contextlib.suppress(OSError):
            return WarmServer(_prefect_home(), idle_min * 60)
    try:
        return EarlyServer()
    except OSError:
        return None  # Prefect starts its own, or says why it cannot


@contextlib.contextmanager
def serving(server: EarlyServer | WarmServer | None, verbose: bool = False) -> Iterator[None]:
    """Within: Prefect's client uses ``server`` if the settings want a temporary API.

    Otherwise (an API URL is set, temporary ones are off, or the server did not
    come up) the server is stopped and Prefect's settings apply unchanged.
    """
    if server is None:
        yield
        return
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_UI_URL,
        get_current_settings,
        temporary_settings,
    )

    settings = get_current_settings()
    wanted = not settings.api.url and settings.server.ephemeral.enabled
    timeout_s = float(settings.server.ephemeral.startup_timeout_seconds)
    if not wanted or not server.wait_healthy(timeout_s):
        server.stop()
        yield
        return
    updates: dict[Any, Any] = {PREFECT_API_URL: server.url}
    if isinstance(server, WarmServer):
        if verbose:
            idle = f"{server.idle_s / 60:g} min"
            print(
                f"takeoff-cache: Prefect API and UI on {server.url[: -len('/api')]}"
                f" (stays up {idle} unused)",
                file=sys.stderr,
            )
    else:
        if verbose:
            print(f"takeoff-cache: temporary Prefect API on {server.url}", file=sys.stderr)
        # No UI, and gone when this process ends: no "View at" link to it.
        updates[PREFECT_UI_URL] = ""
    # Not stopped on the way out: Prefect's log and event workers send what they
    # still hold when the process exits (before atexit hooks run), through the
    # clients they made during the run, and a temporary server stops after them.
    with temporary_settings(updates=updates):
        yield
