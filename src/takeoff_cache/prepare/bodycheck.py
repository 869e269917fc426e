"""Checking downloaded tile bodies in a process of their own.

Every body is decoded and hashed before it is stored. Both let go of the GIL,
and each time the thread that did them takes it back it waits its turn behind
the request threads: done in the download's own process, those waits, not the
work, made the checks its slowest part. A :class:`BodyChecker` hands a whole
batch of bodies to a child process in one write and reads back, in one read,
each body's format (:func:`takeoff_cache.prepare.tileserver.image_format`, the same
check) and SHA-256.

The child (``python -m takeoff_cache.prepare.bodycheck``) reads batches on stdin (a
count, then each body after its length) and answers each batch in one write,
33 bytes a body: a format code, then the digest. It exits
when its stdin closes, so a killed download takes it along. If it dies or does
not answer, :meth:`BodyChecker.check` returns None and the caller checks in
its own process; nothing is lost but time.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from takeoff_cache.core.env import SECRETS

_READY = b"R"
_FORMATS = ("", "jpg", "png", "webp")  # code 0: not an image
_ANSWER = 33  # one format code, then the 32-byte SHA-256
_CHUNK = 256  # bodies a round trip: bounds the frame built here and the wait for its answer
_ANSWER_TIMEOUT_S = 20.0  # a round trip's bodies take well under a second

Checked = tuple[str | None, str]  # (format or None, SHA-256 hex)


class BodyChecker:
    """A child process that checks and hashes bodies; see the module docstring."""

    def __init__(self) -> None:
        package_parent = str(Path(__file__).resolve().parents[1])
        # The child needs none of the run's secrets: it is not given them.
        env = {k: v for k, v in os.environ.items() if k not in SECRETS}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
        # numpy (simplejpeg's) would start a BLAS thread per core that nothing here uses.
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self._ready = False
        self._proc: subprocess.Popen[bytes] | None = None
        # No process to be had (out of them, or of memory): the caller checks.
        with contextlib.suppress(OSError):
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "takeoff_cache.prepare.bodycheck"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
                bufsize=0,
            )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def ready(self) -> bool:
        """Whether the child has started (it imports the decoders first); never waits."""
        if self._ready or self._proc is None:
            return self._ready
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        if select.select([fd], [], [], 0)[0]:
            if os.read(fd, 1) == _READY:
                self._ready = True
            else:
                self.close()  # it died on start
        return self._ready

    def check(self, bodies: Sequence[bytes]) -> list[Checked] | None:
        """Each body's format and SHA-256, in order; None if the child is gone."""
        if not self.ready():
            return None
        out: list[Checked] = []
        try:
            for i in range(0, len(bodies), _CHUNK):
                out.extend(self._round_trip(bodies[i : i + _CHUNK]))
        except (OSError, ValueError):
            self.close()
            return None
        return out

    def _round_trip(self, bodies: Sequence[bytes]) -> list[Checked]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        frames = len(bodies).to_bytes(4, "big") + b"".join(
            len(b).to_bytes(4, "big") + b for b in bodies
        )
        view = memoryview(frames)
        while view:
            view = view[os.write(proc.stdin.fileno(), view) :]
        answer = _read_exactly(proc.stdout.fileno(), _ANSWER * len(bodies))
        checked: list[Checked] = []
        for i in range(len(bodies)):
            code = answer[i * _ANSWER]
            if code >= len(_FORMATS):
                raise ValueError(f"format code {code}")
            digest = answer[i * _ANSWER + 1 : (i + 1) * _ANSWER]
            checked.append((_FORMATS[code] or None, digest.hex()))
        return checked

    def close(self) -> None:
        """End the child (its stdin closes, so it exits) and reap it."""
        proc, self._proc, self._ready = self._proc, None, False
        if proc is None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def __enter__(self) -> BodyChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_exactly(fd: int, n: int) -> bytes:
    parts: list[bytes] = []
    left = n
    while left:
        if not select.select([fd], [], [], _ANSWER_TIMEOUT_S)[0]:
            raise OSError("no answer")
        part = os.read(fd, left)
        if not part:
            raise OSError("the checker exited")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _serve(inp: BinaryIO, out: BinaryIO) -> None:
    import hashlib

    from takeoff_cache.prepare.tileserver import image_format

    codes = {fmt: i for i, fmt in enumerate(_FORMATS) if fmt}
    out.write(_READY)
    out.flush()
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        answers = []
        for _ in range(int.from_bytes(head, "big")):
            data = inp.read(int.from_bytes(inp.read(4), "big"))
            code = codes.get(image_format(data) or "", 0)
            answers.append(bytes([code]) + hashlib.sha256(data).digest())
        out.write(b"".join(answers))  # one write a batch: one wake-up of the reader
        out.flush()


if __name__ == "__main__":
    _serve(sys.stdin.buffer, sys.stdout.buffer)
