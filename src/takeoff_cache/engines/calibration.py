"""INT8 calibration samples: tiles drawn from the corpus, stored as one ``.npz`` file.

``takeoff-cache calibrate`` writes the file; engine builds read it. It holds
decoded RGB tiles at their stored size, so one file serves every backbone:
each resizes and normalizes the samples as its own input spec says. Its
SHA-256 is part of every int8 engine key.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from takeoff_cache.backbones.preprocess import Normalizer
from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.core.fsutil import atomic_output
from takeoff_cache.errors import InvalidRequestError
from takeoff_cache.tiles.corpus import TileSelection, open_corpus

FORMAT = "takeoff-cache-calibration-1"


def write_calibration(
    path: Path, selection: TileSelection, corpus_path: Path, count: int, seed: int = 0
) -> int:
    """Sample ``count`` tiles (deterministic for a seed) and write them; return how many."""
    if not selection.tiles:
        raise InvalidRequestError("calibrate: no tiles selected; nothing to calibrate with")
    rng = np.random.default_rng(seed)
    picks = sorted(
        rng.choice(
            len(selection.tiles), size=min(count, len(selection.tiles)), replace=False
        ).tolist()
    )
    images: list[np.ndarray] = []
    names: list[str] = []
    with open_corpus(corpus_path) as corpus:
        for i in picks:
            tile = selection.tiles[i]
            try:
                with Image.open(io.BytesIO(corpus.read(tile.z, tile.x, tile.y))) as img:
                    images.append(np.asarray(img.convert("RGB").resize((256, 256)), np.uint8))
            except (OSError, ValueError, SyntaxError):
                continue  # a bad tile is the descriptor phase's to report, not calibration's
            names.append(tile.zxy)
    if not images:
        raise InvalidRequestError("calibrate: none of the sampled tiles could be decoded")
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(
            fh, format=np.array(FORMAT), tiles=np.stack(images), names=np.array(names)
        )
    return len(images)


def load_samples(path: Path) -> np.ndarray:
    """The (N, H, W, 3) uint8 samples; InvalidRequestError if ``path`` is not such a file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["format"]) != FORMAT:
                raise KeyError("format")
            tiles = np.asarray(data["tiles"], dtype=np.uint8)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise InvalidRequestError(
            f"calibration: {path} is not a takeoff-cache calibration file"
            " (make one with 'takeoff-cache calibrate')"
        ) from exc
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or len(tiles) == 0:
        raise InvalidRequestError(f"calibration: {path} holds no RGB samples")
    return tiles


def batches(samples: np.ndarray, spec: InputSpec, batch_size: int = 16) -> Iterator[np.ndarray]:
    """Normalized NCHW float32 batches of the samples, as ``spec`` wants them."""
    normalize = Normalizer.for_spec(spec)
    mode = "RGB" if spec.channels == 3 else "L"
    for start in range(0, len(samples), batch_size):
        chunk = []
        for pixels in samples[start : start + batch_size]:
            img = (
                Image.fromarray(pixels)
                .convert(mode)
                .resize((spec.size, spec.size), Image.Resampling.BILINEAR)
            )
            arr = np.asarray(img, dtype=np.uint8)
            chunk.append(arr if arr.ndim == 3 else arr[:, :, None])
        yield normalize(np.stack(chunk))


def mean_cosine(
    run_a: Callable[[np.ndarray], np.ndarray],
    run_b: Callable[[np.ndarray], np.ndarray],
    samples: np.ndarray,
    spec: InputSpec,
    limit: int = 64,
) -> float:
    """Mean cosine similarity of two engines' descriptors over up to ``limit`` samples:
    how far an int8 engine drifts from its fp32 original."""
    sims: list[np.ndarray] = []
    for batch in batches(samples[:limit], spec):
        a, b = run_a(batch), run_b(batch)
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        sims.append(np.sum(a * b, axis=1))
    return float(np.mean(np.concatenate(sims)))
