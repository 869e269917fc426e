"""A one-line progress bar for :func:`takeoff_cache.prepare.download.download_tiles`.

On a terminal the line is redrawn in place at most ten times a second; into a
log (a file, a pipe, CI) a plain line is written at most every five seconds, so
a long download does not flood it. Either way the final state is always drawn
and the line is ended at exit. It shows counts only, never a URL: a tile URL
can carry the API key.
"""

from __future__ import annotations

import sys
from time import monotonic
from typing import TextIO

from takeoff_cache.prepare.download import DownloadProgress

_TTY_INTERVAL_S = 0.1
_LOG_INTERVAL_S = 5.0


class ProgressBar:
    """Draws each :class:`DownloadProgress` it is called with on ``stream``::

    with ProgressBar() as bar:
        download_tiles(corpus, tiles, source, options, progress=bar)

    ``interval_s`` is the least time between two lines (None: 0.1 s on a
    terminal, 5 s otherwise); a state with every tile done is drawn regardless.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        label: str = "tiles",
        width: int = 15,
        interval_s: float | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self.width = width
        self.tty = _isatty(self.stream)
        default = _TTY_INTERVAL_S if self.tty else _LOG_INTERVAL_S
        self.interval_s = default if interval_s is None else interval_s
        self._latest: DownloadProgress | None = None
        self._drawn: DownloadProgress | None = None
        self._drawn_at = 0.0
        self._columns = 0  # the longest line drawn in place, to blank what a shorter one leaves

    def __call__(self, progress: DownloadProgress) -> None:
        self._latest = progress
        now = monotonic()
        if (
            self._drawn is None
            or progress.done >= progress.total
            or now - self._drawn_at >= self.interval_s
        ):
            self._draw(progress, now)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Draw the last state if the throttle held it back, and end the line."""
        if self._latest is not None and self._latest is not self._drawn:
            self._draw(self._latest, monotonic())
        if self.tty and self._drawn is not None:
            self.stream.write("\n")
            self.stream.flush()
        self._latest = self._drawn = None

    def line(self, p: DownloadProgress) -> str:
        """``tiles  1234/2000  61%  [#########......]  512 tiles/s  10.2 MB  3 failed``"""
        share = min(p.done / p.total, 1.0) if p.total > 0 else 1.0
        filled = int(share * self.width)
        text = (
            f"{self.label}  {p.done:>{len(str(p.total))}}/{p.total}  {int(share * 100):3d}%"
            f"  [{'#' * filled}{'.' * (self.width - filled)}]"
            f"  {p.tiles_per_s:.0f} tiles/s  {p.bytes / 1e6:.1f} MB"
        )
        return f"{text}  {p.failed} failed" if p.failed else text

    def _draw(self, progress: DownloadProgress, now: float) -> None:
        text = self.line(progress)
        if self.tty:
            self._columns = max(self._columns, len(text))
            self.stream.write("\r" + text.ljust(self._columns))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn, self._drawn_at = progress, now


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False
