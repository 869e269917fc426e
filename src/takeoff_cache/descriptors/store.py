"""The descriptor store: per-tile descriptors kept in the work folder between builds.

Rows are keyed by descriptor space (engine key, input spec, preprocessing)
and tile SHA-256, so a rebuild after a corpus change embeds only the tiles
that changed, and every cache of a work folder shares what was embedded.
Reads are per chunk of tiles, never a whole corpus at once.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from takeoff_cache.backbones.preprocess import PREPROCESS_ID
from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.core.canonical import content_key
from takeoff_cache.core.faults import checkpoint
from takeoff_cache.core.spaces import KEEP_SPACES, SPACE_IDLE_S, date_space, stale_spaces
from takeoff_cache.errors import DescriptorError

# Rows per store lookup and per index chunk: bounds memory, amortizes queries.
CHUNK_ROWS = 4096
_NORM_TOLERANCE = 1e-3


def descriptor_space(engine_key: str, spec: InputSpec) -> str:
    """Which descriptors are interchangeable: same engine, same input spec, same preprocessing.

    The engine key alone is not enough: mean/std and size live in the
    backbones file, not in the model bytes.
    """
    return content_key(
        {
            "engine_key": engine_key,
            "input": spec.identity(),
            "preprocess": PREPROCESS_ID,
        }
    )


def _valid_rows(
    n: int,
    found: list[tuple[int, bytes]],
    dim: int | None,
    out: Callable[[int], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stored rows ``(position, bytes)`` as an ``(n, dim)`` matrix, and which rows hold a
    whole vector: ``dim`` float32 values (by default the most common size), finite and
    unit length. Rows not valid are zeros. Checked for a whole chunk at once.

    ``out(dim)``, if given, returns the zeroed ``(n, dim)`` float32 array to fill (a slice
    of an index's storage, say); it is called only if some row is whole.
    """
    if dim is None:
        sizes = Counter(len(b) for _, b in found if type(b) is bytes and b and len(b) % 4 == 0)
        dim = max((count, size) for size, count in sizes.items())[1] // 4 if sizes else 0
    size = 4 * dim
    whole = [(i, b) for i, b in found if type(b) is bytes and len(b) == size]
    ok = np.zeros(n, dtype=bool)
    if not dim or not whole:
        return np.zeros((n, dim), dtype=np.float32), ok
    matrix = out(dim) if out is not None else np.zeros((n, dim), dtype=np.float32)
    # Each blob is copied once, straight into its row: no joined copy of the chunk.
    view = matrix.data.cast("B")
    for i, b in whole:
        view[i * size : (i + 1) * size] = b
    ok[[i for i, _ in whole]] = True
    return matrix, _unit_rows(matrix, ok)


def _gathered_rows(
    n: int,
    positions: str,
    joined: bytes,
    dim: int,
    out: Callable[[int], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_valid_rows` for rows that SQLite joined into one blob (every one whole),
    their positions given as ``"0,1,5,..."`` in the same order."""
    rows = np.array(positions.split(","), dtype=np.intp)
    matrix = out(dim) if out is not None else np.zeros((n, dim), dtype=np.float32)
    matrix[rows] = np.frombuffer(joined, dtype=np.float32).reshape(len(rows), dim)
    ok = np.zeros(n, dtype=bool)
    ok[rows] = True
    return matrix, _unit_rows(matrix, ok)


def _unit_rows(matrix: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``ok`` less the rows that are not finite unit vectors, which are zeroed."""
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.einsum("ij,ij->i", matrix, matrix)
    ok &= np.isfinite(norms) & (np.abs(norms - 1.0) <= 2 * _NORM_TOLERANCE)
    if not ok.all():
        matrix[~ok] = 0.0
    return ok


# The 32-byte digests packed in ?1 that have no row in space ?2.
_ABSENT_SQL = """
WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 32 FROM k WHERE i + 32 < length(?1))
SELECT substr(?1, i + 1, 32) FROM k WHERE NOT EXISTS
    (SELECT 1 FROM vectors AS v WHERE v.space = ?2 AND v.tile = substr(?1, i + 1, 32))
"""


# (position, stored vector) of each 32-byte digest packed in ?1 that has a row in space ?2.
# Positions say where each row goes, so SQLite need not sort the vectors (a
# temporary B-tree of every blob cost a third of the read).
_FOUND_SQL = """
WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 32 FROM k WHERE i + 32 < length(?1))
SELECT k.i / 32, v.vector
FROM k JOIN vectors AS v ON v.space = ?2 AND v.tile = substr(?1, k.i + 1, 32)
"""


# The same rows gathered by SQLite into one blob, with their positions as text, in
# one step of the statement: no Python object per row, and the GIL released
# throughout (decoding threads run meanwhile). Also what decides whether the
# blob can be used as is: how many rows, their smallest and largest sizes, and
# how many are not blobs at all.
_GATHER_SQL = """
WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 32 FROM k WHERE i + 32 < length(?1))
SELECT count(*), min(length(v.vector)), max(length(v.vector)),
    sum(typeof(v.vector) != 'blob'), group_concat(k.i / 32),
    CAST(group_concat(v.vector, '') AS BLOB)
FROM k JOIN vectors AS v ON v.space = ?2 AND v.tile = substr(?1, k.i + 1, 32)
"""
# A batch's rows written by one statement: the tiles' 32-byte digests end to end
# (?2) and their vectors end to end (?3, ?4 bytes each), cut apart by SQLite. The
# loop that stores batches then takes Python's GIL back once per batch, not once
# per row while the decoding threads queue for it.
_PUT_SQL = """
WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k WHERE i + 1 < length(?2) / 32)
INSERT OR REPLACE INTO vectors
SELECT ?1, substr(?2, 32 * i + 1, 32), substr(?3, ?4 * i + 1, ?4) FROM k
"""
# The joined blob is held two or three times over while it is made and copied: a
# chunk of wider rows than this allows is read one row at a time.
_GATHER_MAX_BYTES = 64 << 20


class DescriptorStore:
    """SQLite table of L2-normalized float32 descriptors, shared by every cache of a work folder.

    Rows are keyed by (descriptor space, tile SHA-256 as 32 bytes) through a
    unique index beside a plain rowid table: lookups touch the small index, not
    pages of vectors. Each batch is one transaction, and SQLite's write-ahead
    log makes it all-or-nothing, so a killed build never leaves a half-written
    vector. ``synchronous=NORMAL`` skips the fsync per commit: a power cut may
    lose the last batches (they are recomputed), never corrupt the table.
    Vectors that are not finite and unit-length are treated as absent, never
    served.

    Each descriptor space is dated when a build uses it, so that the vectors of
    spaces nobody uses any more (an engine replaced, a preprocessing changed)
    can go (:meth:`prune_spaces`).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._spaces: dict[str, int] = {}
        self._behind: threading.Thread | None = None
        self._db = sqlite3.connect(path, timeout=60, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS spaces"
                " (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, used REAL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS vectors (space INTEGER NOT NULL, tile BLOB NOT NULL,"
                " vector BLOB NOT NULL, UNIQUE (space, tile))"
            )
            self._db.commit()
            self._date_spaces()
        except sqlite3.Error as exc:
            self._db.close()
            raise DescriptorError(f"descriptor store {path}: {exc}") from exc

    def _date_spaces(self) -> None:
        """Give a store written before spaces were dated its ``used`` column; every
        space it holds counts as used now."""
        if any(row[1] == "used" for row in self._db.execute("PRAGMA table_info(spaces)")):
            return
        with self._db:
            # The write lock first: another build may be opening this store too.
            self._db.execute("BEGIN IMMEDIATE")
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(spaces)")}
            if "used" not in columns:
                self._db.execute("ALTER TABLE spaces ADD COLUMN used REAL")
                self._db.execute("UPDATE spaces SET used = ?", (time.time(),))

    def _space_id(self, space: str, *, create: bool) -> int | None:
        if space not in self._spaces:
            if create:
                self.mark_used(space)
            row = self._db.execute("SELECT id FROM spaces WHERE key = ?", (space,)).fetchone()
            if row is None:
                return None
            self._spaces[space] = int(row[0])
        return self._spaces[space]

    def vectors(
        self,
        space: str,
        shas: Sequence[str],
        dim: int | None,
        out: Callable[[int], np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Row i: the stored vector of ``shas[i]``; and which rows are valid (others are zeros).

        Call it per chunk, never for a whole corpus. The rows come back joined
        into one blob when they are all blobs of one size (:data:`_GATHER_SQL`),
        else one at a time; either way each is checked (:func:`_unit_rows`).
        ``out(dim)``, if given, returns the zeroed array the rows are read into
        (see :func:`_valid_rows`).
        """
        space_id = self._space_id(space, create=False)
        if space_id is None or not shas:
            return np.zeros((len(shas), dim or 0), dtype=np.float32), np.zeros(len(shas), bool)
        packed = bytes.fromhex("".join(shas))
        if len(shas) * (4 * dim if dim else self._row_size(space_id)) <= _GATHER_MAX_BYTES:
            count, low, high, not_blobs, positions, joined = self._db.execute(
                _GATHER_SQL, (packed, space_id)
            ).fetchone()
            if not count:
                return _valid_rows(len(shas), [], dim, out)
            size = 4 * dim if dim else low
            one_size = bool(size) and size % 4 == 0 and not not_blobs and low == high == size
            if one_size and len(joined) == count * size:
                return _gathered_rows(len(shas), positions, joined, size // 4, out)
        # Rows of several sizes or not blobs (a damaged store), or a chunk over the
        # budget: one row at a time.
        found = self._db.execute(_FOUND_SQL, (packed, space_id)).fetchall()
        return _valid_rows(len(shas), found, dim, out)

    def _row_size(self, space_id: int) -> int:
        """The size of one stored row of the space (0 if none): what a chunk's read costs."""
        row = self._db.execute(
            "SELECT length(vector) FROM vectors WHERE space = ? LIMIT 1", (space_id,)
        ).fetchone()
        return int(row[0]) if row else 0

    def get(self, space: str, shas: Sequence[str], dim: int | None) -> dict[str, np.ndarray]:
        matrix, ok = self.vectors(space, shas, dim)
        return {sha: matrix[i] for i, sha in enumerate(shas) if ok[i]}

    def missing(self, space: str, shas: Sequence[str]) -> set[str]:
        """Which of ``shas`` have no stored row.

        Asked for every tile of a rebuild, so SQLite does the work: the digests
        go in as one blob, a recursive query walks it against the (space, tile)
        index, and only the (few) absent ones come back; no vector is read. A
        damaged row (not whole, not finite, not unit length) is caught when the
        index is written, which reads every vector anyway
        (:class:`MissingDescriptorsError`); the build then forgets it and
        embeds the tile again.
        """
        space_id = self._space_id(space, create=False)
        if space_id is None:
            return set(shas)
        absent: set[str] = set()
        for start in range(0, len(shas), CHUNK_ROWS):
            packed = bytes.fromhex("".join(shas[start : start + CHUNK_ROWS]))
            rows = self._db.execute(_ABSENT_SQL, (packed, space_id))
            absent.update(tile.hex() for (tile,) in rows)
        return absent

    def forget(self, space: str, shas: Sequence[str]) -> None:
        """Drop the rows of ``shas`` (damaged ones) so that they are embedded again."""
        space_id = self._space_id(space, create=False)
        if space_id is None:
            return
        with self._db:
            self._db.executemany(
                "DELETE FROM vectors WHERE space = ? AND tile = ?",
                [(space_id, bytes.fromhex(sha)) for sha in shas],
            )

    def put(self, space: str, shas: Sequence[str], vectors: np.ndarray) -> None:
        """Store row i of ``vectors`` as the vector of ``shas[i]``, in one transaction."""
        rows = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(shas) != len(rows):
            raise ValueError(f"{len(shas)} digests for {len(rows)} vectors")
        if not shas:
            return
        space_id = self._space_id(space, create=True)
        with self._db:
            self._db.execute(
                _PUT_SQL, (space_id, bytes.fromhex("".join(shas)), rows.tobytes(), rows[0].nbytes)
            )
        checkpoint("descriptors.batch_stored")  # the batch is durable in the store

    def mark_used(self, space: str, now: float | None = None) -> None:
        """Date ``space`` as used now, creating it if it is new."""
        date_space(self._db, space, now)

    def prune_spaces(
        self, *, keep: int = KEEP_SPACES, idle_s: float = SPACE_IDLE_S, now: float | None = None
    ) -> list[str]:
        """Delete every vector of the spaces that are neither among the ``keep`` most
        recently used nor used in the last ``idle_s`` seconds; return their keys.

        One transaction under the write lock, so a build that dates a space
        meanwhile either keeps it or finds it gone and starts it afresh. The file
        does not shrink: SQLite reuses the freed pages for new vectors.
        """
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._db.execute("SELECT id, key, used FROM spaces").fetchall()
            gone = stale_spaces(rows, keep=keep, idle_s=idle_s, now=now)
            for space_id, _ in gone:
                self._db.execute("DELETE FROM vectors WHERE space = ?", (space_id,))
                self._db.execute("DELETE FROM spaces WHERE id = ?", (space_id,))
        for _, key in gone:
            self._spaces.pop(key, None)
        return [key for _, key in gone]

    def checkpoint_behind(self) -> None:
        """Start copying the write-ahead log into the store's file, on a thread of its own.

        Closing the last connection does that copy and syncs the file, which is
        slow on a slow disk; done behind the caller's back, while it still reads,
        the close finds nothing left to copy. A failed copy loses nothing: the
        log stays, and the close copies it.
        """

        def copy() -> None:
            with contextlib.suppress(sqlite3.Error):
                db = sqlite3.connect(self.path, timeout=60)
                try:
                    # PASSIVE: never waits for, nor blocks, this store's readers.
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                finally:
                    db.close()  # not the last connection: no checkpoint of its own

        if self._behind is None:
            self._behind = threading.Thread(target=copy, name="descriptor-store-checkpoint")
            self._behind.start()

    def close(self) -> None:
        if self._behind is not None:
            self._behind.join()
            self._behind = None
        self._db.close()


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return out


def prune_store(path: Path) -> list[str]:
    """Prune the descriptor store at ``path`` (see :meth:`DescriptorStore.prune_spaces`)."""
    if not path.is_file():
        return []
    store = DescriptorStore(path)
    try:
        return store.prune_spaces()
    except sqlite3.Error as exc:
        raise DescriptorError(f"descriptor store {path}: {exc}") from exc
    finally:
        store.close()
