"""The self-test: does the cache find drone-like views of its own tiles?

K tiles are drawn from the index's tile map (seeded by a string, the build
identity in a build, so a re-run draws the same views). Each view is cut from
the mosaic of its tile and the 8 neighbours at the same zoom, as the camera
of a drone over that tile would see it: rotated by any angle, scaled 0.7-1.4
(altitude), its centre moved up to a quarter tile (so it straddles tile
borders), then blurred, re-lit, noised and re-encoded as JPEG. Views are then
decoded, embedded and queried exactly as :func:`locate.locate` does a photo.

A query is a hit at rank r when the r-th tile returned is the view's tile or
one of its 8 neighbours at the same zoom. The position error is the distance
from the view's true centre to the score-weighted estimate.
"""

from __future__ import annotations

import hashlib
import io
import math
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from takeoff_cache.backbones.preprocess import decode_into, decode_tile
from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.core.tilemath import fractional_tile_to_latlon, haversine_m
from takeoff_cache.errors import InvalidRequestError
from takeoff_cache.localize.locate import Localizer, Match, TileKey, estimate_position
from takeoff_cache.tiles.corpus import open_corpus

DEFAULT_VIEWS = 200
TOP = 5
# Views rendered per round: bounds the decoded tiles held at once (a 3x3
# neighbourhood per view, shared between neighbouring views).
_ROUND = 64
_DECODE_ERRORS = (OSError, ValueError, SyntaxError)


@dataclass(frozen=True)
class ViewJitter:
    """The ranges views are drawn from (uniformly)."""

    max_rotation_deg: float = 180.0
    scale: tuple[float, float] = (0.7, 1.4)  # > 1: closer to the ground than the tile
    max_offset: float = 0.25  # of a tile, along each axis
    contrast: tuple[float, float] = (0.75, 1.25)
    brightness: float = 20.0  # grey levels, either way
    blur_radius: tuple[float, float] = (0.0, 1.5)  # pixels of the tile
    noise_sigma: tuple[float, float] = (0.0, 6.0)  # grey levels
    jpeg_quality: tuple[int, int] = (50, 90)


@dataclass(frozen=True)
class View:
    """One drawn view: which tile, and how it is seen."""

    tile: TileKey
    rotation_deg: float
    scale: float
    dx: float  # centre offset from the tile's centre, in tiles (east)
    dy: float  # (south)
    contrast: float
    brightness: float
    blur_radius: float
    noise_sigma: float
    jpeg_quality: int
    noise_seed: int

    @property
    def center(self) -> tuple[float, float]:
        z, x, y = self.tile
        return fractional_tile_to_latlon(x + 0.5 + self.dx, y + 0.5 + self.dy, z)


@dataclass(frozen=True)
class QueryOutcome:
    """One view's answer, with what a map needs to draw it."""

    tile: TileKey
    rank: int | None  # 1-based rank of the first hit within the top 5; None: a miss
    true: tuple[float, float]  # (lat, lon) of the view's centre
    estimate: tuple[float, float]
    error_m: float
    found: TileKey  # the top-1 tile
    rotation_deg: float
    scale: float

    @property
    def hit(self) -> bool:
        return self.rank == 1


@dataclass(frozen=True)
class SelfTestResult:
    k: int
    recall_at_1: float
    recall_at_5: float
    median_error_m: float
    seconds: float
    queries: tuple[QueryOutcome, ...] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """The figures for a build report or manifest."""
        return {
            "k": self.k,
            "recall_at_1": round(self.recall_at_1, 4),
            "recall_at_5": round(self.recall_at_5, 4),
            "median_error_m": round(self.median_error_m, 1),
            "seconds": round(self.seconds, 3),
        }

    def signed(self) -> dict[str, Any]:
        """The figures a manifest signs: no timing (a property of the build machine, not
        of the cache), and each query as one row of :data:`QUERY_COLUMNS`, for a map."""
        return {
            "k": self.k,
            "recall_at_1": round(self.recall_at_1, 4),
            "recall_at_5": round(self.recall_at_5, 4),
            "median_error_m": round(self.median_error_m, 1),
            "queries": [_query_row(q) for q in self.queries],
        }


# One self-test query in a manifest: its tile, the rank of the first hit (null: none
# in the top 5), true and estimated positions, the top-1 tile, and how it was seen.
QUERY_COLUMNS = (
    "z",
    "x",
    "y",
    "rank",
    "lat",
    "lon",
    "estimate_lat",
    "estimate_lon",
    "found_x",
    "found_y",
    "rotation_deg",
    "scale",
)


def _query_row(q: QueryOutcome) -> list[Any]:
    z, x, y = q.tile
    return [
        z,
        x,
        y,
        q.rank,
        round(q.true[0], 7),
        round(q.true[1], 7),
        round(q.estimate[0], 7),
        round(q.estimate[1], 7),
        q.found[1],
        q.found[2],
        round(q.rotation_deg, 1),
        round(q.scale, 3),
    ]


def queries_from_signed(rows: Any) -> list[QueryOutcome]:
    """The queries a manifest's ``self_test.queries`` holds; rows of another shape are
    skipped (the manifest's signature, not this reader, vouches for them)."""
    out = []
    for row in rows if isinstance(rows, list) else []:
        try:
            z, x, y, rank, lat, lon, elat, elon, fx, fy, rotation, scale = row
            true, estimate = (float(lat), float(lon)), (float(elat), float(elon))
            out.append(
                QueryOutcome(
                    (int(z), int(x), int(y)),
                    None if rank is None else int(rank),
                    true,
                    estimate,
                    haversine_m(*true, *estimate),
                    (int(z), int(fx), int(fy)),
                    float(rotation),
                    float(scale),
                )
            )
        except (TypeError, ValueError):
            continue
    return out


def seed_of(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def draw_views(
    tiles: Sequence[TileKey], k: int, seed: str, jitter: ViewJitter = ViewJitter()
) -> list[View]:
    """``min(k, len(tiles))`` distinct tiles and a view of each, in tile order."""
    rng = np.random.default_rng(seed_of(seed))
    picks = np.sort(rng.choice(len(tiles), size=min(k, len(tiles)), replace=False))
    views = []
    for i in picks.tolist():
        views.append(
            View(
                tiles[i],
                float(rng.uniform(-jitter.max_rotation_deg, jitter.max_rotation_deg)),
                float(math.exp(rng.uniform(*np.log(jitter.scale)))),  # even in log: altitude
                float(rng.uniform(-jitter.max_offset, jitter.max_offset)),
                float(rng.uniform(-jitter.max_offset, jitter.max_offset)),
                float(rng.uniform(*jitter.contrast)),
                float(rng.uniform(-jitter.brightness, jitter.brightness)),
                float(rng.uniform(*jitter.blur_radius)),
                float(rng.uniform(*jitter.noise_sigma)),
                int(rng.integers(jitter.jpeg_quality[0], jitter.jpeg_quality[1] + 1)),
                int(rng.integers(0, 2**63)),
            )
        )
    return views


def _neighbours(tile: TileKey) -> list[TileKey]:
    z, x, y = tile
    return [(z, x + dx, y + dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


_DRAFT_FACTORS = (8, 4, 2, 1)


def working_size(tile_px: int, input_size: int) -> int:
    """The tile size views are cut at: the smallest DCT-domain reduction of the tile
    (1/2, 1/4, 1/8) still at least the engine's input size, as the build decodes
    tiles. Finer detail is lost by the engine's input anyway, and a quarter of the
    pixels cost a quarter of the rendering."""
    for factor in _DRAFT_FACTORS:
        if tile_px % factor == 0 and tile_px // factor >= input_size:
            return tile_px // factor
    return tile_px


class _Mosaics:
    """3x3 neighbourhoods of corpus tiles, each tile decoded once while it is needed."""

    def __init__(self, corpus_path: Path, input_size: int) -> None:
        self._corpus = open_corpus(corpus_path)
        self._input_size = input_size
        self._decoded: dict[TileKey, np.ndarray | None] = {}
        self.tile_px = 0  # the corpus's tile size
        self.px = 0  # the size tiles are decoded at

    def load(self, tiles: set[TileKey], pool: ThreadPoolExecutor) -> None:
        """Hold the decoded pixels of ``tiles`` (None where missing or undecodable)."""
        self._decoded = {t: v for t, v in self._decoded.items() if t in tiles}
        todo = sorted(tiles - self._decoded.keys())
        blobs = self._corpus.read_many(todo)
        if not self.px:
            first = next((b for b in blobs if b is not None), None)
            if first is None:
                raise InvalidRequestError("self-test: none of the sampled tiles is in the corpus")
            self.tile_px = Image.open(io.BytesIO(first)).width
            self.px = working_size(self.tile_px, self._input_size)
        spec = InputSpec("tile", self.px, 3, (0.0,) * 3, (1.0,) * 3)

        def decode(blob: bytes | None) -> np.ndarray | None:
            if blob is None:
                return None
            try:
                return decode_tile(blob, spec)  # the build's decoder
            except _DECODE_ERRORS:
                return None

        self._decoded.update(zip(todo, pool.map(decode, blobs), strict=True))

    def mosaic(self, tile: TileKey) -> np.ndarray:
        t = self.px
        parts = [self._decoded.get(n) for n in _neighbours(tile)]
        out = np.empty((3 * t, 3 * t, 3), dtype=np.uint8)
        fill: np.ndarray | None = None
        for i, part in enumerate(parts):
            r, c = divmod(i, 3)
            cell = out[r * t : (r + 1) * t, c * t : (c + 1) * t]
            if part is not None:
                cell[...] = part
                continue
            if fill is None:
                # No imagery there: flat, rather than invented content.
                present = [p[::8, ::8].reshape(-1, 3) for p in parts if p is not None]
                fill = np.concatenate(present).mean(axis=0) if present else np.full(3, 128.0)
            cell[...] = fill
        return out

    def close(self) -> None:
        self._corpus.close()


class _Noise:
    """One seeded field of Gaussian noise; each view takes its own window of it
    (drawing fresh noise per view cost more than the rest of its rendering)."""

    def __init__(self, seed: int, px: int) -> None:
        rng = np.random.default_rng(seed)
        self.px = px
        self.field = rng.standard_normal((2 * px, 2 * px, 3), dtype=np.float32)

    def window(self, seed: int) -> np.ndarray:
        oy, ox = divmod(seed % (self.px * self.px), self.px)
        return self.field[oy : oy + self.px, ox : ox + self.px]


def render_view(mosaic: np.ndarray, view: View, tile_px: int, noise: _Noise | None = None) -> bytes:
    """The view as the JPEG a camera would deliver, from its 3x3 mosaic.

    ``tile_px``: the corpus tile size, which the blur radius is measured in;
    ``noise``: a shared noise field (else one is drawn for this view alone).
    """
    t = mosaic.shape[0] // 3
    theta = math.radians(view.rotation_deg)
    a, b = math.cos(theta) / view.scale, -math.sin(theta) / view.scale
    d, e = -b, a
    cx, cy = 1.5 * t + view.dx * t, 1.5 * t + view.dy * t
    half = t / 2.0
    # Output pixel (u, v) samples the mosaic at centre + R(theta) (u - half, v - half) / scale.
    coeffs = (a, b, cx - a * half - b * half, d, e, cy - d * half - e * half)
    image = Image.fromarray(mosaic).transform(
        (t, t), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR
    )
    radius = view.blur_radius * t / tile_px
    if radius > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = (pixels - 128.0) * view.contrast + (128.0 + view.brightness)
    if view.noise_sigma > 0:
        field = noise or _Noise(view.noise_seed, t)
        pixels += field.window(view.noise_seed) * view.noise_sigma
    out = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=view.jpeg_quality)
    return buf.getvalue()


def hit_rank(tile: TileKey, matches: Sequence[Match]) -> int | None:
    """1-based rank of the first match that is ``tile`` or one of its 8 neighbours."""
    z, x, y = tile
    for rank, m in enumerate(matches, 1):
        if m.z == z and abs(m.x - x) <= 1 and abs(m.y - y) <= 1:
            return rank
    return None


def render_and_decode(
    views: Sequence[View], corpus_path: Path, spec: InputSpec, pixels: np.ndarray, workers: int
) -> None:
    """Render every view and decode it, as ``locate`` decodes a photo, into ``pixels``."""
    mosaics = _Mosaics(corpus_path, spec.size)
    noise: _Noise | None = None
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="self-test") as pool:
            for start in range(0, len(views), _ROUND):
                batch = views[start : start + _ROUND]
                mosaics.load({n for v in batch for n in _neighbours(v.tile)}, pool)
                noise = noise or _Noise(views[0].noise_seed, mosaics.px)

                def one(i: int, noise: _Noise = noise) -> None:
                    view = views[i]
                    jpeg = render_view(mosaics.mosaic(view.tile), view, mosaics.tile_px, noise)
                    decode_into(jpeg, spec, pixels[i])

                list(pool.map(one, range(start, start + len(batch))))
    finally:
        mosaics.close()


def run_self_test(
    localizer: Localizer,
    corpus_path: Path,
    *,
    k: int = DEFAULT_VIEWS,
    seed: str,
    jitter: ViewJitter = ViewJitter(),
    workers: int = 2,
) -> SelfTestResult:
    """Draw, render, embed and query ``k`` views of the localizer's tiles."""
    if k < 1:
        raise InvalidRequestError(f"self-test: the number of views must be >= 1, got {k}")
    started = time.perf_counter()
    views = draw_views(localizer.tiles, k, seed, jitter)
    return evaluate_views(localizer, corpus_path, views, workers=workers, started=started)


def evaluate_views(
    localizer: Localizer,
    corpus_path: Path,
    views: Sequence[View],
    *,
    workers: int = 2,
    started: float | None = None,
) -> SelfTestResult:
    """Render, embed and query the given views (:func:`run_self_test` draws them)."""
    if not views:
        raise InvalidRequestError("self-test: no views to evaluate")
    started = time.perf_counter() if started is None else started
    pixels = localizer.empty_pixels(len(views))
    render_and_decode(views, corpus_path, localizer.spec, pixels, workers)
    answers = localizer.query(pixels, TOP)
    queries = []
    for view, matches in zip(views, answers, strict=True):
        true, estimate = view.center, estimate_position(matches)
        queries.append(
            QueryOutcome(
                view.tile,
                hit_rank(view.tile, matches),
                true,
                estimate,
                haversine_m(*true, *estimate),
                (matches[0].z, matches[0].x, matches[0].y),
                view.rotation_deg,
                view.scale,
            )
        )
    n = len(queries)
    return SelfTestResult(
        n,
        sum(q.rank == 1 for q in queries) / n,
        sum(q.rank is not None for q in queries) / n,
        statistics.median(q.error_m for q in queries),
        time.perf_counter() - started,
        tuple(queries),
    )


def min_recall(result: SelfTestResult, threshold: float) -> str | None:
    """The failure reason when Recall@1 is below ``threshold``, else None."""
    if not 0.0 <= threshold <= 1.0:
        raise InvalidRequestError(f"min_recall: must be in [0, 1], got {threshold}")
    if result.recall_at_1 >= threshold:
        return None
    return (
        f"self-test: Recall@1 {result.recall_at_1:.3f} is below the minimum {threshold:.3f}"
        f" ({result.k} synthetic views, Recall@5 {result.recall_at_5:.3f}, median error"
        f" {result.median_error_m:.0f} m): the descriptors cannot tell this area's tiles apart"
    )
