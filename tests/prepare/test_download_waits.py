"""Every wait of a tile download has a deadline, and a stop ends it within a second.

Real servers on 127.0.0.1 that accept and never answer, or drip their headers
a byte at a time: per-read timeouts alone would wait for ever on the second.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from takeoff_cache.errors import InvalidRequestError
from takeoff_cache.prepare.download import DownloadOptions, download_tiles
from takeoff_cache.prepare.tileserver import TileSource
from tests.support.tileserver import tile_server

TILES = [(16, 39_000 + i, 22_000) for i in range(4)]
# A per-read timeout far longer than the attempt's deadline: only the deadline can end it.
OPTIONS = DownloadOptions(
    timeout_s=60.0,
    deadline_s=0.6,
    max_retries=1,
    backoff_base_s=0.01,
    backoff_max_s=0.02,
    breaker_failures=100,
    failing_share=1.0,
)
BOUND_S = 15.0  # against a hang, not a timing


@pytest.mark.parametrize("fault", ["silent", "headerdrip"])
def test_an_attempt_without_a_whole_answer_fails_at_its_deadline(
    tmp_path: Path, fault: str
) -> None:
    with tile_server(faults={"*": [fault]}, drip_s=0.05) as server:
        started = time.monotonic()
        result = download_tiles(tmp_path / "c.mbtiles", TILES, TileSource(server.template), OPTIONS)
        seconds = time.monotonic() - started
        assert server.max_in_flight >= OPTIONS.concurrency  # every worker was kept waiting
    assert result.failed_count == len(TILES) and result.fetched == 0
    assert result.failed[0].reason == "no complete answer within 0.6 s after 2 attempts"
    # Two attempts of 0.6 s each, four tiles side by side: about 1.3 s, never the 60 s.
    assert seconds < BOUND_S


class _Stop(BaseException):
    pass


@pytest.fixture
def alarm() -> Iterator[None]:
    def ring(signum: int, frame: object) -> None:
        raise _Stop

    previous = signal.signal(signal.SIGALRM, ring)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("fault", ["silent", "headerdrip"])
@pytest.mark.usefixtures("alarm")
def test_a_signal_ends_a_download_whose_workers_wait_on_sockets(tmp_path: Path, fault: str) -> None:
    """A signal in the main thread, as SIGTERM is turned into an exception: the
    download unwinds at once, and its workers, blocked in reads with 60 s
    timeouts and deadlines, leave within a second."""
    options = replace(OPTIONS, deadline_s=60.0)
    corpus = tmp_path / "c.mbtiles"
    with tile_server(faults={"*": [fault]}, drip_s=0.5) as server:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        with pytest.raises(_Stop):
            download_tiles(corpus, TILES, TileSource(server.template), options)
        stopped = time.monotonic()
        assert server.in_flight == OPTIONS.concurrency  # still held by the server
        workers = [t for t in threading.enumerate() if t.name.startswith("tiles-")]
        for thread in workers:
            thread.join(BOUND_S)
        left = time.monotonic() - stopped
    assert not [t for t in workers if t.is_alive()]
    assert left < BOUND_S
    assert corpus.exists()  # a corpus every reader opens, with no tile in it


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, -1.0])
@pytest.mark.parametrize("name", ["timeout_s", "deadline_s", "backoff_base_s", "max_wait_s"])
def test_timeouts_and_deadlines_are_finite_and_positive(name: str, value: float) -> None:
    with pytest.raises(InvalidRequestError, match=f"{name} must be a finite number"):
        DownloadOptions(**{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_max_age_is_a_finite_number_of_days(value: float) -> None:
    with pytest.raises(InvalidRequestError, match="--max-age must be a finite number"):
        DownloadOptions(max_age_days=value)
