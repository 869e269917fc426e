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

Per-tile descriptors live in the descriptor store of the work folder
(:mod:`.store`), so a rebuild after a corpus change embeds only the
tiles that changed; the index is then written from the store
(:mod:`.index`). Nothing corpus-sized is held in memory but the
index itself: the store is looked up and the index filled chunk by chunk, in
row order.
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.descriptors.decode import Decoded, Decoder, decode_workers
from takeoff_cache.descriptors.index import EXACT_INDEX_MAX, ExactRows, IndexFiles, write_index
from takeoff_cache.descriptors.store import CHUNK_ROWS, DescriptorStore, l2_normalize
from takeoff_cache.errors import DescriptorError, MissingDescriptorsError
from takeoff_cache.tiles.corpus import Tile, TileSelection

Progress = Callable[[int, int], None]

BATCH_SIZE = 32
# A lookup that finds only a few tiles to embed (a rebuild after a small change)
# cuts them into at least SMALL_JOB_SPLIT batches of at least MIN_BATCH tiles:
# the first decoded batch reaches the engine sooner, each engine stream gets
# work, and a fresh engine's first run, which allocates its working memory,
# is smaller. Inference costs the same per tile at these sizes.
MIN_BATCH = 8
SMALL_JOB_SPLIT = 4


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
    decoder = Decoder(corpus_path, spec, batch_size)
    # A couple of batches decode ahead of inference: enough to hide decoding,
    # never the corpus.
    depth = workers + streams
    try:
        with (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool,
            ThreadPoolExecutor(max_workers=streams, thread_name_prefix="infer") as engine,
        ):
            decoding: deque[Future[Decoded]] = deque()
            inferring: deque[tuple[Decoded, Future[tuple[np.ndarray, float]] | None]] = deque()
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
