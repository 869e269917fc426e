"""The descriptors phase: embed the selected tiles, reuse what was embedded before, write the index.

Decoding runs in worker threads while the engine infers the previous batch
(Pillow and ONNX Runtime both release the GIL). Per-tile descriptors live in
the descriptor store of the work folder, keyed by (engine key, tile SHA-256),
so a rebuild after a corpus change embeds only the tiles that changed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from PIL.Image import DecompressionBombError

from .backbones import InputSpec
from .canonical import content_key
from .corpus import Corpus, Tile, TileSelection, open_corpus
from .errors import DescriptorError
from .fsutil import atomic_write_bytes, fsync_file, sha256_file
from .preprocess import Normalizer, decode_tile

Progress = Callable[[int, int], None]
INDEX_TYPE = "Flat"
METRIC = "inner_product"  # on L2-normalized vectors: cosine similarity


class DescriptorStore:
    """SQLite table of L2-normalized float32 descriptors, shared by every cache of a work folder.

    SQLite's journal makes each batch's insert all-or-nothing, so a killed
    build never leaves a half-written vector; vectors of the wrong length are
    treated as absent rather than served.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, timeout=60, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS descriptors (engine_key TEXT NOT NULL,"
            " tile_sha256 TEXT NOT NULL, vector BLOB NOT NULL,"
            " PRIMARY KEY (engine_key, tile_sha256)) WITHOUT ROWID"
        )
        self._db.commit()

    def get(self, engine_key: str, shas: list[str], dim: int | None) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(shas), 500):
            chunk = shas[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT tile_sha256, vector FROM descriptors WHERE engine_key = ?"
                f" AND tile_sha256 IN ({marks})",
                [engine_key, *chunk],
            )
            for sha, blob in rows:
                vec = np.frombuffer(blob, dtype=np.float32)
                if (dim is None or vec.size == dim) and vec.size and np.all(np.isfinite(vec)):
                    found[sha] = vec
        return found

    def put(self, engine_key: str, shas: list[str], vectors: np.ndarray) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO descriptors VALUES (?, ?, ?)",
                [
                    (engine_key, sha, vectors[i].astype(np.float32).tobytes())
                    for i, sha in enumerate(shas)
                ],
            )

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class EmbedResult:
    generated: int
    reused: int
    bad_tiles: tuple[str, ...]  # "z/x/y: reason"


@dataclass(frozen=True)
class IndexFiles:
    index_path: str
    map_path: str
    dimension: int
    count: int
    index_sha256: str
    map_sha256: str


def descriptor_key(engine_key: str, fingerprint: str) -> str:
    return content_key(
        {
            "engine_key": engine_key,
            "corpus_fingerprint": fingerprint,
            "index_type": INDEX_TYPE,
            "metric": METRIC,
            "format": 1,
        }
    )


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return out


class _Decoder:
    """Reads and decodes batches in worker threads, each with its own corpus handle."""

    def __init__(self, corpus_path: Path, spec: InputSpec) -> None:
        self._corpus_path = corpus_path
        self._spec = spec
        self._normalize = Normalizer.for_spec(spec)
        self._local = threading.local()
        self._opened: list[Corpus] = []
        self._lock = threading.Lock()

    def _corpus(self) -> Corpus:
        corpus = getattr(self._local, "corpus", None)
        if corpus is None:
            corpus = open_corpus(self._corpus_path)
            self._local.corpus = corpus
            with self._lock:
                self._opened.append(corpus)
        return corpus

    def __call__(self, tiles: list[Tile]) -> tuple[list[Tile], np.ndarray | None, list[str]]:
        corpus = self._corpus()
        good: list[Tile] = []
        pixels: list[np.ndarray] = []
        bad: list[str] = []
        for tile in tiles:
            try:
                pixels.append(decode_tile(corpus.read(tile.z, tile.x, tile.y), self._spec))
                good.append(tile)
            except (OSError, ValueError, SyntaxError, DecompressionBombError) as exc:
                bad.append(f"{tile.zxy}: {type(exc).__name__}")
        batch = self._normalize(np.stack(pixels)) if pixels else None
        return good, batch, bad

    def close(self) -> None:
        for corpus in self._opened:
            corpus.close()


def _batches(tiles: list[Tile], size: int) -> Iterator[list[Tile]]:
    for start in range(0, len(tiles), size):
        yield tiles[start : start + size]


def embed_tiles(
    selection: TileSelection,
    corpus_path: Path,
    run: Callable[[np.ndarray], np.ndarray],
    spec: InputSpec,
    engine_key: str,
    store: DescriptorStore,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Progress | None = None,
) -> EmbedResult:
    """Make sure the store holds a descriptor for every selected tile."""
    unique: dict[str, Tile] = {}
    for tile in selection.tiles:
        unique.setdefault(tile.sha256, tile)
    have = store.get(engine_key, list(unique), None)
    todo = [t for sha, t in unique.items() if sha not in have]
    total = len(selection.tiles)
    done = total - len(todo)
    if progress:
        progress(done, total)
    bad: list[str] = []
    generated = 0
    workers = workers or max(1, min(4, len(os.sched_getaffinity(0))))
    decoder = _Decoder(corpus_path, spec)
    # Keep a couple of batches decoding ahead of inference, never the whole corpus.
    depth = workers + 1
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
            pending: list[Future[tuple[list[Tile], np.ndarray | None, list[str]]]] = []
            chunks = _batches(todo, batch_size)
            for chunk in chunks:
                pending.append(pool.submit(decoder, chunk))
                if len(pending) >= depth:
                    break
            while pending:
                good, batch, bad_here = pending.pop(0).result()
                nxt = next(chunks, None)
                if nxt is not None:
                    pending.append(pool.submit(decoder, nxt))
                bad.extend(bad_here)
                if batch is not None:
                    vectors = l2_normalize(run(batch))
                    if vectors.shape[0] != len(good) or not np.all(np.isfinite(vectors)):
                        raise DescriptorError(
                            f"descriptors: engine returned {vectors.shape} for {len(good)} tiles"
                            " or non-finite values"
                        )
                    store.put(engine_key, [t.sha256 for t in good], vectors)
                    generated += len(good)
                done += len(good) + len(bad_here)
                if progress:
                    progress(min(done, total), total)
    finally:
        decoder.close()
    if progress:
        progress(total, total)
    # Tiles whose bytes equal an embedded tile's were embedded once: they count as reused.
    return EmbedResult(generated, total - generated - len(bad), tuple(sorted(bad)))


def write_index(
    selection: TileSelection, store: DescriptorStore, engine_key: str, out_dir: Path, stem: str
) -> IndexFiles:
    """Write ``<stem>.faiss`` and ``<stem>.tiles.json`` (row → tile) into ``out_dir``."""
    tiles = selection.tiles
    found = store.get(engine_key, sorted({t.sha256 for t in tiles}), None)
    missing = [t.zxy for t in tiles if t.sha256 not in found]
    if missing:
        raise DescriptorError(
            f"descriptors: no descriptor for {len(missing)} tile(s), e.g. {missing[0]}"
        )
    dim = next(iter(found.values())).size
    matrix = np.empty((len(tiles), dim), dtype=np.float32)
    for row, tile in enumerate(tiles):
        vec = found[tile.sha256]
        if vec.size != dim:
            raise DescriptorError(
                f"descriptors: tile {tile.zxy} has dimension {vec.size}, not {dim}"
            )
        matrix[row] = vec
    index = faiss.IndexFlatIP(dim)
    index.add(matrix)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / f"{stem}.faiss"
    map_path = out_dir / f"{stem}.tiles.json"
    tmp = out_dir / f".{stem}.faiss.tmp-{os.getpid()}"
    try:
        faiss.write_index(index, str(tmp))
        fsync_file(tmp)
        os.replace(tmp, index_path)
    except (RuntimeError, OSError) as exc:
        raise DescriptorError(f"descriptors: cannot write index {index_path}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    tile_map = {
        "format": "takeoff-cache-tile-map",
        "version": 1,
        "columns": ["z", "x", "y"],
        "rows": [[t.z, t.x, t.y] for t in tiles],
    }
    atomic_write_bytes(map_path, json.dumps(tile_map, separators=(",", ":")).encode())
    return IndexFiles(
        str(index_path),
        str(map_path),
        dim,
        len(tiles),
        sha256_file(index_path),
        sha256_file(map_path),
    )


def read_index(index_path: Path) -> faiss.Index:
    return faiss.read_index(str(index_path))
