"""How long a tile server that does not answer can hold a download.

    python benchmarks/download_stop.py [--deadline 2]

Against a real server on 127.0.0.1 that accepts and never answers ("silent"),
and one that sends its status line and headers a byte every 0.5 s
("headerdrip", which per-read timeouts never end), for each:

- attempt: seconds for a job of 8 tiles, one attempt each, to end with every
  tile failed, with a per-read timeout of 60 s and an attempt deadline of
  ``--deadline`` s (target: two deadlines, as 4 workers take 8 tiles in two
  rounds; never the read timeout);
- stop: seconds from a signal in the main thread (as SIGTERM reaches
  ``prepare``) to download_tiles returning and its worker threads being gone,
  with a deadline of 60 s (target: about a second).

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.tileserver import tile_server

from takeoff_cache.prepare.download import DownloadOptions, download_tiles
from takeoff_cache.prepare.tileserver import TileSource

TILES = [(16, 39_000 + i, 22_000) for i in range(8)]


class _Stop(BaseException):
    pass


_rang: list[float] = []


def _ring(signum: int, frame: object) -> None:
    _rang.append(time.monotonic())
    raise _Stop


def attempt_s(fault: str, deadline: float) -> float:
    options = DownloadOptions(
        timeout_s=60.0, deadline_s=deadline, max_retries=0, breaker_failures=100, failing_share=1.0
    )
    with (
        tile_server(faults={"*": [fault]}, drip_s=0.5) as server,
        tempfile.TemporaryDirectory() as d,
    ):
        started = time.monotonic()
        result = download_tiles(Path(d) / "c.mbtiles", TILES, TileSource(server.template), options)
        seconds = time.monotonic() - started
    assert result.failed_count == len(TILES), result
    return seconds


def stop_s(fault: str) -> float:
    options = DownloadOptions(timeout_s=60.0, deadline_s=60.0, breaker_failures=100)
    previous = signal.signal(signal.SIGALRM, _ring)
    try:
        with (
            tile_server(faults={"*": [fault]}, drip_s=0.5) as server,
            tempfile.TemporaryDirectory() as d,
        ):
            signal.setitimer(signal.ITIMER_REAL, 1.0)
            with contextlib.suppress(_Stop):
                download_tiles(Path(d) / "c.mbtiles", TILES, TileSource(server.template), options)
            for thread in threading.enumerate():
                if thread.name.startswith("tiles-"):
                    thread.join()
            return time.monotonic() - _rang.pop()  # from the signal to every worker gone
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deadline", type=float, default=2.0)
    args = parser.parse_args()
    figures: dict[str, float] = {"deadline_s": args.deadline}
    for fault in ("silent", "headerdrip"):
        figures[f"{fault}_attempt_s"] = round(attempt_s(fault, args.deadline), 2)
        figures[f"{fault}_stop_s"] = round(stop_s(fault), 2)
        print(
            f"{fault:>10}: 8 tiles failed in {figures[f'{fault}_attempt_s']:.2f} s"
            f" (deadline {args.deadline:g} s, read timeout 60 s);"
            f" stopped {figures[f'{fault}_stop_s']:.2f} s after a signal"
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
