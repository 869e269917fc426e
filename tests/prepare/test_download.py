"""Tile downloads against a real HTTP tile server on 127.0.0.1 (tests/support/tileserver.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

import takeoff_cache
from takeoff_cache.core.tilemath import tile_bounds, tms_row
from takeoff_cache.demo.synthetic import write_corpus
from takeoff_cache.errors import (
    EXIT_DOWNLOAD,
    HostFailingError,
    InvalidRequestError,
    TooManyTilesError,
)
from takeoff_cache.prepare.download import (
    DownloadOptions,
    DownloadProgress,
    download_tiles,
    estimate_download,
    missing_tiles,
)
from takeoff_cache.prepare.tileserver import TileSource, image_format, quadkey, retry_after_s
from takeoff_cache.tiles.corpus import open_corpus, select_tiles
from takeoff_cache.tiles.mbtiles import MBTilesWriter
from tests.support.procs import children, command_line
from tests.support.tileserver import tile_bytes, tile_server

# Most tests look at each failed tile: a job that mostly fails still returns here.
FAST = DownloadOptions(backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=5.0, failing_share=1.0)
SECRET = "k3y-Zq8vX1-never-show-me"


def block(
    z: int = 16, x0: int = 39_000, y0: int = 22_000, n: int = 4
) -> list[tuple[int, int, int]]:
    return [(z, x, y) for x in range(x0, x0 + n) for y in range(y0, y0 + n)]


def meta(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT name, value FROM metadata").fetchall())


# --------------------------------------------------------------------------- templates


def test_template_placeholders_expand_to_the_tile() -> None:
    source = TileSource("https://{s}.t.example/{z}/{x}/{y}/{-y}/{q}.png", subdomains=("a", "b"))
    assert source.url(3, 3, 5) == "https://a.t.example/3/3/5/2/213.png"
    assert source.url(3, 3, 4) == "https://b.t.example/3/3/4/3/211.png"
    assert source.host(3, 3, 4) == "b.t.example"
    assert quadkey(0, 0, 0) == "" and quadkey(1, 1, 1) == "3"


@pytest.mark.parametrize(
    "template",
    ["ftp://x/{z}/{x}/{y}", "https://t.example/{z}/{x}", "https://t.example/{z}/{x}/{y}/{key}"],
)
def test_bad_templates_are_refused(template: str) -> None:
    with pytest.raises(InvalidRequestError, match="tiles URL"):
        TileSource(template)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_s("120") == 120.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0) == 30.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412600.0) == 0.0
    assert retry_after_s("soon") is None and retry_after_s(None) is None


def test_only_whole_images_pass_the_body_check() -> None:
    body = tile_bytes(16, 1, 2)
    assert image_format(body) == "jpg"
    assert image_format(body[: len(body) // 2]) is None
    assert image_format(b"<html><body>quota exceeded</body></html>") is None


# --------------------------------------------------------------------------- the happy path


def test_download_writes_an_mbtiles_the_corpus_reader_reads(tmp_path: Path) -> None:
    corpus = tmp_path / "tiles.mbtiles"
    tiles = block(16, n=3) + block(17, 78_000, 44_000, n=3)
    with tile_server() as server:
        source = TileSource(server.template, attribution="© Test Imagery", name="test")
        result = download_tiles(corpus, tiles, source, FAST)
        agents = {r.headers.get("User-Agent") for r in server.tile_requests()}
    assert (result.fetched, result.kept, result.failed_count) == (18, 0, 0)
    assert result.bytes == sum(len(tile_bytes(*t)) for t in tiles)
    assert agents == {f"takeoff-cache/{takeoff_cache.__version__}"}
    with open_corpus(corpus) as reader:
        for z, x, y in tiles:
            assert reader.read(z, x, y) == tile_bytes(z, x, y)
    m = meta(corpus)
    assert (m["name"], m["format"], m["attribution"]) == ("test", "jpg", "© Test Imagery")
    assert (m["minzoom"], m["maxzoom"]) == ("16", "17")
    west, south, east, north = (float(v) for v in m["bounds"].split(","))
    assert (south, west) == pytest.approx(tile_bounds(16, 39_000, 22_002)[:2])
    assert (north, east) == pytest.approx(tile_bounds(16, 39_002, 22_000)[2:])
    # Rows are TMS in the file, and each tile's SHA-256 is recorded.
    with sqlite3.connect(corpus) as db:
        row = db.execute(
            "SELECT t.tile_row, f.sha256 FROM tiles t JOIN tile_fetch f USING"
            " (zoom_level, tile_column, tile_row) WHERE zoom_level = 16 AND tile_column = 39000"
            " ORDER BY tile_row DESC LIMIT 1"
        ).fetchone()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert row[0] == tms_row(16, 22_000)
    assert row[1] == hashlib.sha256(tile_bytes(16, 39_000, 22_000)).hexdigest()
    bbox = tile_bounds(16, 39_000, 22_002)[:2] + tile_bounds(16, 39_002, 22_000)[2:]
    assert len(select_tiles(corpus, bbox, (16,)).tiles) == 9


def test_progress_counts_every_tile_up_to_the_total(tmp_path: Path) -> None:
    corpus = tmp_path / "c.mbtiles"
    tiles = block(n=6)
    faults = {"16/39000/22000": ["404"], "16/39001/22001": ["500"]}  # failed; retried
    with tile_server(faults=faults) as server:
        calls: list[DownloadProgress] = []
        download_tiles(corpus, tiles, TileSource(server.template), FAST, progress=calls.append)
        again: list[DownloadProgress] = []
        download_tiles(corpus, tiles[1:], TileSource(server.template), FAST, progress=again.append)
    assert calls and all(c.total == len(tiles) for c in calls)
    done = [c.done for c in calls]
    assert done == sorted(set(done)) and done[-1] == len(tiles)
    seconds = [c.seconds for c in calls]
    assert seconds == sorted(seconds)
    assert calls[-1].failed == 1
    assert calls[-1].bytes == sum(len(tile_bytes(*t)) for t in tiles[1:])
    assert again == []  # nothing left to fetch: never called


def test_tiles_already_present_are_not_fetched_again(tmp_path: Path) -> None:
    corpus = tmp_path / "tiles.mbtiles"
    with tile_server() as server:
        source = TileSource(server.template)
        download_tiles(corpus, block(n=2), source, FAST)
        before = len(server.tile_requests())
        result = download_tiles(corpus, block(n=3), source, FAST)
        fetched = server.served_zxy()[before:]
    assert (result.fetched, result.kept) == (5, 4)
    assert sorted(fetched) == sorted(
        f"{z}/{x}/{y}" for z, x, y in set(block(n=3)) - set(block(n=2))
    )
    assert missing_tiles(corpus, block(n=4)) == sorted(set(block(n=4)) - set(block(n=3)))


def test_concurrency_per_host_is_bounded(tmp_path: Path) -> None:
    with tile_server(faults={"*": ["slow"]}, slow_s=0.05) as server:
        options = DownloadOptions(concurrency=3, timeout_s=5.0)
        download_tiles(tmp_path / "c.mbtiles", block(n=5), TileSource(server.template), options)
    assert server.max_in_flight <= 3


def test_tiles_go_into_a_corpus_made_elsewhere(tmp_path: Path) -> None:
    corpus = tmp_path / "demo.mbtiles"
    layout = write_corpus(corpus, n_tiles=20)
    name = meta(corpus)["name"]
    with tile_server() as server:
        result = download_tiles(
            corpus, block(18, 160_000, 90_000, 2), TileSource(server.template), FAST
        )
    assert result.fetched == 4
    assert meta(corpus)["name"] == name and meta(corpus)["maxzoom"] == "18"
    assert len(select_tiles(corpus, layout.bbox, layout.zoom_levels).tiles) == layout.tile_count


# --------------------------------------------------------------------------- faults


def test_429_with_retry_after_pauses_then_succeeds(tmp_path: Path) -> None:
    first = "16/39000/22000"
    with tile_server(faults={first: ["429:1"]}) as server:
        result = download_tiles(
            tmp_path / "c.mbtiles", block(n=1), TileSource(server.template), FAST
        )
        asked = [r for r in server.tile_requests() if first in r.path]
    assert result.fetched == 1 and [r.status for r in asked] == [429, 200]
    assert asked[1].at - asked[0].at >= 1.0  # never sooner than the server asked


def test_retry_after_as_an_http_date_is_honoured(tmp_path: Path) -> None:
    first = "16/39000/22000"
    with tile_server(faults={first: ["503:date+2"]}) as server:
        result = download_tiles(
            tmp_path / "c.mbtiles", block(n=1), TileSource(server.template), FAST
        )
        asked = [r for r in server.tile_requests() if first in r.path]
    assert result.fetched == 1
    # HTTP-dates have whole seconds: at least one of the two asked for is waited.
    assert asked[1].at - asked[0].at >= 1.0


def test_5xx_timeouts_and_resets_are_retried(tmp_path: Path) -> None:
    faults = {
        "16/39000/22000": ["500", "502"],
        "16/39000/22001": ["slow"],
        "16/39001/22000": ["reset"],
    }
    options = DownloadOptions(backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=0.3)
    with tile_server(faults=faults, slow_s=1.0) as server:
        result = download_tiles(
            tmp_path / "c.mbtiles", block(n=2), TileSource(server.template), options
        )
    assert (result.fetched, result.failed_count) == (4, 0)
    with open_corpus(tmp_path / "c.mbtiles") as reader:
        assert reader.read(16, 39_000, 22_001) == tile_bytes(16, 39_000, 22_001)


def test_a_tile_past_the_retry_cap_is_listed_failed(tmp_path: Path) -> None:
    bad = "16/39001/22001"
    options = DownloadOptions(backoff_base_s=0.01, backoff_max_s=0.05, max_retries=2)
    with tile_server(faults={bad: ["500"] * 10}) as server:
        result = download_tiles(
            tmp_path / "c.mbtiles", block(n=2), TileSource(server.template), options
        )
        attempts = [r for r in server.tile_requests() if bad in r.path]
    assert (result.fetched, result.failed_count) == (3, 1)
    assert len(attempts) == 3
    assert result.failed[0].reason == "HTTP 500 after 3 attempts"
    assert missing_tiles(tmp_path / "c.mbtiles", block(n=2)) == [(16, 39_001, 22_001)]


@pytest.mark.parametrize("checker_from_tiles", [0, 10**9], ids=["child-process", "here"])
def test_bodies_that_are_not_images_are_never_stored(
    tmp_path: Path, checker_from_tiles: int
) -> None:
    faults = {
        "16/39000/22000": ["html"] * 9,
        "16/39000/22001": ["garbage"] * 9,
        "16/39001/22000": ["truncated"] * 9,
        "16/39001/22001": ["html"],  # once: the retry gets the tile
    }
    options = DownloadOptions(
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        max_retries=1,
        checker_from_tiles=checker_from_tiles,
        failing_share=1.0,
    )
    corpus = tmp_path / "c.mbtiles"
    with tile_server(faults=faults) as server:
        result = download_tiles(corpus, block(n=2), TileSource(server.template), options)
    assert (result.fetched, result.failed_count) == (1, 3)
    reasons = {f"{f.z}/{f.x}/{f.y}": f.reason for f in result.failed}
    assert "text/html body" in reasons["16/39000/22000"]
    assert "not a decodable image" in reasons["16/39000/22001"]
    assert "not a decodable image" in reasons["16/39001/22000"]
    assert missing_tiles(corpus, block(n=2)) == [
        (16, 39_000, 22_000),
        (16, 39_000, 22_001),
        (16, 39_001, 22_000),
    ]


def test_a_404_fails_the_tile_without_retrying(tmp_path: Path) -> None:
    with tile_server(faults={"16/39000/22000": ["404"] * 5}) as server:
        result = download_tiles(
            tmp_path / "c.mbtiles", block(n=2), TileSource(server.template), FAST
        )
        asked = [r for r in server.tile_requests() if "16/39000/22000" in r.path]
    assert len(asked) == 1 and result.failed[0].reason == "HTTP 404"


def test_a_host_that_keeps_failing_stops_the_download(tmp_path: Path) -> None:
    corpus = tmp_path / "c.mbtiles"
    options = DownloadOptions(backoff_base_s=0.01, backoff_max_s=0.02, breaker_failures=6)
    with tile_server(faults={"*": ["503"]}) as server:
        with pytest.raises(HostFailingError) as info:
            download_tiles(corpus, block(n=10), TileSource(server.template), options)
        asked = len(server.tile_requests())
    assert info.value.exit_code == EXIT_DOWNLOAD
    assert info.value.host == f"127.0.0.1:{server.port}" and info.value.status == "HTTP 503"
    assert f"127.0.0.1:{server.port}" in str(info.value) and "HTTP 503" in str(info.value)
    # It stopped instead of trying 100 tiles five times each.
    assert asked < 6 + 2 * options.concurrency
    with open_corpus(corpus):
        pass


def test_a_refused_key_stops_at_once(tmp_path: Path) -> None:
    with tile_server(faults={"*": ["403"]}) as server:
        wants = "server wants a key: set TAKEOFF_CACHE_TILES_API_KEY"
        with pytest.raises(HostFailingError, match=wants):
            download_tiles(tmp_path / "c.mbtiles", block(n=10), TileSource(server.template), FAST)
        assert len(server.tile_requests()) <= FAST.concurrency


def test_a_retry_after_beyond_the_wait_limit_stops(tmp_path: Path) -> None:
    with (
        tile_server(faults={"*": ["429:3600"]}) as server,
        pytest.raises(HostFailingError, match="asks to wait 3600 s"),
    ):
        download_tiles(tmp_path / "c.mbtiles", block(n=3), TileSource(server.template), FAST)


# --------------------------------------------------------------------------- revalidation


def test_old_tiles_are_revalidated_and_a_304_renews_their_age(tmp_path: Path) -> None:
    corpus = tmp_path / "c.mbtiles"
    with tile_server() as server:
        source = TileSource(server.template)
        download_tiles(corpus, block(n=2), source, FAST)
        fresh = download_tiles(corpus, block(n=2), source, DownloadOptions(max_age_days=1))
        assert (fresh.kept, fresh.revalidated, fresh.fetched) == (4, 0, 0)
        with sqlite3.connect(corpus) as db:  # ten days pass
            db.execute("UPDATE tile_fetch SET fetched_at = fetched_at - 10 * 86400")
        server.versions["16/39001/22001"] = 1  # the provider updated one tile
        before = len(server.tile_requests())
        result = download_tiles(corpus, block(n=2), source, DownloadOptions(max_age_days=7))
        asked = server.tile_requests()[before:]
    assert (result.revalidated, result.fetched, result.kept) == (3, 1, 0)
    assert all("If-None-Match" in r.headers and "If-Modified-Since" in r.headers for r in asked)
    assert sorted(r.status for r in asked) == [200, 304, 304, 304]
    with open_corpus(corpus) as reader:
        assert reader.read(16, 39_001, 22_001) == tile_bytes(16, 39_001, 22_001, version=1)
    with sqlite3.connect(corpus) as db:
        oldest = db.execute("SELECT min(fetched_at) FROM tile_fetch").fetchone()[0]
    assert oldest > time.time() - 86400
    assert estimate_download(corpus, block(n=2), DownloadOptions(max_age_days=7)).to_fetch == 0


# --------------------------------------------------------------------------- estimates and guards


def test_dry_run_estimate_counts_per_zoom_and_fetches_nothing(tmp_path: Path) -> None:
    corpus = tmp_path / "c.mbtiles"
    tiles = block(16, n=2) + block(17, 78_000, 44_000, n=3)
    empty = estimate_download(corpus, tiles)
    assert empty.per_zoom == {16: 4, 17: 9} and empty.estimated_bytes == 13 * 20_000
    assert not corpus.exists()
    with tile_server() as server:
        download_tiles(corpus, block(16, n=2), TileSource(server.template), FAST)
    est = estimate_download(corpus, tiles)
    mean16 = sum(len(tile_bytes(*t)) for t in block(16, n=2)) / 4
    assert (est.per_zoom, est.missing, est.kept) == ({17: 9}, 9, 4)
    assert est.estimated_bytes == 9 * 20_000
    est16 = estimate_download(corpus, block(16, n=3))
    assert est16.estimated_bytes == round(5 * mean16)


def test_max_tiles_refuses_a_larger_job_before_any_request(tmp_path: Path) -> None:
    corpus = tmp_path / "c.mbtiles"
    with tile_server() as server:
        with pytest.raises(TooManyTilesError, match="100 tiles to fetch, more than max_tiles 99"):
            download_tiles(
                corpus, block(n=10), TileSource(server.template), DownloadOptions(max_tiles=99)
            )
        assert server.tile_requests() == []
    assert not corpus.exists()


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("how", ["param", "header"])
def test_the_api_key_never_appears_in_results_errors_or_logs(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAKEOFF_CACHE_TILES_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    kwargs = {"key_param": "apikey"} if how == "param" else {"key_header": "X-Api-Key"}
    faults = {
        "16/39000/22000": ["500"] * 9,
        "16/39000/22001": ["404"],
        "16/39001/22000": ["html"] * 9,
    }
    options = DownloadOptions(
        backoff_base_s=0.01, backoff_max_s=0.02, max_retries=1, failing_share=1.0
    )
    texts: list[str] = []
    with tile_server(faults=faults) as server:
        source = TileSource(server.template, **kwargs)  # type: ignore[arg-type]
        result = download_tiles(tmp_path / "c.mbtiles", block(n=2), source, options)
        texts += [repr(result), json.dumps(result.to_json())]
        got = server.tile_requests()[0]
        server.faults["*"] = ["503"]
        with pytest.raises(HostFailingError) as info:
            download_tiles(tmp_path / "d.mbtiles", block(n=4), source, options)
        texts += [str(info.value), repr(info.value), info.value.status]
    sent = got.query.get("apikey", [None])[0] if how == "param" else got.headers.get("X-Api-Key")
    assert sent == SECRET  # it was used...
    assert result.failed_count == 3
    texts.append(caplog.text)
    assert "HTTP Request" in caplog.text  # httpx did log the requests
    for text in texts:  # ...and shown nowhere
        assert SECRET not in text


def test_a_named_key_that_is_not_set_is_an_input_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TAKEOFF_CACHE_TILES_API_KEY", raising=False)
    with pytest.raises(InvalidRequestError, match="TAKEOFF_CACHE_TILES_API_KEY is not set"):
        download_tiles(
            tmp_path / "c.mbtiles",
            block(n=1),
            TileSource("http://127.0.0.1:9/{z}/{x}/{y}", key_header="K"),
        )


# --------------------------------------------------------------------------- kill -9

_DOWNLOADER = """
import sys
from pathlib import Path
from takeoff_cache.prepare.download import DownloadOptions, download_tiles
from takeoff_cache.prepare.tileserver import TileSource
tiles = [(16, x, y) for x in range(39000, 39015) for y in range(22000, 22015)]
download_tiles(Path(sys.argv[1]), tiles, TileSource(sys.argv[2]), DownloadOptions(timeout_s=120))
"""


def test_a_download_killed_mid_way_resumes_with_only_what_is_missing(tmp_path: Path) -> None:
    corpus = tmp_path / "c.mbtiles"
    all_tiles = [(16, x, y) for x in range(39_000, 39_015) for y in range(22_000, 22_015)]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(Path(takeoff_cache.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    )
    with tile_server(stall_after=150) as server:
        proc = subprocess.Popen(
            [sys.executable, "-c", _DOWNLOADER, str(corpus), server.template], env=env
        )
        try:
            deadline = time.monotonic() + 120
            # Wait until the server stalls and the downloader has committed what it got:
            # a stalled stream still commits within a second.
            while time.monotonic() < deadline and _stored(corpus) < 150:
                assert proc.poll() is None
                time.sleep(0.05)
            assert server.good == 150
            checkers = children(proc.pid)  # its body checker (a job of 225 tiles)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert len(checkers) == 1
        # The checker's stdin closed with its parent: it exits too.
        while time.monotonic() < deadline and command_line(checkers[0]):
            time.sleep(0.05)
        assert not command_line(checkers[0])
        stored_after_kill = _stored(corpus)
        assert stored_after_kill == 150
        # The killed file opens and reads cleanly, even read-only.
        assert missing_tiles(corpus, all_tiles) and _all_tiles_valid(corpus)
        server.stall_after = None
        server.release()
        before = len(server.tile_requests())
        result = download_tiles(corpus, all_tiles, TileSource(server.template), FAST)
        second = server.tile_requests()[before:]
    assert result.kept == stored_after_kill
    assert result.fetched == len(second) == len(all_tiles) - stored_after_kill
    assert missing_tiles(corpus, all_tiles) == []
    assert _all_tiles_valid(corpus)


def _stored(corpus: Path) -> int:
    if not corpus.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{corpus}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT count(*) FROM tiles").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # the tables are not created yet


def _all_tiles_valid(corpus: Path) -> bool:
    with sqlite3.connect(f"file:{corpus}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        coords = db.execute("SELECT zoom_level, tile_column, tile_row FROM tiles").fetchall()
    with open_corpus(corpus) as reader:
        return all(
            reader.read(z, x, tms_row(z, row)) == tile_bytes(z, x, tms_row(z, row))
            for z, x, row in coords
        )


# --------------------------------------------------------------------------- the writer


def test_committed_tiles_reach_the_file_while_the_writer_goes_on(tmp_path: Path) -> None:
    """The log is folded back as the download runs, not all at the close."""
    corpus = tmp_path / "c.mbtiles"
    tiles = block(n=12)
    with MBTilesWriter(corpus, name="t", attribution="", commit_every=16) as writer:
        for coord in tiles:
            writer.put(coord, tile_bytes(*coord), "0" * 64, None, None, time.time())
        writer.commit()
        body = sum(len(tile_bytes(*c)) for c in tiles)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and corpus.stat().st_size < body:
            time.sleep(0.02)
        assert corpus.stat().st_size >= body  # in the file itself, with the writer still open
    assert not Path(f"{corpus}-wal").exists()
    assert _all_tiles_valid(corpus) and _stored(corpus) == len(tiles)


# --------------------------------------------------------------------------- bounds


def test_a_dripping_server_fails_its_tiles_within_the_deadline(tmp_path: Path) -> None:
    tiles = block(n=2)
    with tile_server(faults={"*": ["drip"]}, drip_s=0.05) as server:
        options = replace(FAST, deadline_s=0.3, max_retries=1, breaker_failures=100)
        started = time.monotonic()
        result = download_tiles(tmp_path / "c.mbtiles", tiles, TileSource(server.template), options)
        seconds = time.monotonic() - started
    assert result.failed_count == len(tiles) and result.fetched == 0
    assert "no complete answer within 0.3 s after 2 attempts" in result.failed[0].reason
    # A tile's ~2 kB at 20 bytes/s would take minutes; two attempts end in about 0.6 s.
    assert seconds < 5


@pytest.mark.parametrize("fault", ["huge", "gzipbomb"])
def test_oversized_bodies_are_failed_attempts_read_no_further(tmp_path: Path, fault: str) -> None:
    tiles = block(n=1)
    with tile_server(faults={"*": [fault]}) as server:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        started = time.monotonic()
        options = replace(FAST, max_retries=1)
        result = download_tiles(tmp_path / "c.mbtiles", tiles, TileSource(server.template), options)
        seconds = time.monotonic() - started
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert result.failed_count == 1 and result.fetched == 0
    assert "with a body larger than 4,194,304 bytes after 2 attempts" in result.failed[0].reason
    assert seconds < 5
    assert grown_mib < 64  # the bomb inflates to 256 MiB


def test_a_1x1_tile_is_a_failed_attempt(tmp_path: Path) -> None:
    tiles = block(n=1)
    with tile_server(faults={"*": ["tiny"]}) as server:
        options = replace(FAST, max_retries=1)
        result = download_tiles(tmp_path / "c.mbtiles", tiles, TileSource(server.template), options)
    assert result.failed_count == 1
    assert "a 1x1 px image, not a map tile after 2 attempts" in result.failed[0].reason
