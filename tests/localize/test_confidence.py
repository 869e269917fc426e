"""How sure ``locate`` is: the distance-ratio rule, its calibration from the build's own
self-test (signed in the manifest), and real answers for views of the cache's world and
of another synthetic world elsewhere."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from takeoff_cache.demo.synthetic import write_corpus
from takeoff_cache.localize.locate import (
    AMBIGUOUS,
    CONFIDENT,
    OUTSIDE,
    Confidence,
    Location,
    Match,
    distance_ratio,
    locate,
    near,
)
from takeoff_cache.localize.selftest import QueryOutcome, View, calibrate, draw_views, render_view
from takeoff_cache.tiles.corpus import open_corpus
from takeoff_cache.trust.keys import load_signer, load_trust_store
from takeoff_cache.trust.manifest import sign_manifest
from tests.support.caches import build_demo_cache
from tests.support.cli import run_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")

TileKey = tuple[int, int, int]
VIEWS = 60


@pytest.fixture(scope="module")
def built(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_cache(demo_source, tmp_path_factory.mktemp("confidence") / "demo")


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another synthetic world (another seed), on another continent."""
    path = tmp_path_factory.mktemp("elsewhere") / "sydney.mbtiles"
    write_corpus(path, n_tiles=60, seed=11, center=(-33.87, 151.21))
    return path


def corpus_tiles(path: Path) -> list[TileKey]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT zoom_level, tile_column, tile_row FROM tiles").fetchall()
    finally:
        db.close()
    return sorted((z, x, (1 << z) - 1 - row) for z, x, row in rows)


def write_views(corpus: Path, seed: str, n: int, out: Path) -> list[tuple[Path, View]]:
    """``n`` drone-like JPEG views of the corpus's tiles whose 8 neighbours it holds, as
    the self-test draws them (any heading, scale, offset, blur, light, noise, JPEG)."""
    tiles = corpus_tiles(corpus)
    held = set(tiles)
    inner = [
        t
        for t in tiles
        if all((t[0], t[1] + dx, t[2] + dy) in held for dx in (-1, 0, 1) for dy in (-1, 0, 1))
    ]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with open_corpus(corpus) as source:
        for i, view in enumerate(draw_views(inner, n, seed)):
            z, x, y = view.tile
            rows = []
            for dy in (-1, 0, 1):
                cells = [
                    np.asarray(Image.open(io.BytesIO(source.read(z, x + dx, y + dy))))
                    for dx in (-1, 0, 1)
                ]
                rows.append(np.concatenate(cells, axis=1))
            mosaic = np.ascontiguousarray(np.concatenate(rows, axis=0))
            path = out / f"view{i:03d}.jpg"
            path.write_bytes(render_view(mosaic, view, mosaic.shape[0] // 3))
            written.append((path, view))
    return written


def answers(built: Path, images: list[Path]) -> list[Location]:
    return locate(built / "cache", images, load_trust_store(built / "trust"))


def signed_rule(built: Path) -> dict[str, object]:
    doc = json.loads((built / "cache" / "Manifest.json").read_text())
    rule: dict[str, object] = doc["signed"]["self_test"]["confidence"]
    return rule


def test_the_build_signs_a_rule_calibrated_by_its_self_test(built: Path) -> None:
    rule = signed_rule(built)
    assert rule["rule"] == "distance_ratio"
    confident_below, outside_above = rule["confident_below"], rule["outside_above"]
    assert isinstance(confident_below, float) and isinstance(outside_above, float)
    assert 0.0 < confident_below < outside_above < 1.0
    # On its own views: the confident ones right at least 97% of the time, and about 95%
    # of them called outside once their own place is left out of the answer.
    assert rule["confident_right"] is not None and float(str(rule["confident_right"])) >= 0.97
    assert float(str(rule["held_out_outside"])) >= 0.9


def test_views_of_another_world_are_outside(
    built: Path, elsewhere: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    views = write_views(elsewhere, "elsewhere", VIEWS, tmp_path / "elsewhere")
    found = answers(built, [path for path, _ in views])
    said = [loc.confidence for loc in found]
    assert said.count(OUTSIDE) / len(said) >= 0.9, said
    assert CONFIDENT not in said

    # The command line says it too, in JSON and in words.
    image = str(views[0][0])
    trust = str(built / "trust")
    result = run_cli(capsys, "locate", str(built / "cache"), image, "--trust", trust, "--json")
    assert result.code == 0, result.err
    (answer,) = result.json()
    assert answer["confidence"] == found[0].confidence
    assert 0.0 <= answer["distance_ratio"] <= 1.0
    human = run_cli(capsys, "locate", str(built / "cache"), image, "--trust", trust)
    assert f"confidence:         {found[0].confidence} (distance ratio" in human.out


def test_confident_answers_on_views_of_the_cache_are_right(built: Path, tmp_path: Path) -> None:
    views = write_views(built / "corpus.mbtiles", "in the cache", VIEWS, tmp_path / "own")
    found = answers(built, [path for path, _ in views])
    confident = [
        (loc, view)
        for loc, (_, view) in zip(found, views, strict=True)
        if loc.confidence == CONFIDENT
    ]
    assert len(confident) >= VIEWS // 10  # the rule does commit itself on its own world
    right = [
        near(view.tile, (loc.matches[0].z, loc.matches[0].x, loc.matches[0].y))
        and loc.matches[0].z == view.tile[0]
        for loc, view in confident
    ]
    assert sum(right) / len(right) >= 0.95
    # Views of the cache are called outside far less often than views of elsewhere.
    assert sum(loc.confidence == OUTSIDE for loc in found) / len(found) <= 0.6


def test_a_cache_built_without_a_self_test_says_it_is_not_calibrated(
    built: Path, tmp_path: Path
) -> None:
    root = Path(shutil.copytree(built, tmp_path / "untested"))
    manifest = root / "cache" / "Manifest.json"
    signed = json.loads(manifest.read_text())["signed"]
    del signed["self_test"]  # as a build under --self-test 0 signs it
    signed["version"] += 1
    manifest.write_bytes(sign_manifest(signed, load_signer(root / "operator.key")))
    views = write_views(root / "corpus.mbtiles", "untested", 2, tmp_path / "views")
    for loc in answers(root, [path for path, _ in views]):
        assert loc.confidence is None and loc.to_json()["confidence"] is None


def m(tile: TileKey, score: float) -> Match:
    return Match(*tile, score)


def test_the_ratio_compares_places_not_neighbours() -> None:
    # The best tile's neighbour and its parent tile count as the same place.
    matches = [
        m((17, 10, 10), 0.98),
        m((17, 11, 10), 0.97),
        m((16, 5, 5), 0.96),
        m((17, 20, 20), 0.90),
    ]
    d = np.sqrt(2 - 2 * np.array([0.98, 0.90]))
    assert distance_ratio(matches) == pytest.approx(d[0] / d[1])
    # With the place left out, the far tile is the best and nothing else remains.
    assert distance_ratio(matches, without=(17, 10, 10)) == 1.0
    assert near((17, 10, 10), (16, 5, 5)) and near((16, 5, 5), (17, 11, 11))
    assert not near((17, 10, 10), (17, 12, 10)) and not near((16, 5, 5), (17, 13, 10))


def test_the_rule_and_its_calibration() -> None:
    rule = Confidence(0.6, 0.9)
    assert [rule.of(r) for r in (0.3, 0.6, 0.75, 0.9, 1.0)] == [
        CONFIDENT,
        CONFIDENT,
        AMBIGUOUS,
        OUTSIDE,
        OUTSIDE,
    ]
    assert Confidence.from_signed(rule.to_json()) == rule
    assert Confidence.from_signed({"rule": "other"}) is None
    assert Confidence.from_signed(None) is None

    # Hits have low ratios, misses high ones; held-out ratios are all high.
    def q(ratio: float, hit: bool, held: float) -> QueryOutcome:
        return QueryOutcome(
            (17, 1, 1), 1 if hit else None, (0, 0), (0, 0), 0.0, (17, 1, 1), 0, 1, None, ratio, held
        )

    queries = [q(0.1 + 0.01 * i, True, 0.95) for i in range(40)]
    queries += [q(0.55, False, 0.96), q(0.7, True, 0.97), q(0.8, False, 0.99)]
    calibrated = calibrate(queries)
    assert calibrated.outside_above == pytest.approx(0.95)
    # Up to 0.7 the views are right 41 times in 42: above 97%; 0.8 would make it 41/43.
    assert calibrated.confident_below == 0.7
