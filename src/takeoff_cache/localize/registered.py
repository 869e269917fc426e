"""The self-test's registered figures: do its views register, and how close is the fix?

The views are the tile-level self-test's own, the first
:data:`REGISTERED_VIEWS` of them (the same seed draws the same geometry and
photometry, :func:`selftest.view_seed`). Each is retrieved (top :data:`DEPTH`)
with the embedding the tile-level self-test gave it, then rendered at the
tiles' full resolution as a camera delivers a photo, not at the
place-recognition engine's smaller input, registered on up to
:data:`.register.PLACES` distinct places among the tiles retrieved
(:func:`.register.register`, by the matcher where the cache has one) and
re-ranked by inliers; a view that does not
register keeps the retrieval's answer and its score-weighted estimate, as
``locate`` answers it.

A rebuild registers again only the views whose outcome may have changed: an
outcome is kept in the work folder under a key of everything that decides it
(:func:`_outcome_keys`), so a 1% tile change registers the few views over or
retrieving a changed tile.

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

import contextlib
import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from takeoff_cache import __version__
from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.core.canonical import content_key
from takeoff_cache.core.fsutil import atomic_write_bytes
from takeoff_cache.core.spaces import SPACE_IDLE_S
from takeoff_cache.core.tilemath import haversine_m, lonlat_to_fractional_tile
from takeoff_cache.features.artifact import FeatureSet
from takeoff_cache.features.extract import Extractor, Features
from takeoff_cache.features.match import Matcher
from takeoff_cache.localize.locate import Localizer, Match, TileKey, estimate_position
from takeoff_cache.localize.register import PLACES, SURE_INLIERS, register
from takeoff_cache.localize.selftest import (
    TOP,
    View,
    ViewJitter,
    ViewReuse,
    draw_route_views,
    draw_views,
    hit_rank,
    render_and_decode,
    view_keys,
    view_seed,
    view_vectors,
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
    reused: int = 0  # views whose outcome was kept from an earlier build

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
            "views_reused": self.reused,
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
    reuse: ViewReuse | None = None,
    remembered: Path | None = None,
    matcher: Matcher | None = None,
) -> RegisteredResult:
    """Retrieve, render and register ``views`` (see the module's docstring).

    ``reuse``: where the self-test keeps its views' embeddings (the same views: their
    retrieval is the tile-level self-test's). ``remembered``: a folder of outcomes kept
    by what decides them (:func:`_outcome_keys`); a view whose pixels, retrieved tiles and
    their bytes, engines, extractor and matcher are all as before is not registered
    again. ``matcher``: the cache's matcher; without one, mutual nearest neighbours match.
    """
    started = time.perf_counter()
    vectors, _ = view_vectors(localizer, corpus_path, views, workers, reuse)
    answers = localizer.search(vectors, DEPTH)
    outcomes: list[RegisteredOutcome | None] = [None] * len(views)
    keys: list[str] = []
    if reuse is not None and remembered is not None:
        keys = _outcome_keys(views, answers, reuse, extractor, tile_px, matcher)
        outcomes = [
            _recall(remembered, key, reuse.tile_sha256, matches)
            for key, matches in zip(keys, answers, strict=True)
        ]
    todo = [i for i, o in enumerate(outcomes) if o is None]
    held = frozenset(localizer.tiles)
    spec = InputSpec("view", tile_px, 3, (0.0,) * 3, (1.0,) * 3)
    for start in range(0, len(todo), _ROUND):
        batch = todo[start : start + _ROUND]
        pixels = np.empty((len(batch), tile_px, tile_px, 3), dtype=np.uint8)
        render_and_decode(
            [views[i] for i in batch], corpus_path, spec, pixels, workers, held, views[0].noise_seed
        )

        def one(j: int, batch: list[int] = batch, pixels: np.ndarray = pixels) -> None:
            i = batch[j]
            outcome, read, depth = _register_view(
                views[i], answers[i], extractor.view(pixels[j]), features, matcher
            )
            outcomes[i] = outcome
            if keys and remembered is not None and reuse is not None:
                kept = Kept(outcome, read, answers[i][:depth], answers[i][:TOP])
                _remember(remembered, keys[i], kept, reuse.tile_sha256)

        # The engine, OpenCV and numpy's products release the GIL: views in parallel.
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="register") as pool:
            list(pool.map(one, range(len(batch))))
    done = tuple(o for o in outcomes if o is not None)
    return RegisteredResult(done, time.perf_counter() - started, len(views) - len(todo))


def _register_view(
    view: View,
    matches: tuple[Match, ...],
    seen: Features,
    features: FeatureSet,
    matcher: Matcher | None = None,
) -> tuple[RegisteredOutcome, set[TileKey], int]:
    """The view's outcome; the tiles whose features decided it (the 3x3 neighbourhood
    of every place the registration tried); and how deep into the retrieval's ranking
    it looked (the rank of the last place tried, or the whole ranking where it ran out
    of places before :data:`.register.PLACES` without a sure fit: a new place further
    down would have been tried)."""
    ranked = [(m.z, m.x, m.y) for m in matches]
    fix, attempts = register(seen, ranked, features, matcher=matcher)
    read = {
        (z, x + dx, y + dy) for z, x, y in (a.candidate for a in attempts) for dx, dy in _AROUND
    }
    last = max(attempts, key=lambda a: a.rank, default=None)
    sure = last is not None and last.fix is not None and last.inliers >= SURE_INLIERS
    depth = last.rank if last is not None and (sure or len(attempts) >= PLACES) else len(ranked)
    if fix is None:
        estimate = estimate_position(matches[:TOP])
        error = haversine_m(*view.center, *estimate)
        hit = hit_rank(view.tile, matches[:1]) == 1
        return RegisteredOutcome(view.tile, False, hit, error, None, 0), read, depth
    z = view.tile[0]
    fx, fy = lonlat_to_fractional_tile(fix.lat, fix.lon, z)
    hit = _same_place(view.tile, (z, math.floor(fx), math.floor(fy)))
    error = haversine_m(*view.center, fix.lat, fix.lon)
    return RegisteredOutcome(view.tile, True, hit, error, fix.sigma_m, fix.inliers), read, depth


@dataclass(frozen=True)
class Kept:
    """What an outcome is kept with, to be checked before it is used again: the tiles
    whose features it read, the ranking as deep as it looked, and the top places whose
    positions and scores the fallback estimate weighs."""

    outcome: RegisteredOutcome
    read: set[TileKey]
    ranked: tuple[Match, ...]
    top: tuple[Match, ...]


_AROUND = tuple((dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1))


# What decides an outcome beside its inputs' bytes: the rendering and registration
# code. A release may change either, so it is part of every outcome's key.
OUTCOME_FORMAT = f"takeoff-cache registered view 1 ({__version__})"


def _outcome_keys(
    views: Sequence[View],
    answers: Sequence[tuple[Match, ...]],
    reuse: ViewReuse,
    extractor: Extractor,
    tile_px: int,
    matcher: Matcher | None = None,
) -> list[str]:
    """Each view's outcome key: its pixels (:func:`selftest.view_key`: geometry,
    photometry, the bytes of the tiles under it), the place-recognition engine, the
    extractor, the matcher where there is one (:attr:`.match.Matcher.space`: its engine
    key, inputs and how matches are taken), the size it is rendered at and
    :data:`OUTCOME_FORMAT`. What else decided it is checked when it is recalled
    (:class:`Kept`, :func:`_recall`): the retrieval as deep as registration looked, and
    the bytes of the tiles whose features it read. A 1% change to the corpus reaches
    few of those, where it reaches one of the 20 tiles retrieved for many views."""
    shas = reuse.tile_sha256
    space: dict[str, Any] = {
        "format": OUTCOME_FORMAT,
        "views": reuse.view_space,
        "features": extractor.space,
        "tile_px": tile_px,
        "depth": DEPTH,
    }
    if matcher is not None:
        # Absent without one: the outcomes kept for a cache without a matcher stay valid.
        space["matcher"] = matcher.space
    pixels = view_keys(views, shas, frozenset(shas))
    return [content_key({"space": space, "view": key}) for key in pixels]


def _recall(
    folder: Path, key: str, tile_sha256: Mapping[TileKey, str], matches: Sequence[Match]
) -> RegisteredOutcome | None:
    """The outcome kept under ``key``, if what decided it is as it was (:class:`Kept`):
    the tiles its registration read have the bytes they had (a tile not in the
    selection reads as None, as it was kept), this retrieval ranks the places as it did
    as deep as registration looked, and, for a view that did not register, the top
    places and their scores are the same."""
    entry = folder / f"{key[:40]}.json"
    try:
        doc = json.loads(entry.read_bytes())
        if doc["key"] != key:
            return None
        for z, x, y, sha in doc["read"]:
            if tile_sha256.get((int(z), int(x), int(y))) != sha:
                return None
        if doc["ranked"] != _places(matches[: len(doc["ranked"])]):
            return None
        if not doc["registered"] and doc["top"] != _places(matches[:TOP], scored=True):
            return None
        outcome = RegisteredOutcome(
            tile=(int(doc["tile"][0]), int(doc["tile"][1]), int(doc["tile"][2])),
            registered=bool(doc["registered"]),
            hit=bool(doc["hit"]),
            error_m=float(doc["error_m"]),
            sigma_m=None if doc["sigma_m"] is None else float(doc["sigma_m"]),
            inliers=int(doc["inliers"]),
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # none kept, or unreadable: registered again
    with contextlib.suppress(OSError):
        os.utime(entry)  # used: kept by prune_registered
    return outcome


def prune_registered(folder: Path, idle_s: float = SPACE_IDLE_S, now: float | None = None) -> int:
    """Delete the kept outcomes no build has used for ``idle_s`` seconds (a week, as the
    stores' spaces); return how many went."""
    now = time.time() if now is None else now
    gone = 0
    for entry in folder.glob("*.json") if folder.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):
            if now - entry.stat().st_mtime > idle_s:
                entry.unlink()
                gone += 1
    return gone


def _places(matches: Sequence[Match], scored: bool = False) -> list[list[Any]]:
    """Matches as kept: their tiles, with their scores (to 5 places) when ``scored``."""
    return [[m.z, m.x, m.y, *([f"{m.score:.5f}"] if scored else [])] for m in matches]


def _remember(folder: Path, key: str, kept: Kept, tile_sha256: Mapping[TileKey, str]) -> None:
    doc = {
        "key": key,
        **dataclasses.asdict(kept.outcome),
        "read": [[*tile, tile_sha256.get(tile)] for tile in sorted(kept.read)],
        "ranked": _places(kept.ranked),
        "top": _places(kept.top, scored=True),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            folder / f"{key[:40]}.json", json.dumps(doc).encode(), point="registered.entry"
        )
    except OSError:
        pass  # a work folder we cannot write to only costs the next build its speed


def _same_place(tile: tuple[int, int, int], found: tuple[int, int, int]) -> bool:
    """``found`` is ``tile`` or one of its 8 neighbours (the self-test's hit)."""
    return found[0] == tile[0] and abs(found[1] - tile[1]) <= 1 and abs(found[2] - tile[2]) <= 1
