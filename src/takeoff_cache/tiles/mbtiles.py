"""The writable side of an MBTiles corpus: what downloads store tiles into.

The file is MBTiles 1.3 as :mod:`takeoff_cache.tiles.corpus` reads it: a ``metadata``
table (name, format, bounds, minzoom, maxzoom, attribution, type, version) and a
``tiles`` table with TMS rows (south origin) under a unique index. A
``tile_fetch`` table beside them records, per tile, its SHA-256 and the HTTP
validators it came with (ETag, Last-Modified) and when it was fetched, so a
later run can revalidate old tiles instead of fetching them again.

While a download runs the file is in WAL mode and commits every few dozen
tiles: a process killed at any instant leaves a file every reader opens (even a
read-only one: a rolled-back journal would need a writer first) holding every
committed tile; the next run fetches only the rest. A thread of the writer's
own folds the log back into the file after each commit (a passive checkpoint,
which never holds up the writer), so the log stays small and a clean close has
little left to fold: a finished corpus is one self-contained file again.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from takeoff_cache.core.tilemath import tile_bounds, tms_row
from takeoff_cache.errors import CacheIOError, CorpusError

Coord = tuple[int, int, int]
Row = TypeVar("Row")

# The MBTiles tables, defined here only: every MBTiles file this project writes
# (downloads, the companion's subset, the demo corpus) gets them from create_schema.
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS metadata (name TEXT, value TEXT)",
    "CREATE TABLE IF NOT EXISTS tiles (zoom_level INTEGER, tile_column INTEGER,"
    " tile_row INTEGER, tile_data BLOB)",
    "CREATE UNIQUE INDEX IF NOT EXISTS tile_index ON tiles (zoom_level, tile_column, tile_row)",
)


# Rows that are tile addresses: integer zoom 0..30, column and row inside its grid.
# Files made elsewhere may hold others (a negative zoom, text in a number's column,
# a row past the grid): no selection can ask for them, so they are skipped
# everywhere, never an error, and do not count in bounds, zooms or sizes.
TILE_ADDRESS = (
    "typeof(zoom_level) = 'integer' AND zoom_level BETWEEN 0 AND 30"
    " AND typeof(tile_column) = 'integer' AND typeof(tile_row) = 'integer'"
    " AND tile_column BETWEEN 0 AND (1 << zoom_level) - 1"
    " AND tile_row BETWEEN 0 AND (1 << zoom_level) - 1"
)

# The longest one statement on a corpus may run. A ``tiles`` view can be any SQL,
# a recursive one that never ends included: past this, it is interrupted.
QUERY_DEADLINE_S = 30.0
_PROGRESS_STEPS = 10_000  # SQLite instructions between two looks at the clock


def start_clock(db: sqlite3.Connection, seconds: float | None = None) -> None:
    """Interrupt ``db``'s statements once ``seconds`` (default QUERY_DEADLINE_S) from
    now have passed; each statement that must stay bounded starts its own clock."""
    until = time.monotonic() + (QUERY_DEADLINE_S if seconds is None else seconds)
    db.set_progress_handler(lambda: time.monotonic() > until, _PROGRESS_STEPS)


def bounded_rows(rows: Iterable[Row], limit: int, path: Path) -> Iterator[Row]:
    """``rows``, refused past ``limit``: more rows than tiles in the range asked for
    means a ``tiles`` view that repeats rows (or never stops)."""
    try:
        for n, row in enumerate(rows, 1):
            if n > limit:
                raise CorpusError(
                    f"corpus: {path} answers more than {limit:,} rows for {limit:,} tiles;"
                    " its 'tiles' table or view repeats tiles"
                )
            yield row
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # the statement ends now, while its database is open


def query_error(path: Path, exc: sqlite3.DatabaseError) -> CorpusError:
    """The one-line error of a failed statement on corpus ``path``."""
    if "interrupted" in str(exc):
        return CorpusError(
            f"corpus: reading {path} took longer than {QUERY_DEADLINE_S:g} s and was stopped;"
            " its 'tiles' view may never end"
        )
    return CorpusError(f"corpus: {path} is not a readable MBTiles file: {exc}")


def create_schema(db: sqlite3.Connection) -> None:
    """Create the ``metadata`` and ``tiles`` tables and the tiles' unique index where missing."""
    for statement in _SCHEMA:
        db.execute(statement)


@dataclass(frozen=True)
class StoredTile:
    """What the corpus knows of one tile it holds."""

    sha256: str | None
    etag: str | None
    last_modified: str | None
    fetched_at: float | None  # Unix time; None for tiles that came from elsewhere


def stored_tiles(path: Path, coords: Iterable[Coord]) -> dict[Coord, StoredTile]:
    """Which of ``coords`` an MBTiles file already holds, read-only; {} if there is no file."""
    wanted = set(coords)
    if not path.exists() or not wanted:
        return {}
    if path.is_dir():
        raise CorpusError(f"corpus: {path} is a folder; tiles are downloaded into an MBTiles file")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise CorpusError(f"corpus: cannot open {path}: {exc}") from exc
    try:
        return _stored(db, wanted, path)
    except sqlite3.DatabaseError as exc:
        raise query_error(path, exc) from exc
    finally:
        db.close()


def mean_tile_bytes(path: Path) -> dict[int, float]:
    """Average stored tile size per zoom level (the dry run's byte estimate)."""
    if not path.is_file():
        return {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise CorpusError(f"corpus: cannot open {path}: {exc}") from exc
    try:
        start_clock(db)
        rows = db.execute(
            "SELECT zoom_level, avg(length(tile_data)) FROM tiles"
            f" WHERE {TILE_ADDRESS} GROUP BY zoom_level"
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise query_error(path, exc) from exc
    finally:
        db.close()
    return {int(z): float(size) for z, size in rows if size is not None}


def _stored(db: sqlite3.Connection, wanted: set[Coord], path: Path) -> dict[Coord, StoredTile]:
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    if "tiles" not in names:
        raise sqlite3.DatabaseError("no 'tiles' table")
    out: dict[Coord, StoredTile] = {}
    by_zoom: dict[int, list[Coord]] = {}
    for c in wanted:
        by_zoom.setdefault(c[0], []).append(c)
    for z, cs in by_zoom.items():
        # One range query per zoom over the wanted tiles' extent; the index answers it.
        x0, x1 = min(c[1] for c in cs), max(c[1] for c in cs)
        r0, r1 = tms_row(z, max(c[2] for c in cs)), tms_row(z, min(c[2] for c in cs))
        args = (z, x0, x1, r0, r1)
        cells = (x1 - x0 + 1) * (r1 - r0 + 1)
        where = "zoom_level = ? AND tile_column BETWEEN ? AND ? AND tile_row BETWEEN ? AND ?"
        start_clock(db)
        rows = db.execute(
            f"SELECT tile_column, tile_row FROM tiles WHERE {where} AND {TILE_ADDRESS}", args
        )
        for x, row in bounded_rows(rows, cells, path):
            c = (z, int(x), tms_row(z, int(row)))
            if c in wanted:
                out[c] = StoredTile(None, None, None, None)
        if "tile_fetch" in names:
            start_clock(db)
            fetches = db.execute(
                "SELECT tile_column, tile_row, sha256, etag, last_modified, fetched_at"
                f" FROM tile_fetch WHERE {where} AND {TILE_ADDRESS}",
                args,
            )
            for x, row, sha, etag, modified, at in bounded_rows(fetches, cells, path):
                c = (z, int(x), tms_row(z, int(row)))
                if c in out:
                    out[c] = StoredTile(sha, etag, modified, at)
    return out


class MBTilesWriter:
    """Adds tiles to an MBTiles file, creating it when missing; commits in small batches."""

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        attribution: str,
        tile_format: str = "jpg",
        commit_every: int = 64,
        commit_interval_s: float = 1.0,
        planned: Iterable[Coord] = (),
    ) -> None:
        """``planned``: the tiles about to be added, so that bounds and zooms cover them
        from the first commit on (a kill keeps them true); close() narrows them to
        what the file holds."""
        if path.is_dir():
            raise CorpusError(
                f"corpus: {path} is a folder; tiles are downloaded into an MBTiles file"
            )
        if not path.parent.is_dir():
            raise CorpusError(f"corpus: the folder of {path} does not exist")
        self.path = path
        self._commit_every = commit_every
        self._commit_interval_s = commit_interval_s
        self._pending = 0
        self._last_commit = time.monotonic()
        self._tiles: list[tuple[int, int, int, bytes]] = []
        self._fetches: list[tuple[object, ...]] = []
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # A new file only (it is fixed once a table exists): a 20 kB tile then sits in
            # one page, not in a chain of overflow pages that each cost a write.
            self._db.execute("PRAGMA page_size=65536")
            self._db.execute("PRAGMA journal_mode=WAL")
            # A kill loses at most the open batch; only power loss could cost a commit.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._create(name, attribution, tile_format, planned)
            self._db.execute("BEGIN")
        except sqlite3.DatabaseError as exc:
            raise CorpusError(f"corpus: cannot write tiles into {path}: {exc}") from exc
        self._checkpointer = _Checkpointer(path)

    def _create(
        self, name: str, attribution: str, tile_format: str, planned: Iterable[Coord]
    ) -> None:
        db = self._db
        kinds = dict(db.execute("SELECT name, type FROM sqlite_master").fetchall())
        if kinds.get("tiles") == "view":
            raise CorpusError(
                f"corpus: {self.path} keeps tiles in a view (map/images); download into a new file"
            )
        db.execute("BEGIN IMMEDIATE")
        create_schema(db)
        db.execute(
            "CREATE TABLE IF NOT EXISTS tile_fetch (zoom_level INTEGER, tile_column INTEGER,"
            " tile_row INTEGER, sha256 TEXT, etag TEXT, last_modified TEXT, fetched_at REAL,"
            " PRIMARY KEY (zoom_level, tile_column, tile_row))"
        )
        meta = dict(db.execute("SELECT name, value FROM metadata").fetchall())
        # A corpus made elsewhere keeps its own name and format; ours get them now,
        # so the file is MBTiles 1.3 from its first commit on.
        defaults = {"name": name, "format": tile_format, "type": "baselayer", "version": "1"}
        for key, value in defaults.items():
            if not meta.get(key):
                self._set_meta(key, value)
        if attribution:
            self._set_meta("attribution", attribution)
        self._update_extent(planned)
        db.execute("COMMIT")

    def _set_meta(self, key: str, value: str) -> None:
        # No unique index on metadata.name in files made elsewhere: replace by hand.
        self._db.execute("DELETE FROM metadata WHERE name = ?", (key,))
        self._db.execute("INSERT INTO metadata (name, value) VALUES (?, ?)", (key, value))

    def put(
        self,
        coord: Coord,
        data: bytes,
        sha256: str,
        etag: str | None,
        last_modified: str | None,
        fetched_at: float,
    ) -> None:
        """Store (or replace) one tile and what it was fetched with, at the next commit."""
        z, x, y = coord
        row = tms_row(z, y)
        self._tiles.append((z, x, row, data))
        self._fetches.append((z, x, row, sha256, etag, last_modified, fetched_at))
        self._step()

    def renew(
        self,
        coord: Coord,
        sha256: str | None,
        etag: str | None,
        last_modified: str | None,
        at: float,
    ) -> None:
        """A revalidated tile: same bytes, fresh age (and the server's newest validators)."""
        z, x, y = coord
        self._fetches.append((z, x, tms_row(z, y), sha256, etag, last_modified, at))
        self._step()

    def set_format(self, tile_format: str) -> None:
        self._write("DELETE FROM metadata WHERE name = 'format'", ())
        self._write("INSERT INTO metadata (name, value) VALUES ('format', ?)", (tile_format,))

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        try:
            self._db.execute(sql, args)
        except sqlite3.OperationalError as exc:
            raise self._io_error("write", exc) from exc

    def _io_error(self, doing: str, exc: sqlite3.Error) -> CacheIOError:
        """A failed write, in one line; a full disk (CacheIOError, exit 1) says so."""
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return CacheIOError(
                f"corpus: cannot {doing} {self.path}: no space left on its device; free some"
                " and run again (tiles committed so far are kept)"
            )
        return CacheIOError(f"corpus: cannot {doing} {self.path}: {exc}")

    def _step(self) -> None:
        self._pending = len(self._fetches)
        now = time.monotonic()
        if (
            self._pending >= self._commit_every
            or now - self._last_commit >= self._commit_interval_s
        ):
            self.commit()

    def commit_if_due(self) -> None:
        """Commit pending tiles once the commit interval has passed, batch full or not."""
        if self._pending and time.monotonic() - self._last_commit >= self._commit_interval_s:
            self.commit()

    def commit(self) -> None:
        """Make every stored tile durable against a kill; start the next batch."""
        try:
            # One statement a batch: per-tile statements cost more than the writes.
            self._db.executemany(
                "INSERT OR REPLACE INTO tiles (zoom_level, tile_column, tile_row, tile_data)"
                " VALUES (?, ?, ?, ?)",
                self._tiles,
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO tile_fetch VALUES (?, ?, ?, ?, ?, ?, ?)", self._fetches
            )
            self._db.execute("COMMIT")
            self._db.execute("BEGIN")
        except sqlite3.OperationalError as exc:
            raise self._io_error("commit tiles to", exc) from exc
        self._tiles.clear()
        self._fetches.clear()
        self._pending = 0
        self._last_commit = time.monotonic()
        self._checkpointer.wake()

    def close(self) -> None:
        """Commit, set bounds and zooms from what the file holds, fold the WAL back in."""
        self._checkpointer.stop()
        try:
            self.commit()
            self._update_extent()
            self._db.execute("COMMIT")
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.execute("PRAGMA journal_mode=DELETE")
            except sqlite3.OperationalError:
                pass  # a reader holds the file open: it stays in WAL mode, just as valid
        except sqlite3.OperationalError as exc:
            raise self._io_error("finish", exc) from exc
        finally:
            self._db.close()

    def _update_extent(self, planned: Iterable[Coord] = ()) -> None:
        extent: dict[int, list[int]] = {}  # z -> [x0, x1, row0, row1]
        rows = self._db.execute(
            "SELECT zoom_level, min(tile_column), max(tile_column), min(tile_row), max(tile_row)"
            f" FROM tiles WHERE {TILE_ADDRESS} GROUP BY zoom_level"
        ).fetchall()
        for z, x0, x1, r0, r1 in rows:
            extent[int(z)] = [int(x0), int(x1), int(r0), int(r1)]
        for z, x, y in planned:
            row = tms_row(z, y)
            e = extent.setdefault(z, [x, x, row, row])
            e[:] = [min(e[0], x), max(e[1], x), min(e[2], row), max(e[3], row)]
        if not extent:
            return
        lon_min = lat_min = 180.0
        lon_max = lat_max = -180.0
        for z, (x0, x1, r0, r1) in extent.items():
            # TMS row r0 is the southernmost; tile_bounds takes XYZ rows.
            south, west, _, _ = tile_bounds(z, x0, tms_row(z, r0))
            _, _, north, east = tile_bounds(z, x1, tms_row(z, r1))
            lon_min, lat_min = min(lon_min, west), min(lat_min, south)
            lon_max, lat_max = max(lon_max, east), max(lat_max, north)
        self._set_meta("bounds", f"{lon_min!r},{lat_min!r},{lon_max!r},{lat_max!r}")
        self._set_meta("minzoom", str(min(extent)))
        self._set_meta("maxzoom", str(max(extent)))

    def __enter__(self) -> MBTilesWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None:
            self.close()
            return
        # Leaving on an error (a full disk, a stop): keep what can be committed, and
        # let that error be the one told; a second failure here would only repeat it.
        with contextlib.suppress(CacheIOError, sqlite3.Error):
            self.close()


class _Checkpointer:
    """Copies committed pages from the WAL into the file while the writer goes on.

    Done at close instead, the copy of a whole download's log is the last thing
    the download waits for; here it overlaps the fetching (SQLite lets go of the
    GIL). A passive checkpoint takes no lock the writer waits on, and once it has
    copied every frame the writer starts the log over from its beginning."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._due = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="mbtiles-checkpoint", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._due.set()

    def stop(self) -> None:
        self._done = True
        self._due.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self._path, isolation_level=None)
        except sqlite3.Error:
            return  # the close's own checkpoint does it all
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            while True:
                self._due.wait()
                self._due.clear()
                if self._done:
                    return
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            return  # likewise: a failed copy here costs only time at close
        finally:
            db.close()
