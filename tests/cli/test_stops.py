"""How a command stops (cli/stops.py), in real processes sent real signals.

Each program below stands for a command at a point where it could wait for
ever: unwinding that never ends, or a worker thread that holds the exit (as
Prefect's do while their API is gone). The bounds end them all the same.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from takeoff_cache.cli.stops import EXIT_DRAIN_S, STOP_GRACE_S

# Says "ready", then waits in the main thread; on the stop it unwinds, then
# (with "hang") waits again, where no signal can raise any more.
PROGRAM = """
import sys, time
from takeoff_cache.cli import stops
hang = sys.argv[1] == "hang"
try:
    with stops.handled():
        print("ready", flush=True)
        time.sleep(60)
except KeyboardInterrupt as exc:
    if hang:
        time.sleep(60)
    sys.exit(stops.line(exc))
"""

# Answers at once, but a thread that never ends holds the interpreter's exit.
HELD_EXIT = """
import threading, time
import prefect  # noqa: F401  (the bound is for processes that loaded Prefect)
from takeoff_cache.cli import stops
threading.Thread(target=time.sleep, args=(600,)).start()
stops.finish(3)
"""


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PROGRAM, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _lines(err: str) -> list[str]:
    return err.strip().splitlines()


def test_sigint_and_sigterm_give_one_line_and_their_status() -> None:
    for sig, code, word in (
        (signal.SIGINT, 130, "interrupted"),
        (signal.SIGTERM, 143, "terminated"),
    ):
        proc = _start("unwind")
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == code, err
        assert len(_lines(err)) == 1 and word in err


def test_a_second_signal_does_not_cut_the_unwinding_short() -> None:
    proc = _start("hang")
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # ignored: no second KeyboardInterrupt
    os.killpg(proc.pid, signal.SIGTERM)  # ignored too
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    # Ended by the grace bound, with the first signal's status and one line.
    assert proc.returncode == 130, err
    assert _lines(err) == ["takeoff-cache: interrupted; the cache holds its last complete build"]
    assert time.monotonic() - sent < STOP_GRACE_S + 15


def test_a_stop_that_never_finishes_unwinding_ends_after_the_grace() -> None:
    proc = _start("hang")
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert len(_lines(err)) == 1 and "terminated" in err
    assert time.monotonic() - sent < STOP_GRACE_S + 15


def test_a_command_with_its_answer_exits_though_a_thread_holds_the_exit() -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", HELD_EXIT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - started < EXIT_DRAIN_S + 60  # imports included


# Ends as the interpreter would: output flushed, other threads joined, exit handlers run.
CLEAN_EXIT = """
import atexit, sys, threading, time
import prefect  # noqa: F401
from takeoff_cache.cli import stops
atexit.register(lambda: print("handler ran", file=sys.stderr))
threading.Thread(target=lambda: (time.sleep(0.5), print("thread done"))).start()
print("answer", end="")
stops.finish(5)
print("never")
"""


def test_a_command_that_ends_promptly_still_ends_as_the_interpreter_would() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CLEAN_EXIT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == "answerthread done\n"
    assert proc.stderr == "handler ran\n"
