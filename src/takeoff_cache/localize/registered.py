"""The self-test's registered figures: do its views register, and how close is the fix?

The views are the tile-level self-test's own, the first
:data:`REGISTERED_VIEWS` of them (the same seed draws the same geometry and
photometry, :func:`selftest.view_seed`), rendered at the tiles'
full resolution as a camera delivers a photo, not at the place-recognition
engine's smaller input. Each is retrieved (top :data:`DEPTH`), registered
on up to :data:`.register.PLACES` distinct places among them
(:func:`.register.register`) and re-ranked by inliers; a view that does not
register keeps the retrieval's answer and its score-weighted estimate, as
``locate`` answers it.

Figures: the share of views registered; Recall@1 after re-ranking (the tile
under the fix at the view's zoom, or the retrieval's top tile where there is no
fix, is the view's tile or one of its 8 neighbours: a fix found on the tile of
another zoom that holds the same ground counts); the median and 90th percentile
of the position error over every view (the fix where there is one, else the
retrieval's estimate);
over the registered views, the median 1-sigma and the share whose error is
within two sigma.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.core.tilemath import haversine_m, lonlat_to_fractional_tile
from takeoff_cache.features.artifact import FeatureSet
from takeoff_cache.features.extract import Extractor
from takeoff_cache.localize.locate import Localizer, Match, estimate_position
from takeoff_cache.localize.register import register
from takeoff_cache.localize.selftest import (
    TOP,
    View,
    ViewJitter,
    draw_route_views,
    draw_views,
    hit_rank,
    render_and_decode,
    view_seed,
)
from takeoff_cache.tiles.route import Route

# Views rendered, retrieved and registered at once: bounds the pixels held.
_ROUND = 32
# Tiles retrieved per view, from which register() takes its distinct places.
DEPTH = 4 * TOP
# Views registered at most: a view costs about 0.1-0.2 CPU-s to register (its
# features at three scales, five places matched), a hundred times its retrieval,
# so a build's self-test registers the first 50 of its views (about 5 CPU-s).
REGISTERED_VIEWS = 50


@dataclass(frozen=True)
class RegisteredOutcome:
    """One view's registered answer."""

    tile: tuple[int, int, int]
    registered: bool
    hit: bool  # after re-ranking
    error_m: float
    sigma_m: float | None
    inliers: int


@dataclass(frozen=True)
class RegisteredResult:
    outcomes: tuple[RegisteredOutcome, ...]
    seconds: float

    def summary(self) -> dict[str, Any]:
        n = len(self.outcomes)
        errors = np.array([o.error_m for o in self.outcomes], dtype=np.float64)
        fixed = [o for o in self.outcomes if o.registered]
        return {
            "k": n,
            "registered_share": round(len(fixed) / n, 4) if n else 0.0,
            "recall_at_1": round(sum(o.hit for o in self.outcomes) / n, 4) if n else 0.0,
            "median_error_m": round(float(np.median(errors)), 2) if n else None,
            "p90_error_m": round(float(np.quantile(errors, 0.9)), 2) if n else None,
            "median_sigma_m": round(statistics.median(o.sigma_m or 0.0 for o in fixed), 2)
            if fixed
            else None,
            "within_2_sigma": round(
                sum(o.error_m <= 2.0 * (o.sigma_m or 0.0) for o in fixed) / len(fixed), 4
            )
            if fixed
            else None,
            "seconds": round(self.seconds, 3),
        }


def self_test_views(
    localizer: Localizer, k: int, route: Route | None = None, seed: str | None = None
) -> list[View]:
    """The first :data:`REGISTERED_VIEWS` of the views :func:`selftest.run_self_test`
    draws for the same arguments."""
    seed = view_seed(localizer.tiles, route) if seed is None else seed
    if route is None:
        views = draw_views(localizer.tiles, k, seed, ViewJitter())
    else:
        views = draw_route_views(localizer.tiles, route, k, seed, ViewJitter())
    return views[:REGISTERED_VIEWS]


def evaluate_registered(
    localizer: Localizer,
    corpus_path: Path,
    views: Sequence[View],
    extractor: Extractor,
    features: FeatureSet,
    *,
    tile_px: int = 256,
    workers: int = 2,
) -> RegisteredResult:
    """Render, retrieve and register ``views`` (see the module's docstring)."""
    started = time.perf_counter()
    held = frozenset(localizer.tiles)
    spec = InputSpec("view", tile_px, 3, (0.0,) * 3, (1.0,) * 3)
    size = localizer.spec.size
    outcomes: list[RegisteredOutcome] = []
    for start in range(0, len(views), _ROUND):
        batch = views[start : start + _ROUND]
        pixels = np.empty((len(batch), tile_px, tile_px, 3), dtype=np.uint8)
        render_and_decode(batch, corpus_path, spec, pixels, workers, held, batch[0].noise_seed)
        small = localizer.empty_pixels(len(batch))
        for i, p in enumerate(pixels):
            small[i] = cv2.resize(p, (size, size), interpolation=cv2.INTER_AREA)
        answers = localizer.query(small, DEPTH)

        def one(
            i: int,
            batch: Sequence[View] = batch,
            pixels: np.ndarray = pixels,
            answers: list[tuple[Match, ...]] = answers,
        ) -> RegisteredOutcome:
            view, matches = batch[i], answers[i]
            fix, _ = register(
                extractor.view(pixels[i]), [(m.z, m.x, m.y) for m in matches], features
            )
            if fix is None:
                estimate = estimate_position(matches[:TOP])
                error = haversine_m(*view.center, *estimate)
                hit = hit_rank(view.tile, matches[:1]) == 1
                return RegisteredOutcome(view.tile, False, hit, error, None, 0)
            z = view.tile[0]
            fx, fy = lonlat_to_fractional_tile(fix.lat, fix.lon, z)
            hit = _same_place(view.tile, (z, math.floor(fx), math.floor(fy)))
            error = haversine_m(*view.center, fix.lat, fix.lon)
            return RegisteredOutcome(view.tile, True, hit, error, fix.sigma_m, fix.inliers)

        # The engine, OpenCV and numpy's products release the GIL: views in parallel.
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="register") as pool:
            outcomes += pool.map(one, range(len(batch)))
    return RegisteredResult(tuple(outcomes), time.perf_counter() - started)


def _same_place(tile: tuple[int, int, int], found: tuple[int, int, int]) -> bool:
    """``found`` is ``tile`` or one of its 8 neighbours (the self-test's hit)."""
    return found[0] == tile[0] and abs(found[1] - tile[1]) <= 1 and abs(found[2] - tile[2]) <= 1
