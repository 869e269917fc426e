"""A one-line progress bar for the tile download, on stderr.

It shows counts only (a URL can carry the tile API key). On a terminal the
line is redrawn in place, at most ten times a second; elsewhere (a log file, a
CI job) a plain line is written at most every five seconds, and always the last.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from .download import DownloadProgress

_TTY_EVERY_S = 0.1
_LOG_EVERY_S = 5.0
_WIDTH = 24


class ProgressBar:
    def __init__(self, stream: TextIO | None = None, label: str = "tiles") -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._label = label
        isatty = getattr(self._stream, "isatty", None)
        self._tty = bool(isatty and isatty())
        self._every = _TTY_EVERY_S if self._tty else _LOG_EVERY_S
        self._drawn_at: float | None = None
        self._last: DownloadProgress | None = None
        self._shown: DownloadProgress | None = None

    def __call__(self, state: DownloadProgress) -> None:
        self._last = state
        now = time.monotonic()
        if (
            state.done >= state.total
            or self._drawn_at is None
            or now - self._drawn_at >= self._every
        ):
            self._draw(state)
            self._drawn_at = now

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._last is not None and self._last is not self._shown:
            self._draw(self._last)
        if self._tty and self._shown is not None:
            self._stream.write("\n")
            self._stream.flush()

    def _draw(self, state: DownloadProgress) -> None:
        self._shown = state
        line = render(state, self._label)
        self._stream.write(f"\r{line}\033[K" if self._tty else f"{line}\n")
        self._stream.flush()


def render(state: DownloadProgress, label: str = "tiles") -> str:
    share = state.done / state.total if state.total else 1.0
    filled = round(share * _WIDTH)
    bar = "#" * filled + "." * (_WIDTH - filled)
    width = len(str(state.total))
    line = (
        f"{label} {state.done:>{width}}/{state.total} {share:4.0%} [{bar}]"
        f" {state.tiles_per_s:.0f} tiles/s {state.bytes / 1e6:.1f} MB"
    )
    return line + (f" {state.failed} failed" if state.failed else "")
