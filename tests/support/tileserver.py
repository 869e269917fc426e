"""A real XYZ tile server on 127.0.0.1 that serves demo JPEG tiles and misbehaves on demand.

Every tile is one of a few rendered demo tiles with a JPEG comment naming
``z/x/y`` and its version, so each tile's bytes are its own (a row flipped on the
way into MBTiles shows) without rendering thousands of tiles. ``faults`` maps a
tile ``"z/x/y"`` (or ``"*"`` for every tile) to the answers to give, one per
request, before answering normally:

- ``"429:S"`` / ``"503:S"``: that status with ``Retry-After: S`` (seconds, or an
  HTTP-date when S is ``date+N``);
- ``"500"``, ``"404"``, ``"403"``, ...: that status, an empty body;
- ``"slow"``: the tile, after ``slow_s`` seconds (past the client's timeout);
- ``"html"``: a 200 with an HTML error page; ``"garbage"``: a 200 with random bytes
  labelled image/jpeg; ``"truncated"``: the first half of the JPEG;
- ``"reset"``: the connection closed without an answer;
- ``"drip"``: the tile, one byte every ``drip_s`` seconds; ``"huge"``: a 200 of
  8 MiB labelled image/jpeg; ``"gzipbomb"``: a 256 KiB gzip body that inflates to
  256 MiB; ``"tiny"``: a valid 1x1 JPEG;
- ``"silent"``: the request read, then no answer at all until :meth:`release`;
- ``"headerdrip"``: the status line and headers, one byte every ``drip_s`` seconds;
- ``"loop"``: a 302 back to the same URL, for ever.

``stall_after = N`` holds every request after the N-th good tile open until
:meth:`release`. ETag / If-None-Match and Last-Modified / If-Modified-Since are
honoured with 304s.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import simplejpeg

from takeoff_cache.demo.synthetic import encode_jpeg, render_tile

_POOL = 6
_MODIFIED = "Mon, 01 Jun 2026 00:00:00 GMT"


@cache
def _base_tile(i: int) -> bytes:
    return encode_jpeg(render_tile(16, 39_000 + i, 22_000, 0))


def tile_bytes(z: int, x: int, y: int, version: int = 0) -> bytes:
    """The served bytes of tile ``z/x/y``: a real JPEG with a comment naming it."""
    base = _base_tile((x * 7 + y * 3 + z) % _POOL)
    text = f"tile {z}/{x}/{y} v{version}".encode()
    comment = b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text
    return base[:2] + comment + base[2:]


@cache
def gzip_bomb() -> bytes:
    """256 MiB of zeros, gzipped (about 256 KiB)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    return b"".join(z.compress(block) for _ in range(256)) + z.flush()


@cache
def tiny_jpeg() -> bytes:
    return simplejpeg.encode_jpeg(np.zeros((1, 1, 3), np.uint8))


@dataclass
class Seen:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    status: int
    at: float


@dataclass
class TileServer:
    port: int = 0
    faults: dict[str, list[str]] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    slow_s: float = 1.0
    drip_s: float = 0.05
    stall_after: int | None = None
    requests: list[Seen] = field(default_factory=list)
    good: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _released: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def template(self) -> str:
        return self.url + "/tiles/{z}/{x}/{y}.jpg"

    def release(self) -> None:
        self._released.set()

    def tile_requests(self) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith("/tiles/")]

    def served_zxy(self, status: int = 200) -> list[str]:
        return [
            r.path[len("/tiles/") : -len(".jpg")]
            for r in self.tile_requests()
            if r.status == status
        ]

    def _next_fault(self, zxy: str) -> str | None:
        with self._lock:
            for key in (zxy, "*"):
                queue = self.faults.get(key)
                if queue:
                    return queue.pop(0) if key != "*" or len(queue) > 1 else queue[0]
        return None


def _handler(server: TileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body are two writes: with Nagle's algorithm and delayed ACKs
        # each keep-alive answer would wait 40 ms.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(
            self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
        ) -> None:
            url = urlsplit(self.path)
            seen = Seen(
                url.path, parse_qs(url.query), dict(self.headers.items()), status, time.monotonic()
            )
            with server._lock:
                server.requests.append(seen)
            try:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _drip(self, body: bytes, every_s: float) -> None:
            self._send_head(200, len(body))
            try:
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(every_s)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _send_head(self, status: int, length: int) -> None:
            seen = Seen(self.path, {}, dict(self.headers.items()), status, time.monotonic())
            with server._lock:
                server.requests.append(seen)
            self.send_response(status)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(length))
            self.end_headers()

        def do_GET(self) -> None:
            with server._lock:
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                self._get()
            finally:
                with server._lock:
                    server.in_flight -= 1

        def _get(self) -> None:
            path = urlsplit(self.path).path
            if not path.startswith("/tiles/") or not path.endswith(".jpg"):
                self._send(404)
                return
            zxy = path[len("/tiles/") : -len(".jpg")]
            try:
                z, x, y = (int(v) for v in zxy.split("/"))
            except ValueError:
                self._send(400)
                return
            fault = server._next_fault(zxy)
            version = server.versions.get(zxy, 0)
            body = tile_bytes(z, x, y, version)
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            ok_headers = {"Content-Type": "image/jpeg", "ETag": etag, "Last-Modified": _MODIFIED}
            if fault is None or fault == "slow":
                if fault == "slow":
                    time.sleep(server.slow_s)
                if self.headers.get("If-None-Match") == etag:
                    self._send(304, b"", {"ETag": etag})
                    return
                with server._lock:
                    # Checked and counted at once: exactly stall_after tiles get through.
                    stall = server.stall_after is not None and server.good >= server.stall_after
                    server.good += 0 if stall else 1
                if stall:
                    server._released.wait(120)
                    self.close_connection = True
                    return
                self._send(200, body, ok_headers)
            elif fault == "html":
                page = b"<html><body>Service temporarily unavailable</body></html>"
                self._send(200, page, {"Content-Type": "text/html; charset=utf-8"})
            elif fault == "garbage":
                self._send(200, os.urandom(2048), {"Content-Type": "image/jpeg"})
            elif fault == "truncated":
                self._send(200, body[: len(body) // 2], {"Content-Type": "image/jpeg"})
            elif fault == "drip":
                self._drip(body, server.drip_s)
            elif fault == "huge":
                self._send(200, os.urandom(8 << 20), {"Content-Type": "image/jpeg"})
            elif fault == "gzipbomb":
                headers = {"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}
                self._send(200, gzip_bomb(), headers)
            elif fault == "tiny":
                self._send(200, tiny_jpeg(), {"Content-Type": "image/jpeg"})
            elif fault == "silent":
                server._released.wait(120)
                self.close_connection = True
            elif fault == "headerdrip":
                head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n" + b"X-Pad: " + b"." * 4000
                try:
                    for i in range(len(head)):
                        if server._released.is_set():
                            break
                        self.wfile.write(head[i : i + 1])
                        self.wfile.flush()
                        time.sleep(server.drip_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True
            elif fault == "loop":
                self._send(302, b"", {"Location": self.path})
            elif fault == "reset":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            elif ":" in fault:
                status, after = fault.split(":", 1)
                if after.startswith("date+"):
                    after = email.utils.formatdate(time.time() + float(after[5:]), usegmt=True)
                self._send(int(status), b"", {"Retry-After": after})
            else:
                self._send(int(fault))

    return Handler


@contextmanager
def tile_server(**kwargs: object) -> Iterator[TileServer]:
    state = TileServer(**kwargs)  # type: ignore[arg-type]
    if any("gzipbomb" in answers for answers in state.faults.values()):
        gzip_bomb()  # seconds of compression: not inside a request the client times
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release()
        httpd.shutdown()
        httpd.server_close()
