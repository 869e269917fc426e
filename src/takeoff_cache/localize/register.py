"""A registered fix: where on the ground a view's centre is, in metres, not tiles.

For each retrieved tile (a candidate) the view's local features are matched
against the features of the candidate and its 8 neighbours at the same zoom
(a view straddles tile borders), all placed in the candidate's own tile
coordinates: by the ``matcher`` backbone's engine where the cache has one
(:class:`.match.Matcher`, the view's keypoints and the neighbourhood's each as
fractions of their image), else as mutual nearest neighbours of the unit
descriptors whose distance is below :data:`RATIO` times the second nearest's
(Lowe's ratio test). A
homography from the view to the ground is solved on those matches by RANSAC
(OpenCV's MAGSAC++, :data:`RANSAC_PX` in pixels of a 256-pixel tile), the
candidates are re-ranked by their inlier count, and the best, if it has
:data:`MIN_INLIERS` inliers or more and a plausible homography, is the fix:
the view's centre mapped through it to Web Mercator tile coordinates and
latitude/longitude.

**heading_deg**: the direction the view's top edge faces, clockwise from
north, through the same homography.

**sigma_m**, the 1-sigma horizontal error: the inliers' reprojection residuals
``r_i`` (ground units) give the per-axis noise of one match,
``s^2 = sum(r_i^2) / (2n - 8)`` (2n coordinates, 8 parameters); a point
estimated from n matches spread about their centroid ``m`` has per-axis
variance ``s^2 (1/n + |c - m|^2 / sum |p_i - m|^2)`` at ``c`` (the
least-squares fit's leverage), and the horizontal error is the square root of
twice that (two axes), in metres of ground at the fix's latitude and zoom, with
a floor of :data:`SIGMA_FLOOR` ground units per axis added in quadrature
(``sigma = sqrt(2 (s^2 leverage + floor^2))``): the fit's residuals cannot show
an offset that every match shares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from takeoff_cache.backbones.file import LOCAL_FEATURES, MATCHER, Backbone, load_backbones
from takeoff_cache.backbones.spec import MatcherInput
from takeoff_cache.core.tilemath import fractional_tile_to_latlon
from takeoff_cache.engines import get_backend
from takeoff_cache.engines.base import Runner
from takeoff_cache.errors import BackboneError, DescriptorError
from takeoff_cache.features.artifact import FeatureSet
from takeoff_cache.features.extract import Extractor, Features, NetworkExtractor, SiftExtractor
from takeoff_cache.features.match import Matcher
from takeoff_cache.features.pipeline import features_key
from takeoff_cache.trust.manifest import Artifact, Manifest

TileKey = tuple[int, int, int]

RATIO = 0.95
MIN_INLIERS = 15
# Ground units per tile for the homography: pixels of a 256-pixel tile, whatever
# size features were read at (keypoints are fractions of their image).
UNIT = 256.0
RANSAC_PX = 4.0
# A view seen at 0.2x to 5x the tiles' scale; a homography outside is a bad fit.
SCALE_RANGE = (0.2, 5.0)
EARTH_CIRCUMFERENCE_M = 40075016.686
# A fit with this many inliers is taken without trying the places after it: on the
# demo a wrong place never came near it, and most views stop at their first place.
SURE_INLIERS = 60
# Query rows per block of similarities (:func:`mutual_matches`).
_BLOCK = 256
# Distinct places registered per view (:func:`distinct_places`).
PLACES = 5
# Per-axis error no fit gets below, in ground units (pixels of a 256-pixel tile):
# keypoints lie on whole pixels of the image they were found in, and the
# residuals of one fit do not show an offset every match shares.
SIGMA_FLOOR = 0.25


@dataclass(frozen=True)
class Registration:
    """A view registered on the ground: its centre, heading, how sure, against what."""

    lat: float
    lon: float
    sigma_m: float
    heading_deg: float
    inliers: int
    tile: TileKey  # the tile under the view's centre
    candidate: TileKey  # the retrieved tile whose neighbourhood it registered on
    rank: int  # that tile's rank in the retrieval, 1-based

    @property
    def zxy(self) -> str:
        return f"{self.tile[0]}/{self.tile[1]}/{self.tile[2]}"

    def to_json(self) -> dict[str, Any]:
        return {
            "lat": round(self.lat, 7),
            "lon": round(self.lon, 7),
            "sigma_m": round(self.sigma_m, 2),
            "heading_deg": round(self.heading_deg, 1),
            "inliers": self.inliers,
            "tile": self.zxy,
        }


@dataclass(frozen=True)
class Attempt:
    """One candidate's fit: its inliers (0 when none) and the fix it gives."""

    candidate: TileKey
    rank: int
    inliers: int
    fix: Registration | None


def neighbourhood(features: FeatureSet, tile: TileKey) -> tuple[np.ndarray, np.ndarray] | None:
    """Keypoints of ``tile`` and its 8 neighbours in ``tile``'s coordinates (fractions of
    it, so a neighbour's lie in [-1, 2]) and their unit descriptors; None if none."""
    z, x, y = tile
    points, units = [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            found = features.of((z, x + dx, y + dy))
            if found is None:
                continue
            points.append(found.keypoints + np.array([dx, dy], dtype=np.float32))
            units.append(found.unit())
    if not points:
        return None
    return np.concatenate(points), np.concatenate(units)


def mutual_matches(query: np.ndarray, database: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (query, database) that are each other's nearest neighbours and pass
    the ratio test (:data:`RATIO`); unit descriptors in.

    The similarities are taken :data:`_BLOCK` query rows at a time, the best of each
    database column carried from block to block: a whole matrix (768 x 2304 for
    a view on a place) would be 7 MB at a time, for every image of a ``locate``.
    """
    if len(query) == 0 or len(database) < 2:
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty
    n, m = len(query), len(database)
    best = np.empty(n, dtype=np.intp)
    first = np.empty(n, dtype=np.float32)
    second = np.empty(n, dtype=np.float32)
    column_best = np.full(m, -np.inf, dtype=np.float32)
    back = np.zeros(m, dtype=np.intp)
    columns = np.arange(m)
    for start in range(0, n, _BLOCK):
        sim = query[start : start + _BLOCK] @ database.T
        rows = np.arange(len(sim))
        b = sim.argmax(axis=1)
        f = sim[rows, b]
        sim[rows, b] = -np.inf
        best[start : start + len(sim)] = b
        first[start : start + len(sim)] = f
        second[start : start + len(sim)] = sim.max(axis=1)
        sim[rows, b] = f
        top = sim.argmax(axis=0)
        value = sim[top, columns]
        better = value > column_best
        column_best[better] = value[better]
        back[better] = top[better] + start
    # Unit vectors: distance^2 = 2 - 2 cos.
    d1 = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * first))
    d2 = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * second))
    rows = np.arange(n)
    keep = (d1 < RATIO * d2) & (back[best] == rows)
    return rows[keep], best[keep]


def _apply(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.c_[points, np.ones(len(points))] @ h.T
    out: np.ndarray = p[:, :2] / p[:, 2:3]
    return out


def _fit(
    view: Features,
    units: np.ndarray,
    tile: TileKey,
    rank: int,
    ground: tuple[np.ndarray, np.ndarray],
    matcher: Matcher | None,
) -> Attempt:
    """``units``: the view's unit descriptors."""
    import cv2

    points, ground_units = ground
    if matcher is None:
        qi, ci = mutual_matches(units, ground_units)
    else:
        # The neighbourhood spans [-1, 2] of the candidate: as fractions of itself.
        qi, ci = matcher.match(view.keypoints, units, (points + 1.0) / 3.0, ground_units)
    if len(qi) < MIN_INLIERS:
        return Attempt(tile, rank, 0, None)
    src = (view.keypoints[qi] * UNIT).astype(np.float64)
    dst = (points[ci] * UNIT).astype(np.float64)
    h, mask = cv2.findHomography(
        src, dst, cv2.USAC_MAGSAC, RANSAC_PX, maxIters=2000, confidence=0.999
    )
    if h is None or mask is None or not np.all(np.isfinite(h)):
        return Attempt(tile, rank, 0, None)
    inl = mask.ravel().astype(bool)
    n = int(inl.sum())
    det = float(np.linalg.det(h[:2, :2]) / (h[2, 2] ** 2 if h[2, 2] else 1.0))
    scale = math.sqrt(abs(det))
    lo, hi = SCALE_RANGE
    if n < MIN_INLIERS or det <= 0 or not lo <= 1.0 / max(scale, 1e-9) <= hi:
        return Attempt(tile, rank, n if det > 0 else 0, None)
    return Attempt(tile, rank, n, _fix(h, src[inl], dst[inl], tile, rank))


def _fix(h: np.ndarray, src: np.ndarray, dst: np.ndarray, tile: TileKey, rank: int) -> Registration:
    z, x, y = tile
    centre, up = _apply(h, np.array([[UNIT / 2, UNIT / 2], [UNIT / 2, UNIT / 2 - UNIT / 10]]))
    fx, fy = x + centre[0] / UNIT, y + centre[1] / UNIT
    lat, lon = fractional_tile_to_latlon(fx, fy, z)
    dx, dy = up - centre
    heading = math.degrees(math.atan2(dx, -dy)) % 360.0
    n = len(src)
    residuals = np.sum((_apply(h, src) - dst) ** 2)
    s2 = float(residuals) / max(1, 2 * n - 8)
    mean = dst.mean(axis=0)
    spread = float(np.sum((dst - mean) ** 2))
    leverage = 1.0 / n + float(np.sum((centre - mean) ** 2)) / max(spread, 1e-9)
    metres_per_unit = EARTH_CIRCUMFERENCE_M * math.cos(math.radians(lat)) / (2**z * UNIT)
    sigma_m = math.sqrt(2.0 * (s2 * leverage + SIGMA_FLOOR**2)) * metres_per_unit
    under = (z, math.floor(fx), math.floor(fy))
    return Registration(lat, lon, sigma_m, heading, n, under, tile, rank)


def distinct_places(ranked: Sequence[TileKey], places: int) -> list[tuple[int, TileKey]]:
    """Up to ``places`` of the ``ranked`` tiles (with their 1-based ranks), skipping a
    tile next to one already taken at its zoom: its neighbourhood is mostly the same
    ground, and a deeper candidate is worth more than a second look at one place."""
    taken: list[tuple[int, TileKey]] = []
    for rank, tile in enumerate(ranked, 1):
        z, x, y = tile
        if any(t[0] == z and abs(t[1] - x) <= 1 and abs(t[2] - y) <= 1 for _, t in taken):
            continue
        taken.append((rank, tile))
        if len(taken) == places:
            break
    return taken


def register(
    view: Features,
    ranked: Sequence[TileKey],
    features: FeatureSet,
    *,
    places: int = PLACES,
    matcher: Matcher | None = None,
) -> tuple[Registration | None, list[Attempt]]:
    """Register ``view`` on the neighbourhoods of the retrieved tiles ``ranked`` (best
    first), at most ``places`` distinct places (:func:`distinct_places`), its matches
    from ``matcher`` where there is one, else :func:`mutual_matches`.

    Returns the fix (None when no candidate registers) and every attempt, ranked
    by inliers, most first (ties keep the retrieval's order): the re-ranking. A fit
    of :data:`SURE_INLIERS` or more ends the search.
    """
    attempts = []
    units = view.unit()
    for rank, tile in distinct_places(ranked, places):
        ground = neighbourhood(features, tile)
        if ground is None or len(view) < MIN_INLIERS:
            attempts.append(Attempt(tile, rank, 0, None))
            continue
        attempts.append(_fit(view, units, tile, rank, ground, matcher))
        if attempts[-1].fix is not None and attempts[-1].inliers >= SURE_INLIERS:
            break  # no other place would beat it: the places left are not tried
    attempts.sort(key=lambda a: (-(a.inliers if a.fix else 0), a.rank))
    best = attempts[0] if attempts else None
    return (best.fix if best is not None else None), attempts


def _network(
    cache_root: Path, manifest: Manifest, art: Artifact, backbones: Path | None
) -> NetworkExtractor:
    """The local_features engine the features were extracted with, from the cache."""
    ident = art.fields.get("extractor") or {}
    key, name = ident.get("engine_key"), ident.get("backbone")
    engines = [
        a for a in manifest.artifacts if a.kind == "engine" and a.fields.get("engine_key") == key
    ]
    if len(engines) != 1:
        raise DescriptorError("cache: no engine artifact matches the local features' engine key")
    engine = engines[0]
    path = backbones
    if path is None:
        named = manifest.signed.get("request", {}).get("backbones")
        if not isinstance(named, str):
            raise DescriptorError("cache: the manifest names no backbones file; pass one")
        path = Path(named)
    try:
        found = [b for b in load_backbones(path) if b.name == name and b.role == LOCAL_FEATURES]
    except BackboneError as exc:
        raise DescriptorError(f"cache: the input spec of {name!r} is unknown: {exc}") from exc
    if not found:
        raise DescriptorError(f"cache: {path} has no local_features backbone {name!r}")
    spec = found[0].image
    backbone = Backbone(
        str(name), LOCAL_FEATURES, cache_root / engine.path, engine.sha256, spec, None
    )
    backend = get_backend(str(engine.fields.get("backend")))

    def load(output: str) -> Runner:
        return backend.load(cache_root / engine.path, backbone, output)

    return NetworkExtractor(load, spec, str(key), str(name))


def open_features(
    cache_root: Path, manifest: Manifest, *, backbones: Path | None = None
) -> tuple[Extractor, FeatureSet] | None:
    """The extractor and features file that ``manifest`` (already verified) lists; None
    for a cache built without local features.

    The extractor must reproduce the file's signed features key, so a view is never
    read with another extractor (another engine, input spec or OpenCV) than the tiles.
    """
    found = [a for a in manifest.artifacts if a.kind == "local_features"]
    if not found:
        return None
    art = found[0]
    ident = art.fields.get("extractor") or {}
    if ident.get("extractor") == "opencv-sift":
        extractor: Extractor = SiftExtractor()
    else:
        extractor = _network(cache_root, manifest, art, backbones)
    fingerprint = str(manifest.signed.get("corpus", {}).get("fingerprint"))
    if features_key(extractor.space, fingerprint) != art.fields.get("features_key"):
        raise DescriptorError(
            f"cache: {art.path} was extracted by {ident}, which this host cannot reproduce"
            " (another OpenCV, engine or input spec)"
        )
    return extractor, FeatureSet(cache_root / art.path)


def _matcher_input(raw: Any) -> MatcherInput:
    def pair(value: Any) -> tuple[str, str]:
        if not (isinstance(value, list) and len(value) == 2):
            raise DescriptorError(f"cache: the matcher's inputs cannot be read: {raw!r}")
        return str(value[0]), str(value[1])

    if not isinstance(raw, dict):
        raise DescriptorError(f"cache: the matcher's inputs cannot be read: {raw!r}")
    keypoints = raw.get("keypoints")
    return MatcherInput(
        pair(raw.get("descriptors")), None if keypoints is None else pair(keypoints)
    )


def open_matcher(cache_root: Path, manifest: Manifest) -> Matcher | None:
    """The matcher that ``manifest`` (already verified) names beside its local features;
    None for a cache built without one (its views are matched by :func:`mutual_matches`).

    Everything needed is signed in the manifest: the features artifact's ``matcher``
    (backbone, engine key, input names, output) and the engine artifact of that key.
    """
    found = [a for a in manifest.artifacts if a.kind == "local_features"]
    ident = found[0].fields.get("matcher") if found else None
    if not isinstance(ident, dict):
        return None
    key, name, output = ident.get("engine_key"), ident.get("backbone"), ident.get("output")
    spec = _matcher_input(ident.get("input"))
    engines = [
        a for a in manifest.artifacts if a.kind == "engine" and a.fields.get("engine_key") == key
    ]
    if len(engines) != 1 or not isinstance(output, str):
        raise DescriptorError("cache: no engine artifact matches the matcher's engine key")
    engine = engines[0]
    backbone = Backbone(str(name), MATCHER, cache_root / engine.path, engine.sha256, spec, output)
    backend = get_backend(str(engine.fields.get("backend")))

    def load() -> Runner:
        return backend.load(cache_root / engine.path, backbone, output)

    return Matcher(load, spec, output, str(key), str(name))
