"""The descriptor index: a FAISS index over every selected tile's stored descriptor.

Exact (``IndexFlatIP``) up to :data:`EXACT_INDEX_MAX` tiles; beyond, an IVF
index whose recall@1 against exact search is measured on held-out queries and
recorded. Filled chunk by chunk from the descriptor store, in row order, beside
the row → tile map; both written atomically.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from takeoff_cache.core.canonical import content_key
from takeoff_cache.core.faults import checkpoint
from takeoff_cache.core.fsutil import atomic_output, sha256_file, sha256_stream
from takeoff_cache.core.workdir import index_files
from takeoff_cache.descriptors.store import CHUNK_ROWS, DescriptorStore, l2_normalize
from takeoff_cache.errors import DescriptorError, MissingDescriptorsError
from takeoff_cache.tiles.corpus import Tile, TileSelection

if TYPE_CHECKING:
    import faiss

METRIC = "inner_product"  # on L2-normalized vectors: cosine similarity

# Up to this many tiles the index is exact (brute force); a query over 100k
# 468-d vectors is ~47 M multiply-adds, a few ms even on a Jetson CPU.
EXACT_INDEX_MAX = 100_000
# An approximate index must find the exact top-1 for this share of held-out queries.
RECALL_TARGET = 0.99
# IVF lists keep full float32 vectors up to this size, 8-bit scalar codes beyond it.
FLAT_CODES_MAX_BYTES = 2 << 30
INDEX_FORMAT = 2


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
    with atomic_output(path, read_only=True) as tmp, open(tmp, "w", encoding="ascii") as fh:
        fh.write('{"format":"takeoff-cache-tile-map","version":1,"columns":["z","x","y"],')
        fh.write('"rows":[')
        for start, stop in _chunks(len(tiles)):
            if start:
                fh.write(",")
            fh.write(",".join(f"[{t.z},{t.x},{t.y}]" for t in tiles[start:stop]))
        fh.write("]}")


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
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            hasher = stack.enter_context(ThreadPoolExecutor(1, "index-sha256"))
            # Read-only once written: caches get copies, the work folder keeps this one.
            with atomic_output(index_path, point="descriptors.index", read_only=True) as tmp:
                checkpoint("descriptors.index_write", tmp)
                faiss.write_index(index, str(tmp))
                # Hashed on another core while the index is synced and the tile map
                # written: the digest is the longest step of writing a rebuild's index.
                index_sha256 = hasher.submit(sha256_stream, stack.enter_context(open(tmp, "rb")))
            checkpoint("descriptors.map_write", map_path)
            _write_tile_map(map_path, tiles)
            map_sha256 = sha256_file(map_path)
            digest = index_sha256.result()
    except (RuntimeError, OSError) as exc:  # faiss reports I/O failures as RuntimeError
        raise DescriptorError(f"descriptors: cannot write index {index_path}: {exc}") from exc
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


def read_index(index_path: Path) -> faiss.Index:
    import faiss

    return faiss.read_index(str(index_path))
