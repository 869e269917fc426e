"""Tile corpora (MBTiles files and XYZ folders) and the select phase.

The selection is every tile that intersects the bbox (or, when the request
has one, the area) at the requested zoom levels, sorted by ``(z, x, y)``,
each with the SHA-256 of its bytes; the corpus fingerprint is the SHA-256
over that sorted list, so it changes when any selected tile's bytes change
and for nothing else.
"""

from __future__ import annotations

import hashlib
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from takeoff_cache.core.fsutil import kind_problem
from takeoff_cache.core.tilemath import tile_range, tms_row
from takeoff_cache.errors import CorpusError
from takeoff_cache.tiles.mbtiles import TILE_ADDRESS, bounded_rows, query_error, start_clock

_XYZ_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True, order=True)
class Tile:
    z: int
    x: int
    y: int
    sha256: str

    @property
    def zxy(self) -> str:
        return f"{self.z}/{self.x}/{self.y}"


@dataclass(frozen=True)
class TileSelection:
    tiles: tuple[Tile, ...]
    fingerprint: str


class Corpus(ABC):
    """Read access to the tiles of one corpus, addressed by XYZ (north-origin) rows."""

    path: Path

    @abstractmethod
    def iter_range(
        self, z: int, x0: int, x1: int, y0: int, y1: int
    ) -> Iterator[tuple[int, int, bytes]]:
        """Yield ``(x, y, bytes)`` for every stored tile in the inclusive ranges."""

    @abstractmethod
    def read(self, z: int, x: int, y: int) -> bytes:
        """Return one tile's bytes; :class:`CorpusError` if it is gone."""

    def read_many(self, coords: Sequence[tuple[int, int, int]]) -> list[bytes | None]:
        """The bytes of each ``(z, x, y)`` in order, None where the tile is gone."""
        out: list[bytes | None] = []
        for z, x, y in coords:
            try:
                out.append(self.read(z, x, y))
            except CorpusError:
                out.append(None)
        return out

    def close(self) -> None:  # noqa: B027 - only MBTiles holds a resource
        pass

    def __enter__(self) -> Corpus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MBTilesCorpus(Corpus):
    """An MBTiles file; ``tiles`` may be a table or a view over ``map``/``images``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # Read-only: another process may be adding tiles while we build.
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        except sqlite3.Error as exc:
            raise CorpusError(f"corpus: cannot open {path}: {exc}") from exc
        try:
            names = {
                row[0]
                for row in self._db.execute(
                    "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')"
                )
            }
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise CorpusError(f"corpus: {path} is not an MBTiles (SQLite) file: {exc}") from exc
        if "tiles" not in names:
            self._db.close()
            raise CorpusError(f"corpus: {path} has no 'tiles' table or view; not an MBTiles file")

    def iter_range(
        self, z: int, x0: int, x1: int, y0: int, y1: int
    ) -> Iterator[tuple[int, int, bytes]]:
        # MBTiles rows are TMS (south-origin): flip the y range for the query.
        rows = self._query(
            "SELECT tile_column, tile_row, CAST(tile_data AS BLOB) FROM tiles WHERE zoom_level = ?"
            f" AND tile_column BETWEEN ? AND ? AND tile_row BETWEEN ? AND ? AND {TILE_ADDRESS}",
            (z, x0, x1, tms_row(z, y1), tms_row(z, y0)),
        )
        # No more rows than tiles in the range: a view that repeats rows is refused
        # before the selection grows without end.
        for column, row, data in bounded_rows(rows, (x1 - x0 + 1) * (y1 - y0 + 1), self.path):
            yield int(column), tms_row(z, int(row)), _blob(data)

    def read(self, z: int, x: int, y: int) -> bytes:
        rows = list(
            bounded_rows(
                self._query(
                    "SELECT CAST(tile_data AS BLOB) FROM tiles"
                    " WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?",
                    (z, x, tms_row(z, y)),
                ),
                1,
                self.path,
            )
        )
        if not rows:
            raise CorpusError(f"corpus: tile {z}/{x}/{y} is no longer in {self.path}")
        return _blob(rows[0][0])

    def read_many(self, coords: Sequence[tuple[int, int, int]]) -> list[bytes | None]:
        """One statement for the lot, answered in one step of SQLite's.

        Read one at a time, every tile costs a statement of its own: its read
        lock on the file and several handovers of Python's GIL, which decoding
        threads then queue for (on 16 cores, reads from more than one thread got
        slower in total). Joined by ``group_concat``, a batch costs one of each.
        A batch the file cannot answer that way is read tile by tile, so that only
        the unreadable tiles come back as gone.
        """
        if len(coords) > _READ_MANY_MAX:
            # Four parameters a tile: older SQLite builds take 999 in a statement.
            return [
                blob
                for start in range(0, len(coords), _READ_MANY_MAX)
                for blob in self.read_many(coords[start : start + _READ_MANY_MAX])
            ]
        out: list[bytes | None] = [None] * len(coords)
        if not coords:
            return out
        args: list[int] = []
        for i, (z, x, y) in enumerate(coords):
            args += (i, z, x, tms_row(z, y))
        try:
            positions, joined = next(self._query(_read_many_sql(len(coords)), tuple(args)))
        except CorpusError:
            return super().read_many(coords)
        if positions is None:
            return out
        view = memoryview(joined or b"")
        offset = 0
        for item in str(positions).split(","):
            index, _, length = item.partition(":")
            size = int(length)
            out[int(index)] = bytes(view[offset : offset + size])
            offset += size
        return out if offset == len(view) else super().read_many(coords)

    def _query(self, sql: str, args: tuple[int, ...]) -> Iterator[tuple[Any, ...]]:
        """The rows of one statement, within QUERY_DEADLINE_S of its start."""
        try:
            start_clock(self._db)
            yield from self._db.execute(sql, args)
        except sqlite3.DatabaseError as exc:
            if "interrupted" in str(exc):
                raise query_error(self.path, exc) from exc
            raise CorpusError(f"corpus: cannot read tiles from {self.path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()


def _blob(value: bytes | None) -> bytes:
    """A ``tile_data`` value, which every query reads through SQLite's ``CAST(... AS
    BLOB)``: text is its UTF-8, a number its text as SQLite writes it. So selection,
    ``read`` and ``read_many`` see the same bytes; only a real blob then decodes. NULL
    reads as empty."""
    return b"" if value is None else bytes(value)


_READ_MANY_MAX = 200  # tiles in one statement of MBTilesCorpus.read_many


@lru_cache(maxsize=64)
def _read_many_sql(n: int) -> str:
    """The tiles of ``n`` coordinates, each found through the MBTiles index, joined:
    ``i:length`` of each found tile in join order, and their bytes end to end (a
    NULL tile is empty bytes, as :meth:`MBTilesCorpus.read` reads it)."""
    want = ",".join(["(?, ?, ?, ?)"] * n)
    return (
        f"WITH want(i, z, x, y) AS (VALUES {want})"
        " SELECT group_concat(want.i || ':' || length(CAST(coalesce(t.tile_data, x'') AS BLOB))),"
        " CAST(group_concat(CAST(coalesce(t.tile_data, x'') AS BLOB), '') AS BLOB)"
        " FROM want CROSS JOIN tiles AS t"
        " ON t.zoom_level = want.z AND t.tile_column = want.x AND t.tile_row = want.y"
    )


def _canonical_number(text: str) -> bool:
    return text.isdigit() and str(int(text)) == text


class XYZCorpus(Corpus):
    """A folder laid out as ``z/x/y.<ext>`` (jpg, jpeg, png or webp)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not any(p.is_dir() and p.name.isdigit() for p in path.iterdir()):
            raise CorpusError(f"corpus: {path} has no zoom folders (expected z/x/y.jpg)")

    def iter_range(
        self, z: int, x0: int, x1: int, y0: int, y1: int
    ) -> Iterator[tuple[int, int, bytes]]:
        zdir = self.path / str(z)
        if not zdir.is_dir():
            return
        for xdir in zdir.iterdir():
            if not (_canonical_number(xdir.name) and x0 <= int(xdir.name) <= x1):
                continue
            seen: set[int] = set()
            # One tile per (x, y): the same suffix order read() uses; names like
            # "0335.jpg" are not tile 335.
            for suffix in _XYZ_SUFFIXES:
                for file in xdir.glob(f"*{suffix}"):
                    stem = file.name[: -len(suffix)]
                    if not _canonical_number(stem) or int(stem) in seen:
                        continue
                    if y0 <= int(stem) <= y1 and file.is_file():
                        seen.add(int(stem))
                        yield int(xdir.name), int(stem), file.read_bytes()

    def read(self, z: int, x: int, y: int) -> bytes:
        for suffix in _XYZ_SUFFIXES:
            file = self.path / str(z) / str(x) / f"{y}{suffix}"
            if file.is_file():
                return file.read_bytes()
        raise CorpusError(f"corpus: tile {z}/{x}/{y} is no longer in {self.path}")


def open_corpus(path: Path) -> Corpus:
    # Checked by stat alone: opening a FIFO would block.
    if problem := kind_problem(path, "file or folder"):
        raise CorpusError(f"corpus: {path} {problem}")
    if path.is_dir():
        return XYZCorpus(path)
    return MBTilesCorpus(path)


def fingerprint(tiles: tuple[Tile, ...]) -> str:
    digest = hashlib.sha256()
    for t in tiles:
        digest.update(f"{t.z}/{t.x}/{t.y} {t.sha256}\n".encode())
    return digest.hexdigest()


def select_tiles(
    corpus_path: Path,
    bbox: tuple[float, float, float, float],
    zoom_levels: tuple[int, ...],
    area: dict[str, Any] | None = None,
) -> TileSelection:
    """Select, hash and sort the tiles covering ``bbox`` at ``zoom_levels``; with an
    ``area`` (GeoJSON), the tiles that intersect the area instead."""
    tiles: list[Tile] = []
    with open_corpus(corpus_path) as corpus:
        for z, x0, x1, y0, y1 in _ranges(bbox, zoom_levels, area):
            for x, y, data in corpus.iter_range(z, x0, x1, y0, y1):
                tiles.append(Tile(z, x, y, hashlib.sha256(data).hexdigest()))
    tiles.sort()
    selected = tuple(tiles)
    return TileSelection(selected, fingerprint(selected))


def _ranges(
    bbox: tuple[float, float, float, float],
    zoom_levels: tuple[int, ...],
    area: dict[str, Any] | None,
) -> Iterator[tuple[int, int, int, int, int]]:
    """``(z, x0, x1, y0, y1)`` ranges to read: the bbox's per zoom, or the area's runs of
    adjacent tiles in each row (a corridor reads a corridor, never its bbox)."""
    if area is None:
        for z in zoom_levels:
            yield (z, *tile_range(bbox, z))
        return
    from takeoff_cache.tiles.area import area_spans  # shapely: only requests with an area

    # Row by row as the area is cut: a continent's tiles are never all listed.
    for z, y, first, last in area_spans(area, zoom_levels):
        yield z, first, last, y, y
