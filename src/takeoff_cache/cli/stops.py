"""How a command stops: on SIGINT or SIGTERM, promptly, with one line.

A terminal's Ctrl-C, ``timeout``, ``kill -- -PGID`` and systemd signal the
command's whole process group. The first signal raises KeyboardInterrupt where
the main thread is (SIGTERM as :class:`Stopped`, a subclass), so the build unwinds
as it does on Ctrl-C: staging settled, lock released, the cache as it was. A
second signal is ignored: it must not cut the cleanup the first one started.

Two bounds keep a command from waiting on what will not answer (a Prefect API
that went away, a thread that never returns): :data:`STOP_GRACE_S` after the
first signal, and :data:`EXIT_DRAIN_S` after the command has its answer, for
Prefect's workers to hand their last logs and events to the API. Past either, the
process exits at once, as a kill would; the cache is crash-safe.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

STOP_GRACE_S = 8.0
EXIT_DRAIN_S = 10.0

_said = threading.Event()
_stopping = threading.Event()


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, as Ctrl-C raises KeyboardInterrupt."""


def line(exc: KeyboardInterrupt) -> int:
    """Say the one line for a stop (unless said already); return the exit status.

    A stop that is not a signal (the Prefect API went away) names its ``reason``
    and ``exit_status``."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and not _said.is_set():
        _said.set()
        print(
            f"takeoff-cache: error: {reason}; the cache holds its last complete build",
            file=sys.stderr,
        )
        return int(getattr(exc, "exit_status", 1))
    signum = signal.SIGTERM if isinstance(exc, Stopped) else signal.SIGINT
    _say(signum)
    return 128 + signum


def _say(signum: int) -> None:
    if _said.is_set():
        return
    _said.set()
    word = "terminated" if signum == signal.SIGTERM else "interrupted"
    print(f"takeoff-cache: {word}; the cache holds its last complete build", file=sys.stderr)
    sys.stderr.flush()


def _end_after_grace(signum: int) -> None:
    _say(signum)
    os._exit(128 + signum)


def _stop(signum: int, frame: object) -> None:
    _stopping.set()
    for name in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(name) is _stop:
            signal.signal(name, signal.SIG_IGN)
    timer = threading.Timer(STOP_GRACE_S, _end_after_grace, (signum,))
    timer.daemon = True
    timer.start()
    raise Stopped if signum == signal.SIGTERM else KeyboardInterrupt


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Within: SIGTERM, and SIGINT unless it is ignored (a background job's), stop the
    command as above. On another thread (an in-process caller) nothing changes; on
    the way out the previous handlers are back, unless a stop began: then further
    signals stay ignored until the process has exited."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {name: signal.getsignal(name) for name in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _stop)
    if previous[signal.SIGINT] is signal.default_int_handler:
        signal.signal(signal.SIGINT, _stop)
    try:
        yield
    finally:
        if not _stopping.is_set():
            for name, handler in previous.items():
                signal.signal(name, handler)


def finish(code: int) -> None:
    """End this process with ``code``, its answer given. Only for a process that is the
    command (not an in-process caller), and only where Prefect was loaded; elsewhere
    this returns and the interpreter exits as usual.

    It exits as the interpreter would (other threads joined, exit handlers run), with
    Prefect's workers given at most :data:`EXIT_DRAIN_S` to hand their last logs and
    events to the API, whatever they wait on. It does not then tear down the thousands
    of modules Prefect loads one by one: that alone cost half a second of every run.
    """
    if "prefect" not in sys.modules:
        return
    deadline = time.monotonic() + EXIT_DRAIN_S

    def bound() -> None:
        time.sleep(EXIT_DRAIN_S)
        _flush()
        os._exit(code)

    threading.Thread(target=bound, name="exit-bound", daemon=True).start()
    _flush()
    here = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not here and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    atexit._run_exitfuncs()
    _flush()
    os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more to say
            stream.flush()
