"""The remembered select phase: fast when the corpus is unchanged, never stale when it changed."""

from __future__ import annotations

import io
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from PIL import Image

from takeoff_cache.build.request import parse_request, read_request_file
from takeoff_cache.core.tilemath import tms_row
from takeoff_cache.demo.synthetic import render_tile, replace_tile_bytes
from takeoff_cache.tiles import selection as selection_cache
from takeoff_cache.tiles.corpus import TileSelection, select_tiles

Setup = tuple[Path, tuple[float, float, float, float], tuple[int, ...]]


@pytest.fixture
def setup(demo_source: Path, tmp_path: Path) -> Setup:
    request = parse_request(read_request_file(demo_source / "request.toml"))
    corpus = tmp_path / "corpus.mbtiles"
    shutil.copyfile(request.corpus, corpus)
    time.sleep(0.05)  # past the file system's timestamp tick of the copy
    return corpus, request.bbox.as_tuple(), request.zoom_levels


def select(setup: Setup, cache: Path, **kw: float) -> TileSelection:
    corpus, bbox, zooms = setup
    return selection_cache.select_tiles_cached(corpus, bbox, zooms, cache, **kw)


def new_bytes(z: int, x: int, y: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(render_tile(z, x, y, seed=777)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def test_unchanged_corpus_is_served_from_the_work_folder(setup: Setup, tmp_path: Path) -> None:
    cache = tmp_path / "selections"
    first = select(setup, cache, racy_s=0)
    assert len(list(cache.iterdir())) == 1
    assert select(setup, cache, racy_s=0) == first == select_tiles(*setup)


def test_changed_tile_changes_the_fingerprint(setup: Setup, tmp_path: Path) -> None:
    cache = tmp_path / "selections"
    before = select(setup, cache, racy_s=0)
    tile = before.tiles[17]
    time.sleep(0.05)
    replace_tile_bytes(setup[0], tile.z, tile.x, tile.y, new_bytes(tile.z, tile.x, tile.y))
    after = select(setup, cache)
    assert after.fingerprint != before.fingerprint
    assert after == select_tiles(*setup)


def test_write_through_the_sqlite_wal_is_seen(setup: Setup, tmp_path: Path) -> None:
    corpus = setup[0]
    with sqlite3.connect(corpus) as db:
        db.execute("PRAGMA journal_mode=WAL")
    cache = tmp_path / "selections"
    time.sleep(0.05)
    before = select(setup, cache, racy_s=0)
    tile = before.tiles[3]
    writer = sqlite3.connect(corpus)
    try:
        # Committed but not checkpointed: the main file is untouched, only the -wal grew.
        writer.execute("PRAGMA wal_autocheckpoint=0")
        with writer:
            writer.execute(
                "UPDATE tiles SET tile_data = ? WHERE zoom_level = ? AND tile_column = ?"
                " AND tile_row = ?",
                (new_bytes(tile.z, tile.x, tile.y), tile.z, tile.x, tms_row(tile.z, tile.y)),
            )
        after = select(setup, cache, racy_s=0)
    finally:
        writer.close()
    assert after.fingerprint != before.fingerprint


def test_a_read_right_after_a_change_is_not_remembered(setup: Setup, tmp_path: Path) -> None:
    cache = tmp_path / "selections"
    tile = select_tiles(*setup).tiles[0]
    replace_tile_bytes(setup[0], tile.z, tile.x, tile.y, new_bytes(tile.z, tile.x, tile.y))
    select(setup, cache)  # default racy window: the change is too recent to trust its timestamps
    assert not cache.exists() or not any(cache.iterdir())


def test_damaged_entry_is_recomputed(setup: Setup, tmp_path: Path) -> None:
    cache = tmp_path / "selections"
    first = select(setup, cache, racy_s=0)
    entry = next(cache.iterdir())
    entry.write_bytes(entry.read_bytes().replace(first.tiles[5].sha256.encode(), b"0" * 64))
    assert select(setup, cache, racy_s=0) == first


def test_an_area_is_remembered_apart_from_its_bbox(setup: Setup, tmp_path: Path) -> None:
    corpus, bbox, zooms = setup
    lat0, lon0, lat1, lon1 = bbox
    half = [[lon0, lat0], [lon1, lat0], [lon1, lat1], [lon0, lat0]]  # half the bbox
    area = {"type": "Polygon", "coordinates": [half]}
    cache = tmp_path / "selections"
    whole = select(setup, cache, racy_s=0)
    part = selection_cache.select_tiles_cached(corpus, bbox, zooms, cache, area=area, racy_s=0)
    assert 0 < len(part.tiles) < len(whole.tiles)
    assert part == select_tiles(corpus, bbox, zooms, area)
    assert len(list(cache.iterdir())) == 2
    # Served again from its own entry, not from the bbox's.
    again = selection_cache.select_tiles_cached(corpus, bbox, zooms, cache, area=area, racy_s=0)
    assert again == part and select(setup, cache, racy_s=0) == whole
