"""Reading and decoding tile batches for embedding: bytes from the corpus to a normalized batch.

Decoding runs in worker threads (Pillow, SQLite and NumPy release the GIL),
each with its own corpus handle and scratch buffer; a tile whose bytes are
gone or undecodable is reported with a short reason, never embedded.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError
from PIL.Image import DecompressionBombError

from takeoff_cache.backbones.preprocess import Normalizer, decode_into
from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.errors import CorpusError
from takeoff_cache.tiles.corpus import Corpus, Tile, open_corpus


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
class Decoded:
    tiles: list[Tile]
    batch: np.ndarray  # the whole reusable buffer; rows [:len(tiles)] are filled
    bad: list[tuple[Tile, str]]
    read_s: float
    decode_s: float
    preprocess_s: float


class Decoder:
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

    def __call__(self, tiles: list[Tile]) -> Decoded:
        corpus, pixels = self._thread_state()
        t0 = time.perf_counter()
        data = read_tiles(corpus, tiles)
        t1 = time.perf_counter()
        good, bad = decode_rows(tiles, data, self._spec, pixels)
        t2 = time.perf_counter()
        batch = self._take_buffer()
        if good:
            self._normalize(pixels[: len(good)], batch[: len(good)])
        return Decoded(good, batch, bad, t1 - t0, t2 - t1, time.perf_counter() - t2)

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
