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
(:mod:`.descriptor_store`), so a rebuild after a corpus change embeds only the
tiles that changed; the index is then written from the store
(:mod:`.descriptor_index`). Nothing corpus-sized is held in memory but the
index itself: the store is looked up and the index filled chunk by chunk, in
row order.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError
from PIL.Image import DecompressionBombError

from .backbones import InputSpec
from .corpus import Corpus, Tile, TileSelection, open_corpus
from .descriptor_index import EXACT_INDEX_MAX, ExactRows, IndexFiles, write_index
from .descriptor_store import CHUNK_ROWS, DescriptorStore, l2_normalize
from .errors import CorpusError, DescriptorError, MissingDescriptorsError
from .faults import checkpoint
from .preprocess import Normalizer, decode_into

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
