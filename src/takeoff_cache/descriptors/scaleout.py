"""Descriptor work in chunks that run anywhere: the library half of Dask scale-out.

The build process keeps everything that must stay in one place (the lock,
the corpus, the descriptor store, the index); workers only turn tile bytes
into descriptors. So a chunk carries the bytes of its tiles (workers need no
corpus) and a reference to the engine by path and SHA-256: workers must see
the work folder at the same path (shared storage) on the same kind of
hardware, and refuse an engine whose bytes differ from the one the build
compiled.

Chunks are whole batches of exactly the batches the single-process path would
run (same tiles, same order, same batch size, single-threaded engine calls),
so a distributed build writes an index identical to a local one.

Nothing here imports Prefect or Dask: ``submit`` is any function that
starts a chunk somewhere and returns something with ``result()``.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from takeoff_cache.backbones.file import Backbone
from takeoff_cache.core.fsutil import sha256_file
from takeoff_cache.descriptors.decode import decode_batch, read_tiles
from takeoff_cache.descriptors.pipeline import (
    BATCH_SIZE,
    EmbedResult,
    Progress,
    ProgressTally,
    bad_tile_lines,
    check_vectors,
    todo_batches,
)
from takeoff_cache.descriptors.store import DescriptorStore, l2_normalize
from takeoff_cache.engines import Runner, get_backend
from takeoff_cache.errors import DescriptorError, EngineError
from takeoff_cache.tiles.corpus import Corpus, Tile, TileSelection, open_corpus

# At most this many tiles travel in one chunk: about 4 MB of demo JPEG tiles.
MAX_CHUNK_TILES = 512


@dataclass(frozen=True)
class EngineRef:
    """An engine as a worker finds it: the store file, pinned by its digest."""

    path: str
    sha256: str
    backend: str
    backbone: Backbone


@dataclass(frozen=True)
class Chunk:
    number: int
    batches: tuple[tuple[Tile, ...], ...]
    # The bytes of each batch's tiles; None for a tile gone from the corpus.
    data: tuple[tuple[bytes | None, ...], ...]


@dataclass
class ChunkResult:
    number: int
    shas: list[str]
    vectors: np.ndarray  # (len(shas), dim) float32, unit length
    bad: list[tuple[Tile, str]]
    worker: str  # host:pid that ran it


class _Result(Protocol):
    def result(self) -> ChunkResult: ...


# Loaded engines of this worker process, by digest: loaded once, used by every chunk.
_runners: dict[str, Runner] = {}


def _runner(engine: EngineRef) -> Runner:
    runner = _runners.get(engine.sha256)
    if runner is not None:
        return runner
    where = f"{socket.gethostname()}:{engine.path}"
    path = Path(engine.path)
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise EngineError(
            f"descriptors: worker cannot read engine {where}: {exc.strerror}"
            " (workers need the work folder at the same path)"
        ) from exc
    if actual != engine.sha256:
        raise EngineError(f"descriptors: engine {where} differs from the one this build compiled")
    backbone = engine.backbone
    runner = get_backend(engine.backend).load(path, backbone, backbone.output or "")
    _runners[engine.sha256] = runner
    return runner


def embed_chunk(engine: EngineRef, chunk: Chunk) -> ChunkResult:
    """Decode and embed one chunk, batch by batch. Runs on a worker."""
    runner = _runner(engine)
    spec = engine.backbone.image
    shas: list[str] = []
    parts: list[np.ndarray] = []
    bad: list[tuple[Tile, str]] = []
    for tiles, data in zip(chunk.batches, chunk.data, strict=True):
        good, batch, failed = decode_batch(list(tiles), list(data), spec)
        bad += failed
        if good:
            vectors = l2_normalize(runner.run(batch))
            check_vectors(vectors, len(good))
            shas += [t.sha256 for t in good]
            parts.append(vectors)
    dim = parts[0].shape[1] if parts else 0
    return ChunkResult(
        chunk.number,
        shas,
        np.concatenate(parts) if parts else np.empty((0, dim), dtype=np.float32),
        bad,
        f"{socket.gethostname()}:{os.getpid()}",
    )


@dataclass
class SpreadStats:
    chunks: int = 0
    workers: set[str] = field(default_factory=set)


def chunk_batches(total: int, window: int, batch_size: int) -> int:
    """Batches per chunk: enough chunks to keep ``window`` busy, none over the cap."""
    per_chunk = -(-total // (batch_size * window * 2)) if total else 1
    return max(1, min(per_chunk, MAX_CHUNK_TILES // batch_size))


def embed_spread(
    selection: TileSelection,
    corpus_path: Path,
    space: str,
    store: DescriptorStore,
    submit: Callable[[Chunk], _Result],
    *,
    window: int,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
    stats: SpreadStats | None = None,
) -> EmbedResult:
    """Make sure the store holds every selected tile's descriptor, embedding on workers.

    At most ``window`` chunks are out at once, so the build process never holds
    more than that many chunks of tile bytes; results are stored as they come
    back, oldest first.
    """
    stats = stats if stats is not None else SpreadStats()
    tiles = selection.tiles
    total = len(tiles)
    generated = 0
    bad_digests: dict[str, str] = {}
    tally = ProgressTally(total, progress)
    per_chunk = chunk_batches(total, window, batch_size)
    corpus = open_corpus(corpus_path)

    def chunks() -> Iterator[Chunk]:
        pending: list[tuple[Tile, ...]] = []
        number = 0
        for batch in todo_batches(tiles, store, space, batch_size, tally.add):
            pending.append(tuple(batch))
            if len(pending) == per_chunk:
                yield _read_chunk(corpus, number, pending)
                number += 1
                pending = []
        if pending:
            yield _read_chunk(corpus, number, pending)

    out: deque[_Result] = deque()
    try:
        source = chunks()
        for chunk in source:
            out.append(submit(chunk))
            if len(out) >= window:
                break
        while out:
            done = out.popleft().result()
            nxt = next(source, None)
            if nxt is not None:
                out.append(submit(nxt))
            stats.chunks += 1
            stats.workers.add(done.worker)
            for tile, reason in done.bad:
                bad_digests.setdefault(tile.sha256, reason)
            if done.shas:
                if done.vectors.shape[0] != len(done.shas):
                    raise DescriptorError(
                        f"descriptors: chunk {done.number} returned"
                        f" {done.vectors.shape[0]} vectors for {len(done.shas)} tiles"
                    )
                store.put(space, done.shas, done.vectors)
            generated += len(done.shas)
            tally.add(len(done.shas) + len(done.bad))
    finally:
        corpus.close()
    tally.finish()
    bad = bad_tile_lines(tiles, bad_digests)
    return EmbedResult(generated, total - generated - len(bad), tuple(bad))


def _read_chunk(corpus: Corpus, number: int, batches: list[tuple[Tile, ...]]) -> Chunk:
    data = tuple(tuple(read_tiles(corpus, batch)) for batch in batches)
    return Chunk(number, tuple(batches), data)
