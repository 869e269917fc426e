"""The body checker: a child process that decodes and hashes tile bodies."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from takeoff_cache.prepare.bodycheck import BodyChecker
from takeoff_cache.prepare.download import DownloadOptions, download_tiles, missing_tiles
from takeoff_cache.prepare.tileserver import TileSource, image_format
from takeoff_cache.tiles.corpus import open_corpus
from tests.support.procs import children, command_line
from tests.support.tileserver import tile_bytes, tile_server


def _ready(checker: BodyChecker) -> None:
    deadline = time.monotonic() + 30
    while not checker.ready():
        assert time.monotonic() < deadline, "the checker did not start"
        time.sleep(0.01)


def _encoded(fmt: str, size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (90, 120, 60)).save(out, format=fmt)
    return out.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header gives this size and whose pixels are one row of zeros."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    idat = zlib.compress(bytes(width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_the_child_answers_as_this_process_would() -> None:
    jpeg = tile_bytes(16, 39_000, 22_000)
    bodies = [
        jpeg,
        _encoded("PNG"),
        _encoded("WEBP"),
        jpeg[: len(jpeg) // 2],
        os.urandom(2048),
        b"<html><body>quota exceeded</body></html>",
        b"",
        tile_bytes(16, 39_001, 22_000),
        _encoded("PNG", (1, 1)),
        _encoded("JPEG", (1, 1)),
        _png_claiming(12_000, 12_000),  # refused from its header, never decoded
    ]
    with BodyChecker() as checker:
        _ready(checker)
        answers = checker.check(bodies)
        assert checker.check([]) == []
    assert answers == [(image_format(b), hashlib.sha256(b).hexdigest()) for b in bodies]
    assert [a[0] for a in answers] == [
        *("jpg", "png", "webp", None, None, None, None, "jpg"),
        *(None, None, None),
    ]


def test_a_large_batch_is_answered_in_order() -> None:
    bodies = [tile_bytes(17, 78_000 + i, 44_000) for i in range(700)]  # past one round trip
    with BodyChecker() as checker:
        _ready(checker)
        answers = checker.check(bodies)
    assert answers == [("jpg", hashlib.sha256(b).hexdigest()) for b in bodies]


def test_a_killed_child_leaves_the_checks_to_the_caller() -> None:
    checker = BodyChecker()
    _ready(checker)
    assert checker.pid is not None
    os.kill(checker.pid, signal.SIGKILL)
    assert checker.check([tile_bytes(16, 1, 2)]) is None
    assert checker.check([tile_bytes(16, 1, 2)]) is None and not checker.ready()
    checker.close()


def test_the_child_is_given_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {
        "TAKEOFF_CACHE_TILES_API_KEY": "tile-key-s3cr3t",
        "TAKEOFF_CACHE_FLIGHTS_TOKEN": "flights-t0ken",
        "TAKEOFF_CACHE_KEY_PASSPHRASE": "pass-phr4se",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    with BodyChecker() as checker:
        _ready(checker)
        environ = Path(f"/proc/{checker.pid}/environ").read_bytes()
    assert environ  # read the child's own environment
    for value in secrets.values():
        assert value.encode() not in environ


def _children_named(word: str) -> list[int]:
    return [pid for pid in children(os.getpid()) if word in command_line(pid)]


def test_a_download_goes_on_when_its_checker_is_killed(tmp_path: Path) -> None:
    corpus = tmp_path / "c.mbtiles"
    tiles = [(16, x, y) for x in range(39_000, 39_012) for y in range(22_000, 22_012)]
    options = DownloadOptions(timeout_s=60, checker_from_tiles=0)
    with tile_server(stall_after=60) as server:
        results: list[object] = []
        thread = threading.Thread(
            target=lambda: results.append(
                download_tiles(corpus, tiles, TileSource(server.template), options)
            )
        )
        thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            server.good < 60 or not _children_named("bodycheck")
        ):
            time.sleep(0.02)
        (pid,) = _children_named("bodycheck")
        time.sleep(1.0)  # started, most likely: its pipe then breaks mid-download
        os.kill(pid, signal.SIGKILL)
        server.stall_after = None
        server.release()
        thread.join(120)
    (result,) = results
    assert result.fetched == len(tiles) and result.failed_count == 0  # type: ignore[attr-defined]
    assert missing_tiles(corpus, tiles) == []
    with open_corpus(corpus) as reader:
        assert all(reader.read(*t) == tile_bytes(*t) for t in tiles)
    assert _children_named("bodycheck") == []


def test_no_child_to_be_had_leaves_the_checks_to_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.executable", "/nonexistent/python")
    with BodyChecker() as checker:
        assert checker.pid is None and not checker.ready()
        assert checker.check([tile_bytes(16, 1, 2)]) is None
