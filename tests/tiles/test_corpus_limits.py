"""Corpus SQL within a time and a row limit, and rows that are no tile address.

An MBTiles file is someone else's SQL: its ``tiles`` may be a view, a recursive
one that never ends included, and its rows may hold anything. Reading one ends,
in bounded memory, with a CorpusError naming the file, or skips what no
selection could ask for.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from takeoff_cache.core.tilemath import tile_bounds, tms_row
from takeoff_cache.errors import CorpusError
from takeoff_cache.prepare.download import estimate_download
from takeoff_cache.tiles import mbtiles
from takeoff_cache.tiles.corpus import open_corpus, select_tiles
from takeoff_cache.tiles.mbtiles import MBTilesWriter, create_schema, stored_tiles
from tests.support.tileserver import tile_bytes

Z, X, Y = 16, 39_000, 22_000
GOOD = [(Z, X, Y), (Z, X + 1, Y), (Z, X, Y + 1)]


def around(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    """A bbox a little inside tile z/x/y: it selects that tile alone."""
    south, west, north, east = tile_bounds(z, x, y)
    dy, dx = (north - south) / 4, (east - west) / 4
    return south + dy, west + dx, north - dy, east - dx


def corpus_with_view(path: Path, view_sql: str) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
        db.execute(f"CREATE VIEW tiles AS {view_sql}")
    return path


# Every row is tile 16/39000/22000, for ever: a selection would grow without end.
ENDLESS_SAME_TILE = (
    "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n)"
    f" SELECT {Z} AS zoom_level, {X} AS tile_column, {tms_row(Z, Y)} AS tile_row,"
    " x'ffd8ff' AS tile_data FROM n"
)
# Rows for ever, none of them a tile anyone asks for: a scan that never ends.
ENDLESS_NOTHING = (
    "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n)"
    " SELECT CASE WHEN i < 0 THEN 16 ELSE 99 END AS zoom_level, i AS tile_column,"
    " i AS tile_row, x'00' AS tile_data FROM n"
)


def _read_one(path: Path) -> bytes:
    with open_corpus(path) as corpus:
        return corpus.read(Z, X, Y)


@pytest.mark.parametrize(
    "read",
    [
        lambda p: select_tiles(p, around(Z, X, Y), (Z,)),
        lambda p: _read_one(p),
        lambda p: stored_tiles(p, [(Z, X, Y)]),
        lambda p: estimate_download(p, [(Z, X, Y)]),
    ],
    ids=["select", "read", "stored", "estimate"],
)
def test_a_view_that_repeats_a_tile_for_ever_is_refused_by_its_row_count(
    tmp_path: Path, read: object
) -> None:
    corpus = corpus_with_view(tmp_path / "endless.mbtiles", ENDLESS_SAME_TILE)
    started = time.monotonic()
    with pytest.raises(CorpusError) as info:
        read(corpus)  # type: ignore[operator]
    assert "repeats tiles" in str(info.value) and str(corpus) in str(info.value)
    assert "\n" not in str(info.value)
    assert time.monotonic() - started < 15  # against a hang, not a timing


@pytest.mark.parametrize(
    "read",
    [
        lambda p: select_tiles(p, around(Z, X, Y), (Z,)),
        lambda p: stored_tiles(p, [(Z, X, Y)]),
        lambda p: estimate_download(p, [(Z, X, Y)]),
    ],
    ids=["select", "stored", "estimate"],
)
def test_a_view_that_never_ends_is_stopped_at_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read: object
) -> None:
    monkeypatch.setattr(mbtiles, "QUERY_DEADLINE_S", 0.5)
    corpus = corpus_with_view(tmp_path / "endless.mbtiles", ENDLESS_NOTHING)
    started = time.monotonic()
    with pytest.raises(CorpusError) as info:
        read(corpus)  # type: ignore[operator]
    message = str(info.value)
    assert "took longer than 0.5 s" in message and "view may never end" in message
    assert time.monotonic() - started < 15


def test_the_default_deadline_is_finite_and_generous() -> None:
    assert 10 <= mbtiles.QUERY_DEADLINE_S <= 120


BAD_ROWS = {
    "negative zoom": (-1, 0, 0, b"x"),
    "text column": (Z, "abc", tms_row(Z, Y), b"x"),
    "text zoom": ("sixteen", X, tms_row(Z, Y), b"x"),
    "real column": (Z, X + 0.5, tms_row(Z, Y), b"x"),
    "row past the grid": (Z, X, 1 << Z, b"x"),
    "zoom past 30": (31, 0, 0, b"x"),
}


def corpus_with_rows(path: Path, bad: tuple[object, ...]) -> Path:
    with sqlite3.connect(path) as db:
        create_schema(db)
        for z, x, y in GOOD:
            db.execute(
                "INSERT INTO tiles VALUES (?, ?, ?, ?)", (z, x, tms_row(z, y), tile_bytes(z, x, y))
            )
        db.execute("INSERT INTO tiles VALUES (?, ?, ?, ?)", bad)
    return path


@pytest.mark.parametrize("bad", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_rows_that_are_no_tile_address_are_skipped_everywhere(
    tmp_path: Path, bad: tuple[object, ...]
) -> None:
    corpus = corpus_with_rows(tmp_path / "c.mbtiles", bad)
    south, west, north, east = tile_bounds(Z, X, Y)
    _, _, _, east2 = tile_bounds(Z, X + 1, Y)
    south2, _, _, _ = tile_bounds(Z, X, Y + 1)
    bbox = (south2 + 1e-6, west + 1e-6, north - 1e-6, east2 - 1e-6)
    selection = select_tiles(corpus, bbox, (Z,))
    assert [(t.z, t.x, t.y) for t in selection.tiles] == sorted(GOOD)
    assert set(stored_tiles(corpus, [*GOOD, (Z, X + 1, Y + 1)])) == set(GOOD)
    assert set(mbtiles.mean_tile_bytes(corpus)) == {Z}
    # A download into the file sets bounds and zooms from the tiles alone.
    with MBTilesWriter(corpus, name="t", attribution=""):
        pass
    with sqlite3.connect(corpus) as db:
        meta = dict(db.execute("SELECT name, value FROM metadata").fetchall())
    assert (meta["minzoom"], meta["maxzoom"]) == (str(Z), str(Z))
    lon0, lat0, lon1, lat1 = (float(v) for v in meta["bounds"].split(","))
    assert (lon0, lat0, lon1, lat1) == pytest.approx((west, south2, east2, north))
    assert (south, east) != (lat0, lon1)  # two tiles wide and tall, not one
