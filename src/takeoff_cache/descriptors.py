"""The descriptors phase: embed the selected tiles, reuse what was embedded before, write the index.

Embedding is a pipeline: worker threads read and decode batches (Pillow,
SQLite and NumPy release the GIL) into reusable buffers while the engine
infers earlier batches, as many at once as it runs in parallel
(``Runner.streams``) plus one queued behind them, so the engine never waits
while a finished batch is stored, and only a few batches are ever in flight.
On a CPU host decoding and inference share the cores: per demo tile, reading,
decoding and normalizing take ~0.45 CPU-ms against ~1.25 for inference, so
the phase reaches about 0.7 of the engine's own throughput, which is that CPU
work's bound. Given a core of its own, as an engine on an accelerator is, the
engine runs at ~0.93 of its own throughput and decoding is hidden
(benchmarks/embed.py measures all of these).

Per-tile descriptors live in the descriptor store of the work folder, keyed
by descriptor space (engine key, input spec, preprocessing) and tile SHA-256,
so a rebuild after a corpus change embeds only the tiles that changed.

Nothing corpus-sized is held in memory but the index itself: the store is
looked up and the index filled chunk by chunk, in row order.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import UnidentifiedImageError
from PIL.Image import DecompressionBombError

from .backbones import InputSpec
from .canonical import content_key
from .corpus import Corpus, Tile, TileSelection, open_corpus
from .errors import CorpusError, DescriptorError, MissingDescriptorsError
from .faults import checkpoint
from .fsutil import fsync_dir, fsync_file, sha256_file, sha256_stream
from .preprocess import PREPROCESS_ID, Normalizer, decode_into
from .workdir import index_files

if TYPE_CHECKING:
    import faiss

Progress = Callable[[int, int], None]
METRIC = "inner_product"  # on L2-normalized vectors: cosine similarity

# Up to this many tiles the index is exact (brute force); a query over 100k
# 336-d vectors is ~34 M multiply-adds, a few ms even on a Jetson CPU.
EXACT_INDEX_MAX = 100_000
# An approximate index must find the exact top-1 for this share of held-out queries.
RECALL_TARGET = 0.99
# IVF lists keep full float32 vectors up to this size, 8-bit scalar codes beyond it.
FLAT_CODES_MAX_BYTES = 2 << 30
INDEX_FORMAT = 2

BATCH_SIZE = 32
# A lookup that finds only a few tiles to embed (a rebuild after a small change)
# cuts them into at least SMALL_JOB_SPLIT batches of at least MIN_BATCH tiles:
# the first decoded batch reaches the engine sooner, each engine stream gets
# work, and a fresh engine's first run, which allocates its working memory,
# is smaller. Inference costs the same per tile at these sizes.
MIN_BATCH = 8
SMALL_JOB_SPLIT = 4
# Descriptor spaces the store keeps however long unused (most recently used
# first); beyond them, a space goes once unused for a week. A pruned space is
# only work to redo: its tiles are embedded again by the next build that needs it.
KEEP_SPACES = 4
SPACE_IDLE_S = 7 * 24 * 3600.0
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
            "input": {
                "name": spec.name,
                "size": spec.size,
                "channels": spec.channels,
                "mean": list(spec.mean),
                "std": list(spec.std),
            },
            "preprocess": PREPROCESS_ID,
        }
    )


def descriptor_key(space: str, fingerprint: str) -> str:
    """Content key of an index: its descriptors, its tiles and the index policy."""
    return content_key(
        {
            "descriptor_space": space,
            "corpus_fingerprint": fingerprint,
            "metric": METRIC,
            "exact_index_max": EXACT_INDEX_MAX,
            "recall_target": RECALL_TARGET,
            "flat_codes_max_bytes": FLAT_CODES_MAX_BYTES,
            "format": INDEX_FORMAT,
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

    def have(self, space: str, shas: Sequence[str]) -> set[str]:
        """Which of ``shas`` have a stored row."""
        return set(shas) - self.missing(space, shas)

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

    def mark_used(self, space: str, now: float | None = None) -> None:
        """Date ``space`` as used now, creating it if it is new."""
        with self._db:
            self._db.execute(
                "INSERT INTO spaces (key, used) VALUES (?1, ?2)"
                " ON CONFLICT (key) DO UPDATE SET used = ?2",
                (space, time.time() if now is None else now),
            )

    def prune_spaces(
        self, *, keep: int = KEEP_SPACES, idle_s: float = SPACE_IDLE_S, now: float | None = None
    ) -> list[str]:
        """Delete every vector of the spaces that are neither among the ``keep`` most
        recently used nor used in the last ``idle_s`` seconds; return their keys.

        One transaction under the write lock, so a build that dates a space
        meanwhile either keeps it or finds it gone and starts it afresh. The file
        does not shrink: SQLite reuses the freed pages for new vectors.
        """
        now = time.time() if now is None else now
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._db.execute(
                "SELECT id, key, used FROM spaces ORDER BY used DESC NULLS LAST"
            ).fetchall()
            gone = [(i, key) for i, key, used in rows[keep:] if now - (used or 0.0) > idle_s]
            for space_id, _ in gone:
                self._db.execute("DELETE FROM vectors WHERE space = ?", (space_id,))
                self._db.execute("DELETE FROM spaces WHERE id = ?", (space_id,))
        for _, key in gone:
            self._spaces.pop(key, None)
        return [key for _, key in gone]

    def integrity_problems(self) -> list[str]:
        """SQLite's own check of the file; empty when the database is sound."""
        rows = [str(r[0]) for r in self._db.execute("PRAGMA integrity_check")]
        return [] if rows == ["ok"] else rows

    def checkpoint_behind(self) -> None:
        """Start copying the write-ahead log into the store's file, on a thread of its own.

        Closing the last connection does that copy and syncs the file (15-30 ms
        on a slow disk); done behind the caller's back, while it still reads,
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


@dataclass
class EmbedStats:
    """Seconds spent per stage, summed over threads (so stages may add up to more than wall)."""

    read_s: float = 0.0
    decode_s: float = 0.0
    preprocess_s: float = 0.0
    inference_s: float = 0.0
    store_s: float = 0.0
    lookup_s: float = 0.0
    wait_s: float = 0.0  # inference thread idle, waiting for a decoded batch
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class EmbedResult:
    generated: int
    reused: int
    bad_tiles: tuple[str, ...]  # "z/x/y: reason", in tile order


@dataclass(frozen=True)
class IndexFiles:
    index_path: str
    map_path: str
    dimension: int
    count: int
    index_sha256: str
    map_sha256: str
    index_type: str = "Flat"
    nprobe: int | None = None
    recall_at_1: float = 1.0
    recall_queries: int = 0


class ExactRows:
    """The rows of an exact index, filled in place as their vectors become known.

    The lookup that decides which tiles to embed reads the stored vectors
    straight into the index's own storage (:func:`todo_batches`), so writing
    the index afterwards only reads the rows still unfilled: the embedded
    ones. A rebuild walks the store once instead of twice, and copies no row
    into the index. Rows are ``(n, dim)`` float32, allocated at the first
    vector read (or by :meth:`allocate`).
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.index: faiss.Index | None = None
        self.matrix: np.ndarray | None = None
        self.filled = np.zeros(n, dtype=bool)

    @property
    def dim(self) -> int | None:
        return None if self.matrix is None else int(self.matrix.shape[1])

    def allocate(self, dim: int) -> None:
        import faiss

        index = faiss.IndexFlatIP(dim)
        # The index's own storage, written through a view: no second copy of the rows.
        index.codes.resize(self.n * dim * 4)
        index.ntotal = self.n
        self.matrix = faiss.rev_swig_ptr(index.get_xb(), self.n * dim).reshape(self.n, dim)
        self.index = index

    def fill(self, start: int, positions: np.ndarray, block: np.ndarray, ok: np.ndarray) -> None:
        """Rows ``start + positions[i]`` (allocated) take ``block[i]`` where ``ok[i]``."""
        assert self.matrix is not None
        rows = start + positions[ok]
        self.matrix[rows] = block[ok]
        self.filled[rows] = True

    def read_stored(
        self, store: DescriptorStore, space: str, start: int, chunk: Sequence[Tile]
    ) -> set[str]:
        """Fill the rows of ``chunk`` (from row ``start``) that the store holds whole;
        return the digests of the others. The store writes them in place."""

        def rows(dim: int) -> np.ndarray:
            if self.matrix is None:
                self.allocate(dim)
            assert self.matrix is not None
            return self.matrix[start : start + len(chunk)]

        _, ok = store.vectors(space, [t.sha256 for t in chunk], self.dim, rows)
        self.filled[start : start + len(chunk)] |= ok
        return {t.sha256 for t, whole in zip(chunk, ok.tolist(), strict=True) if not whole}


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return out


def _reason(exc: BaseException) -> str:
    """A short, stable reason for an operator (no object addresses, no byte counts)."""
    if isinstance(exc, CorpusError):
        return "gone from the corpus"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if isinstance(exc, DecompressionBombError):
        return "image too large"
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "truncated" in text.lower():
        return "truncated"
    return f"{type(exc).__name__}: {text[:60]}" if text else type(exc).__name__


# What Pillow raises for bytes that are not a complete image.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, DecompressionBombError)


@dataclass
class _Decoded:
    tiles: list[Tile]
    batch: np.ndarray  # the whole reusable buffer; rows [:len(tiles)] are filled
    bad: list[tuple[Tile, str]]
    read_s: float
    decode_s: float
    preprocess_s: float


class _Decoder:
    """Reads and decodes batches in worker threads into reusable buffers.

    Each thread keeps its own corpus handle and uint8 scratch batch; float
    batches come from a small free list that the inference loop refills.
    """

    def __init__(self, corpus_path: Path, spec: InputSpec, batch_size: int) -> None:
        self._corpus_path = corpus_path
        self._spec = spec
        self._batch_size = batch_size
        self._normalize = Normalizer.for_spec(spec)
        self._local = threading.local()
        self._opened: list[Corpus] = []
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def _thread_state(self) -> tuple[Corpus, np.ndarray]:
        state = getattr(self._local, "state", None)
        if state is None:
            spec = self._spec
            corpus = open_corpus(self._corpus_path)
            pixels = np.empty(
                (self._batch_size, spec.size, spec.size, spec.channels), dtype=np.uint8
            )
            state = (corpus, pixels)
            self._local.state = state
            with self._lock:
                self._opened.append(corpus)
        return state  # type: ignore[no-any-return]

    def _take_buffer(self) -> np.ndarray:
        with self._lock:
            if self._free:
                return self._free.pop()
        spec = self._spec
        return np.empty((self._batch_size, spec.channels, spec.size, spec.size), dtype=np.float32)

    def give_back(self, buffer: np.ndarray) -> None:
        with self._lock:
            self._free.append(buffer)

    def __call__(self, tiles: list[Tile]) -> _Decoded:
        corpus, pixels = self._thread_state()
        t0 = time.perf_counter()
        data = read_tiles(corpus, tiles)
        t1 = time.perf_counter()
        good, bad = decode_rows(tiles, data, self._spec, pixels)
        t2 = time.perf_counter()
        batch = self._take_buffer()
        if good:
            self._normalize(pixels[: len(good)], batch[: len(good)])
        return _Decoded(good, batch, bad, t1 - t0, t2 - t1, time.perf_counter() - t2)

    def close(self) -> None:
        for corpus in self._opened:
            corpus.close()


def decode_workers(on_accelerator: bool = False) -> int:
    """Decoding threads for an engine that runs on the CPU, or on an accelerator.

    An engine on the CPU keeps every core busy itself: past four decoding
    threads, a 16-core host embedded slower (7,150 tiles/s with 4, 6,100 with
    15). An engine on a GPU leaves the cores to decoding, bar one for the loop
    that stores and one for the engine's calls; on 16 cores the phase peaked at
    12 threads (14,100 tiles/s with an instant engine; 12,000 with 14, where
    threads start to queue for Python's GIL).
    """
    cores = len(os.sched_getaffinity(0))
    cpu = max(1, min(4, cores))
    return max(cpu, min(12, cores - 2)) if on_accelerator else cpu


class ProgressTally:
    """Tiles settled so far (reused, embedded or found bad), told to ``progress``
    with a non-decreasing count."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self._progress = progress
        self._settled = 0
        self.report()

    def report(self) -> None:
        if self._progress:
            self._progress(min(self._settled, self.total), self.total)

    def add(self, n: int) -> None:
        self._settled += n
        self.report()

    def finish(self) -> None:
        self._settled = self.total
        self.report()


def todo_batches(
    tiles: Sequence[Tile],
    store: DescriptorStore,
    space: str,
    batch_size: int,
    skipped: Callable[[int], None],
    stats: EmbedStats | None = None,
    rows: ExactRows | None = None,
) -> Iterator[list[Tile]]:
    """Batches of tiles to embed, in tile order; stored and duplicate tiles are skipped.

    Batches hold ``batch_size`` tiles, or fewer where a looked-up chunk has only a
    few tiles to embed (see :data:`MIN_BATCH`). ``skipped(n)`` hears of the ``n``
    tiles of each looked-up chunk that need no work (already stored, or the same
    bytes as a tile already queued). With ``rows``, each chunk is looked up by
    reading its stored vectors into them (a damaged one counts as absent).
    Local and distributed embedding cut batches here, so both run exactly the
    same batches.
    """
    store.mark_used(space)  # a build of another cache must not prune it meanwhile
    seen: set[str] = set()  # tile digests already stored or queued in this run
    batch: list[Tile] = []
    for start in range(0, len(tiles), CHUNK_ROWS):
        chunk = tiles[start : start + CHUNK_ROWS]
        t0 = time.perf_counter()
        if rows is None:
            absent = store.missing(space, list({t.sha256 for t in chunk if t.sha256 not in seen}))
        else:
            absent = rows.read_stored(store, space, start, chunk)
        if stats is not None:
            stats.lookup_s += time.perf_counter() - t0
        todo: list[Tile] = []
        for tile in chunk:
            if tile.sha256 not in seen and tile.sha256 in absent:
                todo.append(tile)
            seen.add(tile.sha256)
        size = min(batch_size, max(MIN_BATCH, -(-len(todo) // SMALL_JOB_SPLIT)))
        for tile in todo:
            batch.append(tile)
            if len(batch) >= size:
                yield batch
                batch = []
        skipped(len(chunk) - len(todo))
    if batch:
        yield batch


def read_tiles(corpus: Corpus, tiles: Sequence[Tile]) -> list[bytes | None]:
    """Each tile's bytes, read together; None for a tile gone from the corpus
    (decoding reports it)."""
    return corpus.read_many([(t.z, t.x, t.y) for t in tiles])


def decode_rows(
    tiles: Sequence[Tile], data: Sequence[bytes | None], spec: InputSpec, pixels: np.ndarray
) -> tuple[list[Tile], list[tuple[Tile, str]]]:
    """Decode tile bytes into the first rows of ``pixels``: the good tiles, and the bad
    ones with a short reason (None bytes: gone from the corpus)."""
    good: list[Tile] = []
    bad: list[tuple[Tile, str]] = []
    for tile, blob in zip(tiles, data, strict=True):
        if blob is None:
            bad.append((tile, _reason(CorpusError(tile.zxy))))
            continue
        try:
            decode_into(blob, spec, pixels[len(good)])
            good.append(tile)
        except _DECODE_ERRORS as exc:
            bad.append((tile, _reason(exc)))
    return good, bad


def decode_batch(
    tiles: Sequence[Tile], data: Sequence[bytes | None], spec: InputSpec
) -> tuple[list[Tile], np.ndarray, list[tuple[Tile, str]]]:
    """Decode given tile bytes into one new normalized batch of the good tiles."""
    pixels = np.empty((len(tiles), spec.size, spec.size, spec.channels), dtype=np.uint8)
    good, bad = decode_rows(tiles, data, spec, pixels)
    return good, Normalizer.for_spec(spec)(pixels[: len(good)]), bad


def check_vectors(vectors: np.ndarray, n: int) -> None:
    if vectors.ndim != 2 or vectors.shape[0] != n or not np.all(np.isfinite(vectors)):
        raise DescriptorError(
            f"descriptors: engine returned {vectors.shape} for {n} tiles or non-finite values"
        )


def bad_tile_lines(tiles: Sequence[Tile], bad_digests: dict[str, str]) -> list[str]:
    """Every tile with undecodable bytes, duplicates included, as ``z/x/y: reason``."""
    if not bad_digests:
        return []  # the usual case: no walk over every selected tile
    return [f"{t.zxy}: {bad_digests[t.sha256]}" for t in tiles if t.sha256 in bad_digests]


def embed_tiles(
    selection: TileSelection,
    corpus_path: Path,
    run: Callable[[np.ndarray], np.ndarray],
    spec: InputSpec,
    space: str,
    store: DescriptorStore,
    *,
    batch_size: int = BATCH_SIZE,
    workers: int | None = None,
    progress: Progress | None = None,
    stats: EmbedStats | None = None,
    streams: int = 1,
    rows: ExactRows | None = None,
) -> EmbedResult:
    """Make sure the store holds a descriptor for every selected tile of ``space``.

    ``streams`` is how many ``run`` calls may be in flight at once: more than
    one only for an engine that runs concurrent calls in parallel (see
    :attr:`Runner.streams`). ``rows``, if given, takes the vectors already
    stored, read by the lookup (see :func:`todo_batches`).

    ``progress(done, total)`` is called with non-decreasing ``done`` (tiles
    settled: reused, embedded or found bad) after every batch.
    """
    started = time.perf_counter()
    stats = stats if stats is not None else EmbedStats()
    tiles = selection.tiles
    total = len(tiles)

    def infer(batch: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        return run(batch), time.perf_counter() - t0

    # Tiles reused, or with the same bytes as a tile already queued, settle at lookup.
    tally = ProgressTally(total, progress)
    generated = 0
    bad_digests: dict[str, str] = {}
    workers = workers or decode_workers()
    decoder = _Decoder(corpus_path, spec, batch_size)
    # A couple of batches decode ahead of inference: enough to hide decoding,
    # never the corpus.
    depth = workers + streams
    try:
        with (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool,
            ThreadPoolExecutor(max_workers=streams, thread_name_prefix="infer") as engine,
        ):
            decoding: deque[Future[_Decoded]] = deque()
            inferring: deque[tuple[_Decoded, Future[tuple[np.ndarray, float]] | None]] = deque()
            batches = todo_batches(tiles, store, space, batch_size, tally.add, stats, rows)
            for chunk in batches:
                decoding.append(pool.submit(decoder, chunk))
                if len(decoding) >= depth:
                    break
            while decoding or inferring:
                # Keep every inference stream busy, oldest batch first, with one
                # batch queued behind them: the engine starts it while this thread
                # stores the batch before, instead of waiting for the store.
                while decoding and len(inferring) <= streams:
                    t0 = time.perf_counter()
                    decoded = decoding.popleft().result()
                    stats.wait_s += time.perf_counter() - t0
                    n = len(decoded.tiles)
                    job = engine.submit(infer, decoded.batch[:n]) if n else None
                    inferring.append((decoded, job))
                    nxt = next(batches, None)
                    if nxt is not None:
                        decoding.append(pool.submit(decoder, nxt))
                decoded, job = inferring.popleft()
                stats.read_s += decoded.read_s
                stats.decode_s += decoded.decode_s
                stats.preprocess_s += decoded.preprocess_s
                for tile, reason in decoded.bad:
                    bad_digests.setdefault(tile.sha256, reason)
                n = len(decoded.tiles)
                if job is not None:
                    raw, seconds = job.result()
                    stats.inference_s += seconds
                    t2 = time.perf_counter()
                    vectors = l2_normalize(raw)
                    check_vectors(vectors, n)
                    store.put(space, [t.sha256 for t in decoded.tiles], vectors)
                    checkpoint("descriptors.batch_stored")
                    stats.store_s += time.perf_counter() - t2
                    generated += n
                decoder.give_back(decoded.batch)
                tally.add(n + len(decoded.bad))
    except sqlite3.Error as exc:
        raise DescriptorError(f"descriptor store {store.path}: {exc}") from exc
    finally:
        decoder.close()
        stats.wall_s += time.perf_counter() - started
    tally.finish()
    bad = bad_tile_lines(tiles, bad_digests)
    # Tiles whose bytes equal an embedded tile's were embedded once: they count as reused.
    return EmbedResult(generated, total - generated - len(bad), tuple(bad))


# --------------------------------------------------------------------------- index


def _chunks(n: int, size: int = CHUNK_ROWS) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _vectors(
    tiles: Sequence[Tile], store: DescriptorStore, space: str, dim: int | None
) -> tuple[np.ndarray, list[Tile]]:
    """The rows of ``tiles`` in order (zeros where invalid), and the tiles without a valid
    descriptor."""
    matrix, ok = store.vectors(space, [t.sha256 for t in tiles], dim)
    return matrix, [tiles[int(i)] for i in np.flatnonzero(~ok)]


def _gpu() -> Any:
    """faiss GPU resources when this faiss build has them and a GPU is present, else None."""
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.StandardGpuResources()
    return None


def _exact_top1(
    queries: np.ndarray, tiles: Sequence[Tile], store: DescriptorStore, space: str, dim: int
) -> np.ndarray:
    """Exact top-1 score of each query over every stored row, streamed in chunks."""
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    for start, stop in _chunks(len(tiles)):
        block, _ = _vectors(tiles[start:stop], store, space, dim)
        best = np.maximum(best, (queries @ block.T).max(axis=1))
    return best


def _held_out_queries(
    tiles: Sequence[Tile], store: DescriptorStore, space: str, dim: int, rng: np.random.Generator
) -> np.ndarray:
    """Perturbed copies of a random 1% of the vectors (at least 500, at most 2000).

    Each is moved, in a random direction, half-way to its nearest other
    vector: the case that separates a good index from a lucky one, since an
    unperturbed vector always finds itself in its own list.
    """
    n = len(tiles)
    count = min(n, max(500, min(2000, n // 100)))
    picks = np.sort(rng.choice(n, size=count, replace=False))
    base, _ = _vectors([tiles[i] for i in picks], store, space, dim)
    # Nearest other vector: search with self-matches pushed out.
    second = np.full(count, -np.inf, dtype=np.float32)
    for start, stop in _chunks(n):
        block, _ = _vectors(tiles[start:stop], store, space, dim)
        scores = base @ block.T
        own = (picks >= start) & (picks < stop)
        scores[np.nonzero(own)[0], picks[own] - start] = -np.inf
        second = np.maximum(second, scores.max(axis=1))
    # For unit vectors, distance = sqrt(2 - 2 cos).
    gap = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * np.minimum(second, 1.0)))
    noise = rng.standard_normal((count, dim)).astype(np.float32)
    noise *= (0.5 * gap / np.linalg.norm(noise, axis=1))[:, None]
    return l2_normalize(base + noise)


def _approximate_index(
    tiles: Sequence[Tile], store: DescriptorStore, space: str, dim: int, seed: int
) -> tuple[faiss.Index, str, int, float, int]:
    """IVF index sized for ``len(tiles)``, with the smallest nprobe meeting :data:`RECALL_TARGET`.

    Returns ``(index, index_type, nprobe, recall_at_1, queries)``.
    """
    import faiss

    n = len(tiles)
    rng = np.random.default_rng(seed)
    # faiss wants >= 39 training points per list; 4·sqrt(N) lists is its usual advice.
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    codes = "Flat" if n * dim * 4 <= FLAT_CODES_MAX_BYTES else "SQ8"
    train_n = min(n, 64 * nlist)  # O(sqrt(N)) rows: never the corpus
    sample_rows = np.sort(rng.choice(n, size=train_n, replace=False))
    sample, _ = _vectors([tiles[i] for i in sample_rows], store, space, dim)
    queries = _held_out_queries(tiles, store, space, dim, rng)
    exact_scores = _exact_top1(queries, tiles, store, space, dim)
    for codes_now in dict.fromkeys([codes, "Flat"]):
        index_type = f"IVF{nlist},{codes_now}"
        index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
        res = _gpu()
        work = faiss.index_cpu_to_gpu(res, 0, index) if res is not None else index
        work.train(sample)
        for start, stop in _chunks(n):
            block, missing = _vectors(tiles[start:stop], store, space, dim)
            if missing:
                raise _missing(missing)
            work.add(block)
        if res is not None:
            index = faiss.index_gpu_to_cpu(work)
        ivf = faiss.extract_index_ivf(index)
        nprobe = 1
        while True:
            ivf.nprobe = nprobe
            _, ids = index.search(queries, 1)
            found = ids[:, 0]
            # Score each answer with its stored vector (SQ8's own scores are approximate);
            # a different row with the same score is an equally good answer.
            answers, _ = _vectors([tiles[int(i)] for i in np.maximum(found, 0)], store, space, dim)
            scores = np.einsum("ij,ij->i", queries, answers)
            recall = float(np.mean((found >= 0) & (scores >= exact_scores - 1e-5)))
            if recall >= RECALL_TARGET or nprobe >= nlist:
                break
            nprobe = min(nlist, nprobe * 2)
        if recall >= RECALL_TARGET:
            return index, index_type, nprobe, recall, len(queries)
    raise DescriptorError(
        f"descriptors: index {index_type} reaches recall@1 {recall:.4f} < {RECALL_TARGET}"
    )


def _write_tile_map(path: Path, tiles: Sequence[Tile]) -> None:
    """Write the row → tile JSON in chunks, atomically (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write('{"format":"takeoff-cache-tile-map","version":1,"columns":["z","x","y"],')
            fh.write('"rows":[')
            for start, stop in _chunks(len(tiles)):
                if start:
                    fh.write(",")
                fh.write(",".join(f"[{t.z},{t.x},{t.y}]" for t in tiles[start:stop]))
            fh.write("]}")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


_DIM_PROBE = 64


def _missing(tiles: list[Tile]) -> MissingDescriptorsError:
    return MissingDescriptorsError(
        f"descriptors: {len(tiles)} tile(s) have no valid descriptor, e.g. {tiles[0].zxy}",
        sorted({t.sha256 for t in tiles}),
    )


def _exact_index(
    tiles: Sequence[Tile], store: DescriptorStore, space: str, dim: int, rows: ExactRows | None
) -> faiss.Index:
    """``IndexFlatIP`` of every tile's stored vector: the rows not yet in ``rows`` are read."""
    if rows is None or rows.dim is None:
        rows = ExactRows(len(tiles))
        rows.allocate(dim)
    absent: list[Tile] = []
    for start, stop in _chunks(len(tiles)):
        chunk = tiles[start:stop]
        unfilled = np.flatnonzero(~rows.filled[start:stop])
        if len(unfilled) == len(chunk):  # none read yet (a cold build): read in place
            not_whole = rows.read_stored(store, space, start, chunk)
            absent += [t for t in chunk if t.sha256 in not_whole]
        elif len(unfilled):
            block, ok = store.vectors(space, [chunk[int(i)].sha256 for i in unfilled], dim)
            rows.fill(start, unfilled, block, ok)
            absent += [chunk[int(i)] for i in unfilled[~ok]]
    if absent:
        raise _missing(absent)
    assert rows.index is not None
    return rows.index


def write_index(
    selection: TileSelection,
    store: DescriptorStore,
    space: str,
    out_dir: Path,
    stem: str,
    *,
    exact_max: int = EXACT_INDEX_MAX,
    seed: int = 0,
    rows: ExactRows | None = None,
) -> IndexFiles:
    """Write ``<stem>.faiss`` and ``<stem>.tiles.json`` (row → tile) into ``out_dir``.

    Up to ``exact_max`` tiles the index is exact (``IndexFlatIP``); beyond, an
    IVF index whose recall@1 against exact search is measured and recorded.
    ``rows`` are exact-index rows already read (see :class:`ExactRows`).
    """
    import faiss

    tiles = selection.tiles
    if not tiles:
        raise DescriptorError("descriptors: no tiles to index")
    index_type, nprobe, recall, queries = "Flat", None, 1.0, 0
    try:
        if rows is None or rows.dim is None:
            # The vector size: the most common whole size among the first few tiles' rows.
            first, missing = _vectors(tiles[:_DIM_PROBE], store, space, None)
            if len(missing) == len(first):
                raise _missing(missing)
            dim = first.shape[1]
        else:
            dim = rows.dim
        if len(tiles) <= exact_max:
            index = _exact_index(tiles, store, space, dim, rows)
        else:
            index, index_type, nprobe, recall, queries = _approximate_index(
                tiles, store, space, dim, seed
            )
    except sqlite3.Error as exc:
        raise DescriptorError(f"descriptor store {store.path}: {exc}") from exc
    index_path, map_path = index_files(out_dir, stem)
    tmp = out_dir / f".{stem}.faiss.tmp-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint("descriptors.index_write", tmp)
        faiss.write_index(index, str(tmp))
        # Hashed on another core while the index is synced and the tile map written:
        # the digest is the longest step of writing a rebuild's index.
        with open(tmp, "rb") as fh, ThreadPoolExecutor(1, "index-sha256") as hasher:
            index_sha256 = hasher.submit(sha256_stream, fh)
            fsync_file(tmp)
            checkpoint("descriptors.index_rename", index_path)
            os.replace(tmp, index_path)
            checkpoint("descriptors.map_write", map_path)
            _write_tile_map(map_path, tiles)
            map_sha256 = sha256_file(map_path)
            digest = index_sha256.result()
    except (RuntimeError, OSError) as exc:  # faiss reports I/O failures as RuntimeError
        raise DescriptorError(f"descriptors: cannot write index {index_path}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return IndexFiles(
        str(index_path),
        str(map_path),
        dim,
        len(tiles),
        digest,
        map_sha256,
        index_type,
        nprobe,
        round(recall, 4),
        queries,
    )


def embed_and_index(
    selection: TileSelection,
    corpus_path: Path,
    run: Callable[[np.ndarray], np.ndarray],
    spec: InputSpec,
    space: str,
    store: DescriptorStore,
    out_dir: Path,
    stem: str,
    *,
    streams: int = 1,
    workers: int | None = None,
    progress: Progress | None = None,
) -> tuple[IndexFiles | None, EmbedResult]:
    """Embed what the store lacks, then write the index (None when tiles are bad).

    A stored vector found damaged while the index is written is forgotten and
    its tile embedded again (once per tile): the index never holds a damaged
    vector.
    """
    total = len(selection.tiles)
    generated = 0
    forgotten: set[str] = set()
    rows = ExactRows(total) if total <= EXACT_INDEX_MAX else None
    while True:
        # A retry reports no progress: the bar already stands at the end.
        result = embed_tiles(
            selection,
            corpus_path,
            run,
            spec,
            space,
            store,
            progress=None if forgotten else progress,
            streams=streams,
            workers=workers,
            rows=None if forgotten else rows,
        )
        generated += result.generated
        if result.bad_tiles:
            bad = result.bad_tiles
            return None, EmbedResult(generated, total - generated - len(bad), bad)
        # Every vector is stored: the log's copy into the file runs while the index is written.
        store.checkpoint_behind()
        try:
            files = write_index(selection, store, space, out_dir, stem, rows=rows)
        except MissingDescriptorsError as exc:
            if forgotten.intersection(exc.shas):
                raise  # embedded again and still not valid: the store is failing
            forgotten.update(exc.shas)
            store.forget(space, exc.shas)
            continue
        return files, EmbedResult(generated, total - generated, ())


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


def read_index(index_path: Path) -> faiss.Index:
    import faiss

    return faiss.read_index(str(index_path))
