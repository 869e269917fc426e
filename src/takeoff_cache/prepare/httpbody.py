"""Reading an HTTP answer within a size and a time, and socket waits a stop ends.

Per-read timeouts alone let a server that sends a byte a second hold a request
for ever, so the caller's deadline is checked as each chunk arrives. httpx's own
decoding inflates each chunk it receives whole (64 KiB of gzip can be 64 MiB),
so bodies are read raw and inflated here at most ``max_bytes`` + 1 at a time: a
gzip bomb costs the limit, not its inflated size. And the deadline must hold
before the body too: :class:`SocketWatch` ends every socket wait (connect, the
status line, headers) at the attempt's deadline, and at the run's stop within
:data:`POLL_S`.
"""

from __future__ import annotations

import os
import re
import ssl
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx

from takeoff_cache import USER_AGENT
from takeoff_cache.core.env import CONTACT, USER_AGENT_VAR
from takeoff_cache.errors import InvalidRequestError

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


# ------------------------------------------------------------------ waits on sockets

# The longest one socket wait lasts before the stop and the attempt's deadline are
# looked at again: how late a worker notices either.
POLL_S = 0.25


class AttemptStopped(Exception):
    """The run was stopped while this attempt waited on its socket."""


class AttemptOverdue(Exception):
    """The attempt's deadline passed while it waited on its socket (connect, the
    status line, headers or body alike)."""


class SocketWatch:
    """Cuts every socket wait of a client short: at ``stop``, and at the deadline of
    the attempt the waiting thread has open (:meth:`attempt`).

    httpx's timeouts apply to each read alone, so a server that accepts and never
    answers holds a read for the whole timeout, and one that sends a header byte a
    second holds a request for ever. Installed with :meth:`install`, reads wait at
    most :data:`POLL_S` at a time and check both in between; the per-read timeout
    still applies to their sum.
    """

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self._local = threading.local()

    @contextmanager
    def attempt(self, deadline: float) -> Iterator[None]:
        """Socket waits of this thread end by ``deadline`` (``time.monotonic()``)."""
        self._local.deadline = deadline
        try:
            yield
        finally:
            self._local.deadline = None

    def install(self, client: httpx.Client) -> None:
        """Route the sockets of ``client`` (and its proxies') through this watch."""
        for transport in (client._transport, *client._mounts.values()):
            pool = getattr(transport, "_pool", None)
            backend = getattr(pool, "_network_backend", None)
            if backend is None:  # an httpx without them: refuse to run unwatched
                raise RuntimeError("httpx transport has no network backend to watch")
            pool._network_backend = _WatchedBackend(backend, self)  # type: ignore[union-attr]

    def remaining(self, timeout: float | None) -> float | None:
        """``timeout`` cut to what is left of this thread's attempt; raises once none is."""
        self.check()
        deadline: float | None = getattr(self._local, "deadline", None)
        if deadline is None:
            return timeout
        left = deadline - time.monotonic()
        return left if timeout is None else min(timeout, left)

    def check(self) -> None:
        if self.stop.is_set():
            raise AttemptStopped
        deadline = getattr(self._local, "deadline", None)
        if deadline is not None and time.monotonic() >= deadline:
            raise AttemptOverdue

    def read(self, stream: httpcore.NetworkStream, max_bytes: int, timeout: float | None) -> bytes:
        waited = 0.0
        while True:
            step = self.remaining(POLL_S) or 0.0  # raises once stopped or overdue
            if timeout is not None:
                if waited >= timeout:
                    raise httpcore.ReadTimeout(f"no data for {timeout:g} s")
                step = min(step, timeout - waited)
            step = max(step, 0.001)
            try:
                return stream.read(max_bytes, step)
            except httpcore.ReadTimeout:
                waited += step  # nothing was read: the next wait loses nothing


class _WatchedStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, watch: SocketWatch) -> None:
        self._inner = inner
        self._watch = watch

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._watch.read(self._inner, max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # Not sliced: a timed-out partial send cannot be resumed. A request is small.
        self._inner.write(buffer, self._watch.remaining(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, self._watch.remaining(timeout))
        return _WatchedStream(inner, self._watch)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _WatchedBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend, watch: SocketWatch) -> None:
        self._inner = inner
        self._watch = watch

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = self._watch.remaining(timeout)
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _WatchedStream(stream, self._watch)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = self._watch.remaining(timeout)
        stream = self._inner.connect_unix_socket(path, timeout, socket_options)
        return _WatchedStream(stream, self._watch)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


# ------------------------------------------------------------------ who is asking

# Printable ASCII only: a header value cannot carry a line break or a control byte.
_HEADER_TEXT = re.compile(r"[\x20-\x7e]{1,256}")


def user_agent() -> str:
    """The User-Agent sent to tile servers and the flights API.

    ``takeoff-cache/<version>``, followed by ``(+CONTACT)`` when
    ``TAKEOFF_CACHE_CONTACT`` names one (tile usage policies ask for a way to
    reach whoever is downloading); ``TAKEOFF_CACHE_USER_AGENT`` replaces the whole
    value. A value that cannot be a header is an input error naming its variable.
    """
    for name in (USER_AGENT_VAR, CONTACT):
        value = os.environ.get(name)
        if value is not None and not _HEADER_TEXT.fullmatch(value.strip()):
            raise InvalidRequestError(
                f"{name}: not usable in a User-Agent header (1 to 256 printable ASCII"
                " characters, no line breaks)"
            )
    whole = (os.environ.get(USER_AGENT_VAR) or "").strip()
    if whole:
        return whole
    contact = (os.environ.get(CONTACT) or "").strip()
    return f"{USER_AGENT} (+{contact})" if contact else USER_AGENT
