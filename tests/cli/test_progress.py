"""The download's progress bar, on a log stream and on a (fake) terminal."""

from __future__ import annotations

import io
import re

import pytest

from takeoff_cache.cli import progress as progress_module
from takeoff_cache.cli.progress import ProgressBar
from takeoff_cache.prepare.download import DownloadProgress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(progress_module, "monotonic", clock)
    return clock


def states(total: int, step: int = 1) -> list[DownloadProgress]:
    return [
        DownloadProgress(done, total, 0, done * 20_000, done / 500)
        for done in range(step, total + 1, step)
    ]


def test_the_line_shows_counts_rate_bytes_and_failures() -> None:
    state = DownloadProgress(1234, 2000, 3, 10_200_000, 1234 / 512)
    assert ProgressBar(io.StringIO()).line(state) == (
        "tiles  1234/2000   61%  [#########......]  512 tiles/s  10.2 MB  3 failed"
    )
    done = DownloadProgress(7, 2000, 0, 0, 0.0)
    assert ProgressBar(io.StringIO()).line(done) == (
        "tiles     7/2000    0%  [...............]  0 tiles/s  0.0 MB"
    )


def test_a_log_gets_a_line_every_five_seconds_and_the_final_one(clock: Clock) -> None:
    log = io.StringIO()
    with ProgressBar(log) as bar:
        for state in states(2000):
            clock.now += 0.01  # 20 s in all
            bar(state)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")
    assert len(lines) == 5  # at 0, 5, 10 and 15 s, then the last
    assert lines[-1].startswith("tiles  2000/2000  100%  [###############]")
    assert all(
        re.fullmatch(r"tiles +\d+/2000 +\d+%  \[[#.]+\]  \d+ tiles/s  [\d.]+ MB", ln)
        for ln in lines
    )


def test_a_terminal_redraws_in_place_ten_times_a_second(clock: Clock) -> None:
    term = FakeTerminal()
    with ProgressBar(term) as bar:
        for state in states(1000):
            clock.now += 0.001  # 1 s in all
            bar(state)
        assert not term.getvalue().endswith("\n")
    out = term.getvalue()
    draws = out.split("\r")[1:]
    assert 10 <= len(draws) <= 12
    assert draws[-1].rstrip() == "tiles  1000/1000  100%  [###############]  500 tiles/s  20.0 MB"
    assert out.endswith("\n") and out.count("\n") == 1


def test_the_final_state_is_drawn_inside_the_throttle(clock: Clock) -> None:
    term = FakeTerminal()
    with ProgressBar(term) as bar:
        bar(DownloadProgress(1, 2, 0, 10, 0.1))
        bar(DownloadProgress(2, 2, 0, 20, 0.1))  # no time has passed
        assert term.getvalue().split("\r")[-1].startswith("tiles  2/2  100%")


def test_a_stopped_download_shows_where_it_stopped(clock: Clock) -> None:
    log = io.StringIO()
    with pytest.raises(RuntimeError), ProgressBar(log) as bar:
        bar(DownloadProgress(1, 10, 0, 10, 0.1))
        bar(DownloadProgress(4, 10, 2, 40, 0.2))  # held back by the throttle
        raise RuntimeError("the host failed")
    assert log.getvalue().splitlines()[-1].startswith("tiles   4/10   40%")
    assert log.getvalue().splitlines()[-1].endswith("2 failed")


def test_a_shorter_line_blanks_what_the_longer_one_left(clock: Clock) -> None:
    term = FakeTerminal()
    with ProgressBar(term) as bar:
        bar(DownloadProgress(1, 10, 3, 10, 0.001))  # 1000 tiles/s, 3 failed
        clock.now += 1
        bar(DownloadProgress(10, 10, 0, 100, 10.0))
    first, last = term.getvalue().rstrip("\n").split("\r")[1:]
    assert len(last) == len(first) and last.rstrip().endswith("MB")


def test_nothing_is_written_when_it_is_never_called() -> None:
    for stream in (io.StringIO(), FakeTerminal()):
        with ProgressBar(stream):
            pass
        assert stream.getvalue() == ""


def test_it_defaults_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with ProgressBar() as bar:
        bar(DownloadProgress(3, 3, 0, 30, 1.0))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("tiles  3/3  100%")
