"""Tile corpora: MBTiles tables, MBTiles views, XYZ folders, selection and fingerprint."""

from __future__ import annotations

import hashlib
import io
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from takeoff_cache.core.tilemath import tile_bounds, tms_row
from takeoff_cache.errors import CorpusError
from takeoff_cache.tiles.corpus import TileSelection, select_tiles

Zxy = tuple[int, int, int]

# Tiles around Berlin at z10 (x 549..552, y 334..337), a few at z11 and one at z9.
TILES: list[Zxy] = [
    *((10, x, y) for x in range(549, 553) for y in range(334, 338)),
    (11, 1101, 671),
    (11, 1102, 672),
    (11, 1110, 680),
    (9, 275, 167),
]


def _bbox() -> tuple[float, float, float, float]:
    """From the centre of z10 tile (550, 335) to the centre of (551, 336)."""
    a = tile_bounds(10, 550, 335)
    b = tile_bounds(10, 551, 336)
    return ((b[0] + b[2]) / 2, (a[1] + a[3]) / 2, (a[0] + a[2]) / 2, (b[1] + b[3]) / 2)


BBOX = _bbox()
ZOOMS = (10, 11)
EXPECTED: list[Zxy] = [
    (10, 550, 335),
    (10, 550, 336),
    (10, 551, 335),
    (10, 551, 336),
    (11, 1101, 671),
    (11, 1102, 672),
]


def jpeg(seed: int) -> bytes:
    """A distinct 256x256 JPEG per seed."""
    img = Image.new("RGB", (256, 256), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    img.putpixel((seed % 256, (seed * 7) % 256), (255 - seed % 256, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tile_bytes(tiles: list[Zxy] = TILES) -> dict[Zxy, bytes]:
    return {t: jpeg(i) for i, t in enumerate(tiles)}


def write_mbtiles(path: Path, data: dict[Zxy, bytes], *, extra_rows: int = 0) -> Path:
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER,"
        " tile_data BLOB)"
    )
    db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
    for (z, x, y), blob in data.items():
        db.execute("INSERT INTO tiles VALUES (?, ?, ?, ?)", (z, x, tms_row(z, y), blob))
    db.commit()
    db.close()
    return path


def write_mbtiles_view(path: Path, data: dict[Zxy, bytes]) -> Path:
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE map (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER,
                          tile_id TEXT);
        CREATE TABLE images (tile_data BLOB, tile_id TEXT);
        CREATE VIEW tiles AS
            SELECT map.zoom_level AS zoom_level, map.tile_column AS tile_column,
                   map.tile_row AS tile_row, images.tile_data AS tile_data
            FROM map JOIN images ON images.tile_id = map.tile_id;
        """
    )
    ids: dict[bytes, str] = {}
    for (z, x, y), blob in data.items():
        if blob not in ids:
            ids[blob] = hashlib.md5(blob).hexdigest()
            db.execute("INSERT INTO images VALUES (?, ?)", (blob, ids[blob]))
        db.execute("INSERT INTO map VALUES (?, ?, ?, ?)", (z, x, tms_row(z, y), ids[blob]))
    db.commit()
    db.close()
    return path


def write_xyz(root: Path, data: dict[Zxy, bytes]) -> Path:
    for (z, x, y), blob in data.items():
        folder = root / str(z) / str(x)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{y}.jpg").write_bytes(blob)
    return root


def zxy(selection: TileSelection) -> list[Zxy]:
    return [(t.z, t.x, t.y) for t in selection.tiles]


def test_tms_rows_are_flipped_when_reading_mbtiles(tmp_path: Path) -> None:
    data = tile_bytes()
    path = write_mbtiles(tmp_path / "c.mbtiles", data)
    # A decoy stored with the XYZ row as its raw tile_row: it is really XYZ row 688, far south.
    db = sqlite3.connect(path)
    db.execute("INSERT INTO tiles VALUES (10, 550, 335, ?)", (jpeg(999),))
    db.commit()
    db.close()
    assert tms_row(10, 335) == 688
    selection = select_tiles(path, BBOX, ZOOMS)
    assert zxy(selection) == EXPECTED
    by_zxy = {(t.z, t.x, t.y): t.sha256 for t in selection.tiles}
    assert by_zxy[(10, 550, 335)] == hashlib.sha256(data[(10, 550, 335)]).hexdigest()
    assert hashlib.sha256(jpeg(999)).hexdigest() not in by_zxy.values()


def test_selection_is_sorted_and_excludes_tiles_outside_bbox_or_zoom(tmp_path: Path) -> None:
    data = tile_bytes()
    selection = select_tiles(write_mbtiles(tmp_path / "c.mbtiles", data), BBOX, ZOOMS)
    assert zxy(selection) == sorted(EXPECTED)
    assert (11, 1110, 680) not in zxy(selection)
    assert all(t.z != 9 for t in selection.tiles)
    assert [t.sha256 for t in selection.tiles] == [
        hashlib.sha256(data[t]).hexdigest() for t in EXPECTED
    ]
    assert len(selection.fingerprint) == 64
    int(selection.fingerprint, 16)


def test_a_single_zoom_level_selects_only_that_level(tmp_path: Path) -> None:
    path = write_mbtiles(tmp_path / "c.mbtiles", tile_bytes())
    assert zxy(select_tiles(path, BBOX, (11,))) == [(11, 1101, 671), (11, 1102, 672)]


def test_view_based_mbtiles_gives_the_same_selection_and_fingerprint(tmp_path: Path) -> None:
    data = tile_bytes()
    # Two tiles sharing one image, as deduplicating MBTiles writers do.
    data[(10, 551, 336)] = data[(10, 550, 335)]
    table = select_tiles(write_mbtiles(tmp_path / "table.mbtiles", data), BBOX, ZOOMS)
    view = select_tiles(write_mbtiles_view(tmp_path / "view.mbtiles", data), BBOX, ZOOMS)
    assert zxy(view) == EXPECTED
    assert view == table


def test_xyz_folder_gives_the_same_selection_and_fingerprint(tmp_path: Path) -> None:
    data = tile_bytes()
    table = select_tiles(write_mbtiles(tmp_path / "c.mbtiles", data), BBOX, ZOOMS)
    folder = write_xyz(tmp_path / "xyz", data)
    # Files that are not tiles are ignored.
    (folder / "10" / "550" / "notes.txt").write_text("x")
    (folder / "README").write_text("x")
    xyz = select_tiles(folder, BBOX, ZOOMS)
    assert zxy(xyz) == EXPECTED
    assert xyz == table


def test_fingerprint_changes_when_one_selected_tile_changes(tmp_path: Path) -> None:
    data = tile_bytes()
    before = select_tiles(write_mbtiles(tmp_path / "a.mbtiles", data), BBOX, ZOOMS)
    data[(11, 1102, 672)] = jpeg(500)
    after = select_tiles(write_mbtiles(tmp_path / "b.mbtiles", data), BBOX, ZOOMS)
    assert zxy(after) == zxy(before)
    assert after.fingerprint != before.fingerprint


def test_fingerprint_ignores_tiles_outside_the_selection(tmp_path: Path) -> None:
    data = tile_bytes()
    before = select_tiles(write_mbtiles(tmp_path / "a.mbtiles", data), BBOX, ZOOMS)
    data[(10, 549, 334)] = jpeg(600)  # outside the bbox
    data[(9, 275, 167)] = jpeg(601)  # outside the zoom levels
    data[(12, 2202, 1343)] = jpeg(602)  # a new zoom level
    after = select_tiles(write_mbtiles(tmp_path / "b.mbtiles", data), BBOX, ZOOMS)
    assert after == before


def test_fingerprint_is_stable_across_insertion_order(tmp_path: Path) -> None:
    data = tile_bytes()
    reordered = dict(reversed(list(data.items())))
    a = select_tiles(write_mbtiles(tmp_path / "a.mbtiles", data), BBOX, ZOOMS)
    b = select_tiles(write_mbtiles(tmp_path / "b.mbtiles", reordered), BBOX, ZOOMS)
    assert a == b


def test_no_tiles_in_the_area_gives_an_empty_selection(tmp_path: Path) -> None:
    path = write_mbtiles(tmp_path / "c.mbtiles", tile_bytes())
    selection = select_tiles(path, (-10.0, -10.0, -9.0, -9.0), ZOOMS)
    assert selection.tiles == ()


def test_missing_corpus_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        select_tiles(tmp_path / "nope.mbtiles", BBOX, ZOOMS)


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.mbtiles"
    path.write_bytes(b"this is not an sqlite database, just some text " * 50)
    with pytest.raises(CorpusError, match="corpus"):
        select_tiles(path, BBOX, ZOOMS)


def test_a_jpeg_given_as_corpus_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tile.jpg"
    path.write_bytes(jpeg(1))
    with pytest.raises(CorpusError):
        select_tiles(path, BBOX, ZOOMS)


def test_sqlite_without_a_tiles_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.mbtiles"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
    db.commit()
    db.close()
    with pytest.raises(CorpusError, match="tiles"):
        select_tiles(path, BBOX, ZOOMS)


def test_an_empty_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "xyz"
    folder.mkdir()
    with pytest.raises(CorpusError, match="zoom folders"):
        select_tiles(folder, BBOX, ZOOMS)


def test_a_folder_without_numeric_zoom_folders_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "xyz"
    (folder / "tiles").mkdir(parents=True)
    (folder / "tile.jpg").write_bytes(jpeg(1))
    with pytest.raises(CorpusError):
        select_tiles(folder, BBOX, ZOOMS)


def test_a_tile_stored_under_several_file_names_is_selected_once(tmp_path: Path) -> None:
    folder = write_xyz(tmp_path / "xyz", {(10, 550, 335): jpeg(1)})
    (folder / "10" / "550" / "335.png").write_bytes(jpeg(2))
    (folder / "10" / "550" / "0335.jpg").write_bytes(jpeg(3))
    selected = zxy(select_tiles(folder, BBOX, ZOOMS))
    assert selected == [(10, 550, 335)]


@pytest.mark.parametrize("layout", ["table", "view", "xyz"])
def test_tiles_read_together_are_the_tiles_read_one_by_one(
    tmp_path: Path, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from takeoff_cache.tiles.corpus import open_corpus

    data = tile_bytes()
    path = {
        "table": lambda: write_mbtiles(tmp_path / "c.mbtiles", data),
        "view": lambda: write_mbtiles_view(tmp_path / "c.mbtiles", data),
        "xyz": lambda: write_xyz(tmp_path / "xyz", data),
    }[layout]()
    # Out of order, a tile twice and two that are not stored: each answered in place.
    wanted = [TILES[5], (10, 9, 9), TILES[0], TILES[5], (12, 0, 0), *TILES[1:4]]
    with open_corpus(path) as corpus:
        got = corpus.read_many(wanted)
        assert corpus.read_many([]) == []
    assert got == [data.get(t) for t in wanted]
    assert got[1] is None and got[4] is None
    if layout != "xyz":  # more tiles than one statement takes: several statements
        monkeypatch.setattr("takeoff_cache.tiles.corpus._READ_MANY_MAX", 3)
        with open_corpus(path) as corpus:
            assert corpus.read_many(wanted) == got


def test_tiles_that_are_not_blobs_read_alike_together_alone_and_when_selected(
    tmp_path: Path,
) -> None:
    from takeoff_cache.tiles.corpus import open_corpus

    path = write_mbtiles(tmp_path / "c.mbtiles", tile_bytes(TILES[:4]))
    db = sqlite3.connect(path)
    db.execute("UPDATE tiles SET tile_data = NULL WHERE tile_row = ?", (tms_row(10, 334),))
    db.execute("UPDATE tiles SET tile_data = 'not jpeg' WHERE tile_row = ?", (tms_row(10, 335),))
    db.execute("UPDATE tiles SET tile_data = 7 WHERE tile_row = ?", (tms_row(10, 337),))
    db.commit()
    db.close()
    with open_corpus(path) as corpus:
        got = corpus.read_many(TILES[:4])
    # A NULL tile reads as empty bytes, text and numbers as their text: each then fails
    # to decode and is named, never shifts its neighbours. Selection hashes the same bytes.
    assert got[0] == b"" and got[1] == b"not jpeg" and got[3] == b"7"
    assert got[2] == tile_bytes(TILES[:4])[TILES[2]]
    with open_corpus(path) as corpus:
        assert [corpus.read(*t) for t in TILES[:4]] == got
        selected = {(10, x, y): data for x, y, data in corpus.iter_range(10, 549, 549, 0, 999)}
    assert [selected[t] for t in TILES[:4]] == got
