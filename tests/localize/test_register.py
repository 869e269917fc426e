"""A registered fix on a real demo cache: a view cut from known ground registers within a
few metres of it, with its heading; a view of another world does not, and says so."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from takeoff_cache.backbones.preprocess import decode_tile
from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.core.tilemath import haversine_m
from takeoff_cache.demo.synthetic import render_tile
from takeoff_cache.localize.locate import Location, locate
from takeoff_cache.localize.register import MIN_INLIERS, distinct_places, mutual_matches
from takeoff_cache.localize.selftest import View, render_view
from takeoff_cache.tiles.corpus import open_corpus
from takeoff_cache.trust.keys import load_trust_store
from tests.support.caches import build_demo_cache, localizer_of

pytestmark = pytest.mark.usefixtures("prefect_harness")

TILE_PX = 256


@pytest.fixture(scope="module")
def built(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("register") / "built"
    return build_demo_cache(demo_source, root, "--self-test", "0")


def mosaic(root: Path, tile: tuple[int, int, int]) -> np.ndarray:
    """The 3x3 tiles about ``tile`` at full size, from the corpus."""
    z, x, y = tile
    spec = InputSpec("tile", TILE_PX, 3, (0.0,) * 3, (1.0,) * 3)
    out = np.zeros((3 * TILE_PX, 3 * TILE_PX, 3), dtype=np.uint8)
    with open_corpus(root / "corpus.mbtiles") as corpus:
        for r, dy in enumerate((-1, 0, 1)):
            for c, dx in enumerate((-1, 0, 1)):
                blob = corpus.read(z, x + dx, y + dy)
                out[r * TILE_PX : (r + 1) * TILE_PX, c * TILE_PX : (c + 1) * TILE_PX] = decode_tile(
                    blob, spec
                )
    return out


def view_of(
    tile: tuple[int, int, int], rotation: float, scale: float, dx: float, dy: float
) -> View:
    return View(tile, rotation, scale, dx, dy, 1.1, 8.0, 0.6, 3.0, 80, 5)


def locate_one(root: Path, image: Path) -> Location:
    (found,) = locate(root / "cache", [image], load_trust_store(root / "trust"), k=5)
    return found


@pytest.mark.parametrize(
    ("rotation", "scale", "dx", "dy"),
    [(37.0, 1.2, 0.42, -0.1), (-140.0, 0.8, -0.3, 0.45), (95.0, 1.0, 0.0, 0.0)],
)
def test_a_view_from_known_ground_registers_within_metres(
    built: Path, tmp_path: Path, rotation: float, scale: float, dx: float, dy: float
) -> None:
    tiles = localizer_of(built)[1].tiles
    # A tile with its 8 neighbours in the cache: the view straddles a tile border.
    tile = next(
        t
        for t in tiles
        if all((t[0], t[1] + i, t[2] + j) in tiles for i in (-1, 0, 1) for j in (-1, 0, 1))
    )
    view = view_of(tile, rotation, scale, dx, dy)
    image = tmp_path / "view.jpg"
    image.write_bytes(render_view(mosaic(built, tile), view, TILE_PX))
    found = locate_one(built, image)
    assert found.position is not None, found.to_json()
    fix = found.position
    assert haversine_m(*view.center, fix.lat, fix.lon) < 3.0
    assert abs((fix.heading_deg - rotation + 180.0) % 360.0 - 180.0) < 2.0
    assert fix.inliers >= MIN_INLIERS and 0.0 < fix.sigma_m < 5.0
    doc = found.to_json()
    assert doc["registered"] is True
    assert set(doc["position"]) == {"lat", "lon", "sigma_m", "heading_deg", "inliers", "tile"}
    # The tile under the fix is the one under the view's centre.
    z, x, y = tile
    fx, fy = x + 0.5 + dx, y + 0.5 + dy
    assert doc["position"]["tile"] == f"{z}/{math.floor(fx)}/{math.floor(fy)}"


def test_a_view_of_another_world_does_not_register_and_says_so(built: Path, tmp_path: Path) -> None:
    tiles = localizer_of(built)[1].tiles
    z, x, y = tiles[len(tiles) // 2]
    # Another demo world (another seed), far from the cache's area.
    elsewhere = render_tile(z, x + 300, y - 200, seed=1234)
    image = tmp_path / "elsewhere.jpg"
    buf = io.BytesIO()
    Image.fromarray(elsewhere).save(buf, format="JPEG", quality=85)
    image.write_bytes(buf.getvalue())
    found = locate_one(built, image)
    doc = found.to_json()
    assert found.position is None
    assert doc["position"] is None and doc["registered"] is False
    # The retrieval's answer stands in for it.
    assert doc["best"]["lat"] and doc["matches"]


def test_mutual_matches_keep_only_unambiguous_pairs() -> None:
    rng = np.random.default_rng(0)
    database = rng.standard_normal((50, 16)).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    query = database[[3, 7, 11]] + 0.01 * rng.standard_normal((3, 16)).astype(np.float32)
    query = np.vstack([query, database[20] + database[21]])  # halfway: ambiguous
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    qi, ci = mutual_matches(query, database)
    assert list(zip(qi.tolist(), ci.tolist(), strict=True)) == [(0, 3), (1, 7), (2, 11)]


def test_distinct_places_skip_neighbours_at_one_zoom() -> None:
    ranked = [(17, 10, 10), (17, 11, 10), (16, 5, 5), (17, 10, 12), (17, 9, 9), (17, 20, 20)]
    assert distinct_places(ranked, 3) == [(1, (17, 10, 10)), (3, (16, 5, 5)), (4, (17, 10, 12))]
