"""The self-test: does the cache find drone-like views of its own tiles?

Where the views are drawn (seeded by a string: in a build, :func:`view_seed`
of the index's tiles and the route, so one build identity draws the same
views, and a rebuild after tiles changed draws them again):

- **along the route**, when the flight gives one (:func:`draw_route_views`):
  one view every ``length / k`` along the path, on a tile of the index under
  that position (a random zoom where several are), heading along the route
  plus the rotation jitter, at the scale the flight's altitude there gives
  (:func:`altitude_scale`);
- **uniformly over the area** otherwise (:func:`draw_views`): K distinct tiles,
  each seen from up to a quarter tile off its centre (so it straddles tile
  borders), at any rotation and a scale of 0.7-1.4 (altitude).

Each view is cut from the mosaic of its tile and the 8 neighbours at the same
zoom, of the index's tiles only (the selection, which the build identity
covers: never a corpus tile outside it), then blurred, re-lit, noised and
re-encoded as JPEG. Views are then decoded, embedded and queried exactly as
:func:`locate.locate` does a photo. Given a :class:`ViewReuse`, a view whose
geometry, tiles' bytes and engine are those of a view embedded before takes
its embedding from the descriptor store instead of being rendered again.

A query is a hit at rank r when the r-th tile returned is the view's tile or
one of its 8 neighbours at the same zoom. The position error is the distance
from the view's true centre to the score-weighted estimate. Along a route the
figures are also given per stretch, with the weakest (:func:`route_figures`).
The answers calibrate the rule ``locate`` says how sure it is with
(:func:`calibrate`), which the manifest signs beside the figures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import statistics
import struct
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from takeoff_cache.backbones.preprocess import decode_into, decode_tile
from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.core.canonical import content_key
from takeoff_cache.core.tilemath import (
    fractional_tile_to_latlon,
    haversine_m,
    lonlat_to_fractional_tile,
)
from takeoff_cache.descriptors.store import DescriptorStore
from takeoff_cache.errors import InvalidRequestError
from takeoff_cache.localize.locate import (
    CONFIDENCE_DEPTH,
    CONFIDENT,
    OUTSIDE,
    Confidence,
    Localizer,
    Match,
    TileKey,
    distance_ratio,
    estimate_position,
)
from takeoff_cache.tiles.corpus import open_corpus
from takeoff_cache.tiles.route import Route

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
    km: float | None = None  # along the route, for a view drawn on one

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
    km: float | None = None  # along the route, for a view drawn on one
    ratio: float = 1.0  # locate.distance_ratio of its answer
    held_out_ratio: float = 1.0  # the same with its place left out of the answer

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
    route: dict[str, Any] | None = None  # see route_figures; None without a route
    views_reused: int = 0  # embeddings taken from the descriptor store
    confidence: Confidence | None = None  # calibrated from these queries

    def confidence_figures(self) -> dict[str, Any] | None:
        """The calibrated rule and what it says of the self-test's own views."""
        if self.confidence is None:
            return None
        rule, n = self.confidence, len(self.queries)
        said = [rule.of(q.ratio) for q in self.queries]
        confident = [q for q, c in zip(self.queries, said, strict=True) if c == CONFIDENT]
        return {
            **rule.to_json(),
            "confident_share": round(len(confident) / n, 4),
            "confident_right": round(sum(q.hit for q in confident) / len(confident), 4)
            if confident
            else None,
            "outside_share": round(said.count(OUTSIDE) / n, 4),
            "held_out_outside": round(
                sum(rule.of(q.held_out_ratio) == OUTSIDE for q in self.queries) / n, 4
            ),
        }

    def summary(self) -> dict[str, Any]:
        """The figures for a build report."""
        out: dict[str, Any] = {
            "k": self.k,
            "recall_at_1": round(self.recall_at_1, 4),
            "recall_at_5": round(self.recall_at_5, 4),
            "median_error_m": round(self.median_error_m, 1),
            "seconds": round(self.seconds, 3),
            "views_reused": self.views_reused,
        }
        if self.route is not None:
            out["route"] = self.route
        if self.confidence is not None:
            out["confidence"] = self.confidence_figures()
        return out

    def signed(self) -> dict[str, Any]:
        """The figures a manifest signs: no timing nor reuse (properties of the build
        machine and its work folder, not of the cache), and each query as one row of
        :data:`QUERY_COLUMNS`, for a map."""
        out: dict[str, Any] = {
            "k": self.k,
            "recall_at_1": round(self.recall_at_1, 4),
            "recall_at_5": round(self.recall_at_5, 4),
            "median_error_m": round(self.median_error_m, 1),
            "queries": [_query_row(q) for q in self.queries],
        }
        if self.route is not None:
            out["route"] = self.route
        if self.confidence is not None:
            out["confidence"] = self.confidence_figures()
        return out


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


def view_seed(tiles: Sequence[TileKey], route: Route | None = None) -> str:
    """The seed a build draws its views with: the positions of the index's tiles and the
    route, never their bytes. One build identity thus draws one set of views, and a
    rebuild after some tiles changed draws the same ones (whose embeddings it reuses
    where the tiles under them did not change)."""
    digest = hashlib.sha256(b"takeoff-cache self-test views\0")
    digest.update(np.asarray(tiles, dtype=np.int64).tobytes())
    if route is not None:
        for point in route.points:
            digest.update(struct.pack("<3d", *point, *(0.0,) * (3 - len(point))))
    return digest.hexdigest()


# Scale from altitude, for a route that gives altitudes: at the route's median
# altitude a view shows the ground at the centre of the jitter's scale band (the
# band's geometric mean, about the tile's own scale); flown higher, it sees more
# ground in proportion (a smaller scale), and lower, less. Each view then varies
# by up to this factor either way (terrain, attitude), and stays in the band.
ALTITUDE_SCALE_JITTER = 1.1
# Stretches of route the figures are given for: the route in at most about this
# many, each a whole number of half kilometres; the weakest is chosen among
# stretches with at least MIN_STRETCH_VIEWS views.
STRETCHES = 10
MIN_STRETCH_VIEWS = 5


def altitude_scale(alt_m: float | None, median_alt_m: float | None, jitter: ViewJitter) -> float:
    """The view scale at altitude ``alt_m`` on a route flown at ``median_alt_m`` (the
    centre of the band for a route that gives no altitudes, or a non-positive one)."""
    low, high = jitter.scale
    centre = math.sqrt(low * high)
    if alt_m is None or median_alt_m is None or alt_m <= 0.0 or median_alt_m <= 0.0:
        return centre
    return min(high, max(low, centre * median_alt_m / alt_m))


def _wrap_deg(angle: float) -> float:
    return (angle + 180.0) % 360.0 - 180.0


def draw_route_views(
    tiles: Sequence[TileKey],
    route: Route,
    k: int,
    seed: str,
    jitter: ViewJitter = ViewJitter(),
) -> list[View]:
    """Views at ``k`` positions evenly spaced along ``route``, its ends included.

    Each is seen over the index's tile under its position (a random one of the
    zooms the index has there); a position over no tile of the index (a hole, or
    the route leaving the area) gets no view. Heading: the route's, plus the
    rotation jitter; scale: :func:`altitude_scale`, varied by
    :data:`ALTITUDE_SCALE_JITTER`, where the route gives altitudes, else drawn
    from the band as :func:`draw_views` does.
    """
    rng = np.random.default_rng(seed_of(seed))
    held = set(tiles)
    zooms = sorted({t[0] for t in tiles})
    total_m = route.length_km * 1000.0
    points = list(route.sample(total_m / max(1, k - 1) if total_m > 0 else 1.0))[:k]
    alts = [p.alt_m for p in points if p.alt_m is not None and p.alt_m > 0]
    median_alt = statistics.median(alts) if alts else None
    low, high = jitter.scale
    views = []
    for p in points:
        under = []
        for z in zooms:
            fx, fy = lonlat_to_fractional_tile(p.lat, p.lon, z)
            tile = (z, math.floor(fx), math.floor(fy))
            if tile in held:
                under.append((tile, fx, fy))
        # Drawn for every position, held or not, so a hole does not shift the
        # draws of the views after it.
        pick = int(rng.integers(0, max(1, len(under))))
        turn = float(rng.uniform(-jitter.max_rotation_deg, jitter.max_rotation_deg))
        spread = float(rng.uniform(-1.0, 1.0))
        free_scale = float(math.exp(rng.uniform(*np.log(jitter.scale))))
        photometric = (
            float(rng.uniform(*jitter.contrast)),
            float(rng.uniform(-jitter.brightness, jitter.brightness)),
            float(rng.uniform(*jitter.blur_radius)),
            float(rng.uniform(*jitter.noise_sigma)),
            int(rng.integers(jitter.jpeg_quality[0], jitter.jpeg_quality[1] + 1)),
            int(rng.integers(0, 2**63)),
        )
        if not under:
            continue
        if median_alt is None or p.alt_m is None:
            scale = free_scale
        else:
            varied = altitude_scale(p.alt_m, median_alt, jitter) * ALTITUDE_SCALE_JITTER**spread
            scale = min(high, max(low, varied))
        (z, x, y), fx, fy = under[pick]
        views.append(
            View(
                (z, x, y),
                _wrap_deg(p.heading_deg + turn),
                scale,
                fx - (x + 0.5),
                fy - (y + 0.5),
                *photometric,
                km=p.km,
            )
        )
    return views


def stretch_km(length_km: float) -> float:
    """How long the stretches of a route of ``length_km`` are (see :data:`STRETCHES`)."""
    return max(0.5, math.ceil(length_km / STRETCHES / 0.5) * 0.5)


def _figures(queries: Sequence[QueryOutcome]) -> tuple[float, float, float]:
    n = len(queries)
    return (
        sum(q.rank == 1 for q in queries) / n,
        sum(q.rank is not None for q in queries) / n,
        statistics.median(q.error_m for q in queries),
    )


def route_figures(queries: Sequence[QueryOutcome], length_km: float) -> dict[str, Any]:
    """Recall@1/@5 and median error of the views drawn along a route, overall and per
    stretch of :func:`stretch_km`, and the weakest stretch (lowest Recall@1, the
    earliest of equals) among those with at least :data:`MIN_STRETCH_VIEWS` views."""
    along = [q for q in queries if q.km is not None]
    step = stretch_km(length_km)
    count = max(1, math.ceil(length_km / step - 1e-9))
    groups: list[list[QueryOutcome]] = [[] for _ in range(count)]
    for q in along:
        groups[min(count - 1, int((q.km or 0.0) // step))].append(q)
    stretches = []
    for i, group in enumerate(groups):
        if not group:
            continue
        r1, r5, err = _figures(group)
        stretches.append(
            {
                "from_km": round(i * step, 3),
                "to_km": round(min(length_km, (i + 1) * step), 3),
                "views": len(group),
                "recall_at_1": round(r1, 4),
                "recall_at_5": round(r5, 4),
                "median_error_m": round(err, 1),
            }
        )
    eligible = [s for s in stretches if s["views"] >= MIN_STRETCH_VIEWS]
    weakest = min(eligible, key=lambda s: s["recall_at_1"]) if eligible else None
    r1, r5, err = _figures(along) if along else (0.0, 0.0, 0.0)
    return {
        "recall_at_1": round(r1, 4),
        "recall_at_5": round(r5, 4),
        "median_error_m": round(err, 1),
        "views": len(along),
        "length_km": round(length_km, 3),
        "stretch_km": step,
        "weakest": None
        if weakest is None
        else {k: weakest[k] for k in ("from_km", "to_km", "recall_at_1")},
        "stretches": stretches,
    }


def weakest_text(route: Mapping[str, Any]) -> str | None:
    """``"km 12.0-14.5: Recall@1 0.20"`` for a route's figures, None without a weakest."""
    weak = route.get("weakest")
    if not isinstance(weak, Mapping):
        return None
    return f"km {weak['from_km']:.1f}\u2013{weak['to_km']:.1f}: Recall@1 {weak['recall_at_1']:.2f}"


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
    """3x3 neighbourhoods of corpus tiles, each tile decoded once while it is needed.

    Only the tiles of ``held`` (the index's, which the build identity covers) are
    read: a neighbour outside it is drawn as no imagery, whatever the corpus holds
    there, so the views of one build identity never depend on other tiles.
    """

    def __init__(self, corpus_path: Path, input_size: int, held: frozenset[TileKey]) -> None:
        self._corpus = open_corpus(corpus_path)
        self._input_size = input_size
        self._held = held
        self._decoded: dict[TileKey, np.ndarray | None] = {}
        self.tile_px = 0  # the corpus's tile size
        self.px = 0  # the size tiles are decoded at

    def load(self, tiles: set[TileKey], pool: ThreadPoolExecutor) -> None:
        """Hold the decoded pixels of ``tiles`` (None where missing, undecodable or
        not held)."""
        self._decoded = {t: v for t, v in self._decoded.items() if t in tiles}
        todo = sorted(tiles - self._decoded.keys())
        blobs = self._corpus.read_many([t for t in todo if t in self._held])
        it = iter(blobs)
        blobs = [next(it) if t in self._held else None for t in todo]
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
    views: Sequence[View],
    corpus_path: Path,
    spec: InputSpec,
    pixels: np.ndarray,
    workers: int,
    held: frozenset[TileKey],
    noise_seed: int,
) -> None:
    """Render every view from the tiles of ``held`` and decode it, as ``locate`` decodes a
    photo, into ``pixels``; ``noise_seed``: the shared noise field's."""
    mosaics = _Mosaics(corpus_path, spec.size, held)
    noise: _Noise | None = None
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="self-test") as pool:
            for start in range(0, len(views), _ROUND):
                batch = views[start : start + _ROUND]
                mosaics.load({n for v in batch for n in _neighbours(v.tile)}, pool)
                noise = noise or _Noise(noise_seed, mosaics.px)

                def one(i: int, noise: _Noise = noise) -> None:
                    view = views[i]
                    jpeg = render_view(mosaics.mosaic(view.tile), view, mosaics.tile_px, noise)
                    decode_into(jpeg, spec, pixels[i])

                list(pool.map(one, range(start, start + len(batch))))
    finally:
        mosaics.close()


# What a view's pixels are made by, beside its geometry and tiles: a change to the
# rendering changes this, and with it every view's key.
RENDER_ID = "takeoff-cache self-test render 1"


@dataclass(frozen=True)
class ViewReuse:
    """Where view embeddings are kept between builds: the work folder's descriptor store,
    the engine's descriptor space (:func:`descriptors.store.descriptor_space`) and the
    SHA-256 of each tile of the selection."""

    store: DescriptorStore
    space: str
    tile_sha256: Mapping[TileKey, str]

    @property
    def view_space(self) -> str:
        """The store's space for view embeddings of this engine (never a tile's)."""
        return view_space(self.space)


def view_space(space: str) -> str:
    """The store's space for the self-test's view embeddings beside tile space ``space``."""
    return content_key({"descriptor_space": space, "render": RENDER_ID})


def view_key(view: View, tile_sha256: Mapping[TileKey, str], noise_seed: int) -> str:
    """A view's embedding key: its geometry and photometry, the bytes (SHA-256) of the 9
    tiles its mosaic is made of (None: not held, drawn as no imagery) and the shared
    noise field. The engine is the store space's part (:attr:`ViewReuse.view_space`)."""
    return content_key(
        {
            "view": [
                list(view.tile),
                repr(view.rotation_deg),
                repr(view.scale),
                repr(view.dx),
                repr(view.dy),
                repr(view.contrast),
                repr(view.brightness),
                repr(view.blur_radius),
                repr(view.noise_sigma),
                view.jpeg_quality,
                view.noise_seed,
            ],
            "tiles": [tile_sha256.get(n) for n in _neighbours(view.tile)],
            "noise_field": noise_seed,
        }
    )


def run_self_test(
    localizer: Localizer,
    corpus_path: Path,
    *,
    k: int = DEFAULT_VIEWS,
    seed: str | None = None,
    route: Route | None = None,
    jitter: ViewJitter = ViewJitter(),
    workers: int = 2,
    reuse: ViewReuse | None = None,
) -> SelfTestResult:
    """Draw, render, embed and query ``k`` views of the localizer's tiles: along ``route``
    when given, else uniformly; ``seed``: by default :func:`view_seed`."""
    if k < 1:
        raise InvalidRequestError(f"self-test: the number of views must be >= 1, got {k}")
    started = time.perf_counter()
    seed = view_seed(localizer.tiles, route) if seed is None else seed
    if route is None:
        views = draw_views(localizer.tiles, k, seed, jitter)
    else:
        views = draw_route_views(localizer.tiles, route, k, seed, jitter)
        if not views:
            raise InvalidRequestError(
                "self-test: no position of the route lies over a tile of the index"
            )
    result = evaluate_views(
        localizer, corpus_path, views, workers=workers, started=started, reuse=reuse
    )
    if route is None:
        return result
    return dataclasses.replace(result, route=route_figures(result.queries, route.length_km))


def evaluate_views(
    localizer: Localizer,
    corpus_path: Path,
    views: Sequence[View],
    *,
    workers: int = 2,
    started: float | None = None,
    reuse: ViewReuse | None = None,
) -> SelfTestResult:
    """Render, embed and query the given views (:func:`run_self_test` draws them)."""
    if not views:
        raise InvalidRequestError("self-test: no views to evaluate")
    started = time.perf_counter() if started is None else started
    vectors, reused = view_vectors(localizer, corpus_path, views, workers, reuse)
    answers = localizer.search(vectors, max(TOP, CONFIDENCE_DEPTH))
    queries = []
    for view, deep in zip(views, answers, strict=True):
        matches = deep[:TOP]
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
                view.km,
                distance_ratio(deep),
                distance_ratio(deep, without=view.tile),
            )
        )
    r1, r5, err = _figures(queries)
    return SelfTestResult(
        len(queries),
        r1,
        r5,
        err,
        time.perf_counter() - started,
        tuple(queries),
        views_reused=reused,
        confidence=calibrate(queries),
    )


# The confidence rule's calibration. "outside": from the ratio below which only
# this share of the views falls once their own place is left out of the answer
# (each view of the self-test doubles as a view of a place the cache lacks). A
# view of somewhere else entirely stands out less from the area than the area's
# own places do, so this share bounds how many such views pass as in the cache.
OUTSIDE_QUANTILE = 0.05
# "confident": up to the largest ratio at which the views at or below it were
# still right this often (a margin above the 95% promised).
CONFIDENT_PRECISION = 0.97


def calibrate(queries: Sequence[QueryOutcome]) -> Confidence:
    """The confidence rule from the self-test's hits and misses (see above); thresholds
    rounded as the manifest records them, so the rule signed is the rule measured."""
    held_out = np.array([q.held_out_ratio for q in queries], dtype=np.float64)
    outside_above = round(float(np.quantile(held_out, OUTSIDE_QUANTILE)), 4)
    ratios = np.array([q.ratio for q in queries], dtype=np.float64)
    order = np.argsort(ratios, kind="stable")
    hits = np.array([q.hit for q in queries], dtype=np.float64)[order]
    precision = np.cumsum(hits) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero((precision >= CONFIDENT_PRECISION) & (ratios[order] < outside_above))
    confident_below = math.floor(float(ratios[order][ok[-1]]) * 1e4) / 1e4 if ok.size else 0.0
    return Confidence(confident_below, outside_above)


def view_vectors(
    localizer: Localizer,
    corpus_path: Path,
    views: Sequence[View],
    workers: int,
    reuse: ViewReuse | None,
) -> tuple[np.ndarray, int]:
    """The embeddings of ``views`` rendered from the localizer's tiles, those ``reuse``
    holds taken from it and the rest embedded (and kept there); and how many were reused."""
    noise_seed = views[0].noise_seed
    held = frozenset(localizer.tiles)
    if reuse is None:
        return _embed_views(localizer, corpus_path, views, workers, held, noise_seed), 0
    held = held & frozenset(reuse.tile_sha256)
    keys = view_keys(views, reuse.tile_sha256, held)
    space = reuse.view_space
    vectors, ok = reuse.store.vectors(space, keys, None)
    todo = np.flatnonzero(~ok).tolist()
    if not todo:
        reuse.store.mark_used(space)
        return vectors, len(views)
    fresh = _embed_views(
        localizer, corpus_path, [views[i] for i in todo], workers, held, noise_seed
    )
    if vectors.shape[1] != fresh.shape[1]:  # nothing stored yet, or of another size
        vectors = np.zeros((len(views), fresh.shape[1]), dtype=np.float32)
        if len(todo) < len(views):
            todo = list(range(len(views)))
            fresh = _embed_views(localizer, corpus_path, views, workers, held, noise_seed)
    vectors[todo] = fresh
    reuse.store.put(space, [keys[i] for i in todo], fresh)
    return vectors, len(views) - len(todo)


def view_keys(
    views: Sequence[View], tile_sha256: Mapping[TileKey, str], held: frozenset[TileKey]
) -> list[str]:
    """Each view's :func:`view_key`, its mosaic made of the tiles of ``held``."""
    shas = {t: tile_sha256[t] for t in held if t in tile_sha256}
    return [view_key(v, shas, views[0].noise_seed) for v in views]


def _embed_views(
    localizer: Localizer,
    corpus_path: Path,
    views: Sequence[View],
    workers: int,
    held: frozenset[TileKey],
    noise_seed: int,
) -> np.ndarray:
    pixels = localizer.empty_pixels(len(views))
    render_and_decode(views, corpus_path, localizer.spec, pixels, workers, held, noise_seed)
    return localizer.embed(pixels)


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
