"""Reading an HTTP answer's body within a size and a time.

Per-read timeouts alone let a server that sends a byte a second hold a request
for ever, so the caller's deadline is checked as each chunk arrives. httpx's own
decoding inflates each chunk it receives whole (64 KiB of gzip can be 64 MiB),
so bodies are read raw and inflated here at most ``max_bytes`` + 1 at a time: a
gzip bomb costs the limit, not its inflated size.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator

import httpx

# What the clients accept: the encodings read_body inflates.
ACCEPT_ENCODING = "gzip, deflate"


def read_body(response: httpx.Response, max_bytes: int, deadline: float) -> bytes:
    """The streamed ``response``'s decoded body.

    Raises TimeoutError once ``time.monotonic()`` passes ``deadline`` with the
    body incomplete, ValueError (saying why) once more than ``max_bytes`` are
    decoded or the encoding does not decode.
    """
    inflater = _Inflater(response.headers.get("content-encoding", ""))
    parts: list[bytes] = []
    size = 0
    for raw in response.iter_raw():
        for part in inflater.feed(raw, max_bytes - size + 1):
            size += len(part)
            if size > max_bytes:
                raise ValueError(f"larger than {max_bytes:,} bytes")
            parts.append(part)
        if time.monotonic() > deadline:
            raise TimeoutError
    return b"".join(parts)


class _Inflater:
    def __init__(self, encoding: str) -> None:
        self.encoding = encoding.strip().lower()
        self._first = True
        self._d: zlib._Decompress | None = None
        if self.encoding in ("gzip", "x-gzip"):
            self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self.encoding == "deflate":
            self._d = zlib.decompressobj()
        elif self.encoding not in ("", "identity"):
            raise ValueError(f"in an encoding not asked for ({self.encoding})")

    def feed(self, data: bytes, room: int) -> Iterator[bytes]:
        """``data`` inflated, in parts of at most ``room`` bytes together."""
        if self._d is None:
            yield data
            return
        while data and not self._d.eof and room > 0:
            try:
                out = self._d.decompress(data, room)  # room > 0: 0 would mean no limit
            except zlib.error:
                if self.encoding == "deflate" and self._first:
                    # Servers send "deflate" as a raw stream as often as zlib-wrapped.
                    self._d, self._first = zlib.decompressobj(-zlib.MAX_WBITS), False
                    continue
                raise ValueError(f"with a {self.encoding} encoding that does not decode") from None
            self._first = False
            room -= len(out)
            yield out
            data = self._d.unconsumed_tail
