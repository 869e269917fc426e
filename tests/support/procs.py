"""Builds in their own processes against one real Prefect server, for kill -9 and lock tests.

Each CLI process that starts Prefect's ephemeral API pays for that server's
start-up; one ``prefect server start`` per test session, shared through
``PREFECT_API_URL``, makes a subprocess build cost its imports and its work only.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from filelock import FileLock, Timeout

from takeoff_cache.core.layout import LOCK_NAME, MANIFEST_NAME, STAGING_NAME, walk_cache
from takeoff_cache.demo.synthetic import encode_jpeg, render_tile, replace_tile_bytes
from takeoff_cache.trust.keys import load_trust_store
from takeoff_cache.trust.manifest import Manifest
from takeoff_cache.trust.verify import verify_cache

SERVER_START_TIMEOUT_S = 180


# The command line as its own process, from this interpreter and checkout.
CLI = (
    sys.executable,
    "-c",
    "import sys; from takeoff_cache.cli.main import main; sys.exit(main())",
)


def children(pid: int) -> list[int]:
    """The processes ``pid``'s threads have started and not yet seen exit."""
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def command_line(pid: int) -> str:
    """``pid``'s command line; "" once it has exited (a zombie has none either)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrefectServer:
    """``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME; no UI, no telemetry."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="takeoff-cache-server-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self._log = open(self.home / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        }
        env.pop("PREFECT_API_URL", None)
        prefect = Path(sys.executable).with_name("prefect")
        self.proc = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started_s = 0.0

    def wait_healthy(self) -> None:
        start = time.monotonic()
        while time.monotonic() - start < SERVER_START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"prefect server exited with {self.proc.returncode}:"
                    f" {(self.home / 'server.log').read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        self.started_s = time.monotonic() - start
                        return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"prefect server not healthy after {SERVER_START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.home, ignore_errors=True)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a build process that reports to this server."""
        env = {
            **os.environ,
            "PREFECT_API_URL": self.url,
            # The client's own files (cached task results) stay out of the operator's home.
            "PREFECT_HOME": str(self.home / "client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
        }
        for name in ("TAKEOFF_CACHE_KILL_AT", "TAKEOFF_CACHE_FAIL_AT"):
            env.pop(name, None)
        env.update(extra)
        return env


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    started: float  # time.monotonic() at spawn
    wall_s: float

    def report(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.stdout)
        return data


def start_build(
    root: Path, env: dict[str, str], *flags: str
) -> tuple[subprocess.Popen[str], float]:
    """Spawn ``takeoff-cache build`` on the sandbox ``root`` (its request and work folder)."""
    argv = [
        sys.executable,
        "-m",
        "takeoff_cache.cli.main",
        "build",
        "--request",
        str(root / "request.toml"),
        "--work-dir",
        str(root / "work"),
        "--json",
        *flags,
    ]
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc, started


def finish(proc: subprocess.Popen[str], started: float, timeout: float = 300) -> Run:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"build still running after {timeout} s: {err[-2000:]}") from None
    return Run(proc.returncode, out, err, started, time.monotonic() - started)


def run_build(root: Path, env: dict[str, str], *flags: str, timeout: float = 300) -> Run:
    proc, started = start_build(root, env, *flags)
    return finish(proc, started, timeout)


# --- sandboxes: a copy of the demo inputs, cache and work folder ---------------------------


def copy_sandbox(source: Path, dest: Path) -> Path:
    # Plain copies: a hard link shared with the source would let one sandbox damage another.
    shutil.copytree(source, dest, symlinks=True)
    return dest


def settle_corpus(root: Path) -> None:
    """Wait until the sandbox's corpus has been unchanged for RACY_S, as a corpus downloaded
    before the build has: the build then remembers its selection whatever its start-up
    time. Without it, whether it does depends on how soon after the copy it selects."""
    from takeoff_cache.tiles.selection import RACY_S, _last_change_ns, _signature

    changed_ns = _last_change_ns(_signature(root / "corpus.mbtiles"))
    time.sleep(max(0.0, changed_ns / 1e9 + RACY_S + 0.05 - time.time()))


def cache_of(root: Path) -> Path:
    return root / "cache"


def trusted_of(root: Path) -> list[Any]:
    return load_trust_store(root / "trust")


def change_one_tile(root: Path, seed: int = 99) -> None:
    """Give one z17 tile new bytes: new corpus fingerprint, so a new index replaces the old."""
    z, x, y = _a_tile(root)
    replace_tile_bytes(root / "corpus.mbtiles", z, x, y, encode_jpeg(render_tile(z, x, y, seed)))


def _a_tile(root: Path) -> tuple[int, int, int]:
    signed = json.loads((cache_of(root) / MANIFEST_NAME).read_text())["signed"]
    tile_map = next(a["path"] for a in signed["artifacts"] if a["kind"] == "tile_map")
    rows = json.loads((cache_of(root) / tile_map).read_text())["rows"]
    z, x, y = rows[-1]
    return int(z), int(x), int(y)


def change_model(root: Path, name: str = "keypoints", note: str = "retrained") -> None:
    """New bytes for one backbone's ONNX file, as after retraining: its engine must be rebuilt."""
    path = root / "models" / f"{name}.onnx"
    model = onnx.load(str(path))
    model.doc_string = note
    buf = io.BytesIO()
    onnx.save(model, buf)
    path.write_bytes(buf.getvalue())


# --- what must hold after a kill, and after the build that follows ------------------------


def lock_is_free(cache: Path) -> bool:
    lock = FileLock(str(cache / LOCK_NAME), timeout=0, is_singleton=False, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    lock.release()
    return True


def verified(root: Path) -> Manifest:
    return verify_cache(cache_of(root), trusted_of(root))


def assert_clean(root: Path) -> Manifest:
    """The cache verifies, holds exactly what its manifest lists, and no staging is left."""
    manifest = verified(root)
    cache = cache_of(root)
    entries = walk_cache(cache)
    assert set(entries.files) == {a.path for a in manifest.artifacts}, entries.files
    assert entries.others == ()
    assert not (cache / STAGING_NAME).exists()
    return manifest


def hold_lock(lock: Path) -> subprocess.Popen[str]:
    """Another process holding the flock at ``lock`` until it is killed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from filelock import FileLock
            lock = FileLock({str(lock)!r}, fallback_to_soft=False, preserve_lock_file=True)
            lock.acquire()
            print("held", flush=True)
            time.sleep(60)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder
