"""The features phase: extract what the store lacks, then write the cache's features file.

Tiles are decoded at the extractor's size by the build's own decoder, in
batches on worker threads while the extractor runs the batch before. Only
tiles whose bytes the feature store has no features of (for this extractor)
are decoded at all: a rebuild after a 1% change extracts 1%.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from takeoff_cache.backbones.preprocess import decode_into
from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.core.canonical import content_key
from takeoff_cache.errors import DescriptorError
from takeoff_cache.features.artifact import FeaturesFile, write_features
from takeoff_cache.features.extract import Extractor, Features
from takeoff_cache.features.store import FeatureStore
from takeoff_cache.tiles.corpus import Tile, TileSelection, open_corpus

BATCH = 16
_DECODE_ERRORS = (OSError, ValueError, SyntaxError)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ExtractResult:
    generated: int  # tiles whose features were extracted by this run
    reused: int
    bad_tiles: tuple[str, ...]  # "z/x/y: reason"


def features_key(space: str, fingerprint: str) -> str:
    """The features file's key: its extractor's space and the selection it covers."""
    return content_key({"features_space": space, "corpus_fingerprint": fingerprint})


def extract_tiles(
    selection: TileSelection,
    corpus_path: Path,
    extractor: Extractor,
    store: FeatureStore,
    *,
    workers: int = 2,
    progress: Progress | None = None,
) -> ExtractResult:
    """Make sure the store holds features of every selected tile for ``extractor``."""
    space = extractor.space
    tiles = selection.tiles
    try:
        absent = store.missing(space, [t.sha256 for t in tiles])
    except sqlite3.Error as exc:
        raise DescriptorError(f"feature store {store.path}: {exc}") from exc
    todo: list[Tile] = []
    queued: set[str] = set()
    for tile in tiles:
        if tile.sha256 in absent and tile.sha256 not in queued:
            todo.append(tile)
            queued.add(tile.sha256)
    spec = InputSpec("tile", extractor.size, 3, (0.0,) * 3, (1.0,) * 3)
    bad: dict[str, str] = {}
    done = len(tiles) - len(todo)
    if progress:
        progress(done, len(tiles))
    corpus = open_corpus(corpus_path)

    def decode(batch: list[Tile]) -> tuple[int, list[Tile], np.ndarray]:
        blobs = corpus.read_many([(t.z, t.x, t.y) for t in batch])
        pixels = np.empty((len(batch), spec.size, spec.size, 3), dtype=np.uint8)
        kept: list[int] = []
        for i, (tile, blob) in enumerate(zip(batch, blobs, strict=True)):
            try:
                if blob is None:
                    raise ValueError("missing from the corpus")
                decode_into(blob, spec, pixels[i])
                kept.append(i)
            except _DECODE_ERRORS as exc:
                bad[tile.sha256] = str(exc).splitlines()[0][:80] if str(exc) else "undecodable"
        return len(batch), [batch[i] for i in kept], pixels[kept]

    batches = iter([todo[i : i + BATCH] for i in range(0, len(todo), BATCH)])
    generated = 0
    try:
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="features") as pool:
            # A few batches decode ahead of extraction, never the corpus.
            ahead: deque[Future[tuple[int, list[Tile], np.ndarray]]] = deque(
                pool.submit(decode, b) for b in itertools.islice(batches, workers + 1)
            )
            while ahead:
                n, good, pixels = ahead.popleft().result()
                nxt = next(batches, None)
                if nxt is not None:
                    ahead.append(pool.submit(decode, nxt))
                if good:
                    found: list[Features] = extractor.tiles(pixels)
                    store.put(space, [t.sha256 for t in good], found)
                    generated += len(good)
                done += n
                if progress:
                    progress(min(done, len(tiles)), len(tiles))
    except sqlite3.Error as exc:
        raise DescriptorError(f"feature store {store.path}: {exc}") from exc
    finally:
        corpus.close()
    lines = tuple(f"{t.zxy}: {bad[t.sha256]}" for t in tiles if t.sha256 in bad)
    return ExtractResult(generated, len(tiles) - generated - len(lines), lines)


def extract_and_write(
    selection: TileSelection,
    corpus_path: Path,
    extractor: Extractor,
    store: FeatureStore,
    out_dir: Path,
    name: str,
    *,
    workers: int = 2,
    progress: Progress | None = None,
) -> tuple[FeaturesFile | None, ExtractResult]:
    """Extract what the store lacks, then write the features file (None when tiles are bad).

    The file is named after its content key (``<name>.<key>.features``): one
    already there was written from the same extractor and tiles, and is reused.
    """
    result = extract_tiles(
        selection, corpus_path, extractor, store, workers=workers, progress=progress
    )
    if result.bad_tiles:
        return None, result
    key = features_key(extractor.space, selection.fingerprint)
    path = out_dir / f"{name}.{key[:12]}.features"
    tiles = [((t.z, t.x, t.y), t.sha256) for t in selection.tiles]
    files = write_features(path, tiles, store, extractor.space, extractor.identity())
    return files, result
