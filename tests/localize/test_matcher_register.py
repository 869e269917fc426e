"""A cache built with a matcher backbone registers views by the matcher's scores: a view
cut from known ground lands within metres, the manifest and the report say which
matcher paired the features, a matcher that scores wrong registers nothing (locate falls
back to the retrieval), and the self-test's kept outcomes belong to one matcher."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from takeoff_cache.backbones.file import MATCHER, Backbone
from takeoff_cache.cli.main import main
from takeoff_cache.core.tilemath import haversine_m
from takeoff_cache.demo.models import build_matcher_model
from takeoff_cache.descriptors.store import DescriptorStore
from takeoff_cache.engines import get_backend
from takeoff_cache.engines.base import Runner
from takeoff_cache.features import match
from takeoff_cache.features.match import Matcher
from takeoff_cache.localize.locate import Location, locate
from takeoff_cache.localize.register import open_features, open_matcher
from takeoff_cache.localize.registered import RegisteredResult, evaluate_registered, self_test_views
from takeoff_cache.localize.selftest import View, ViewReuse, render_view
from takeoff_cache.tiles.corpus import open_corpus
from takeoff_cache.trust.keys import load_trust_store
from tests.localize.test_register import TILE_PX, mosaic, view_of
from tests.support.caches import localizer_of

pytestmark = pytest.mark.usefixtures("prefect_harness")

TileKey = tuple[int, int, int]
ENTRY = """
[[backbone]]
name = "matcher"
role = "matcher"
onnx = "models/matcher.onnx"
input = { descriptors = ["descriptors0", "descriptors1"], keypoints = ["keypoints0", "keypoints1"] }
output = "scores"
"""
SELF_TEST = 20
VIEWS = 8


def build_with_matcher(source: Path, dest: Path, *, negate: bool) -> tuple[Path, dict[str, Any]]:
    """A copy of the demo inputs whose backbones add the demo's analytic matcher (or its
    negated, wrong twin), built; the build's report."""
    shutil.copytree(source, dest)
    build_matcher_model(dest / "models" / "matcher.onnx", negate=negate)
    with (dest / "backbones.toml").open("a") as handle:
        handle.write(ENTRY)
    argv = ["build", "--request", str(dest / "request.toml"), "--work-dir", str(dest / "work")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*argv, "--self-test", str(SELF_TEST), "--json"])
    assert code == 0, out.getvalue()
    return dest, json.loads(out.getvalue())


@pytest.fixture(scope="module")
def matched(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return build_with_matcher(demo_source, tmp_path_factory.mktemp("matched") / "m", negate=False)


@pytest.fixture(scope="module")
def garbage(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return build_with_matcher(demo_source, tmp_path_factory.mktemp("garbage") / "g", negate=True)


def cut_view(root: Path, tmp_path: Path) -> tuple[View, Path]:
    """A view across a tile border, turned and scaled, of a tile whose 8 neighbours are in
    the cache; as a JPEG photo."""
    tiles = localizer_of(root)[1].tiles
    tile = next(
        t
        for t in tiles
        if all((t[0], t[1] + i, t[2] + j) in tiles for i in (-1, 0, 1) for j in (-1, 0, 1))
    )
    view = view_of(tile, 37.0, 1.2, 0.42, -0.1)
    image = tmp_path / "view.jpg"
    image.write_bytes(render_view(mosaic(root, tile), view, TILE_PX))
    return view, image


def locate_one(root: Path, image: Path) -> Location:
    (found,) = locate(root / "cache", [image], load_trust_store(root / "trust"), k=5)
    return found


def test_a_view_from_known_ground_registers_within_metres_by_the_matcher(
    matched: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = matched
    paired: list[int] = []
    real = match.Matcher.match

    def counted(self: Matcher, *args: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = real(self, *args)
        paired.append(len(rows))
        return rows, cols

    monkeypatch.setattr(match.Matcher, "match", counted)
    view, image = cut_view(root, tmp_path)
    found = locate_one(root, image)
    assert found.position is not None, found.to_json()
    fix = found.position
    assert haversine_m(*view.center, fix.lat, fix.lon) < 3.0
    assert abs((fix.heading_deg - 37.0 + 180.0) % 360.0 - 180.0) < 2.0
    # The matcher's pairs are what the homography was solved on.
    assert paired and max(paired) >= fix.inliers


def test_the_manifest_and_the_report_name_the_matcher(matched: tuple[Path, Any]) -> None:
    root, report = matched
    doc = json.loads((root / "cache" / "Manifest.json").read_text())
    signed = doc["signed"]
    (features,) = [a for a in signed["artifacts"] if a["kind"] == "local_features"]
    (engine,) = [a for a in signed["artifacts"] if a.get("role") == "matcher"]
    assert features["matcher"] == {
        "backbone": "matcher",
        "engine_key": engine["engine_key"],
        "input": {
            "descriptors": ["descriptors0", "descriptors1"],
            "keypoints": ["keypoints0", "keypoints1"],
        },
        "output": "scores",
    }
    text = resources.files("takeoff_cache").joinpath("schema/manifest.schema.json").read_text()
    validator = Draft202012Validator(json.loads(text))
    assert [e.message for e in validator.iter_errors(doc)] == []
    features["matcher"]["input"]["keypoints"] = ["keypoints0"]
    assert list(validator.iter_errors(doc))  # the schema holds the matcher's fields
    assert report["local_features"]["matcher"] == "matcher"
    registered = report["self_test"]["registered"]
    assert registered["k"] == SELF_TEST and registered["registered_share"] >= 0.8
    assert registered["median_error_m"] < 1.0


def test_a_matcher_that_scores_wrong_registers_nothing_and_locate_falls_back(
    matched: tuple[Path, Any], garbage: tuple[Path, Any], tmp_path: Path
) -> None:
    root, report = garbage
    # The same view registers on the same features with the right matcher (above).
    _, image = cut_view(root, tmp_path)
    found = locate_one(root, image)
    doc = found.to_json()
    assert found.position is None
    assert doc["position"] is None and doc["registered"] is False
    assert doc["best"]["lat"] and doc["matches"]  # the retrieval's answer stands
    assert report["self_test"]["registered"]["registered_share"] == 0.0
    assert matched[1]["self_test"]["registered"]["registered_share"] >= 0.8
    # Retrieval does not use the matcher: its figures are the same.
    assert report["self_test"]["recall_at_1"] == matched[1]["self_test"]["recall_at_1"]


def shas_of(corpus: Path, tiles: tuple[TileKey, ...]) -> dict[TileKey, str]:
    with open_corpus(corpus) as source:
        return {t: hashlib.sha256(source.read(*t)).hexdigest() for t in tiles}


def test_outcomes_kept_for_one_matcher_are_not_taken_for_another(
    matched: tuple[Path, Any], tmp_path: Path
) -> None:
    root, _ = matched
    manifest, localizer = localizer_of(root)
    opened = open_features(root / "cache", manifest)
    found = open_matcher(root / "cache", manifest)
    assert opened is not None and found is not None
    extractor, features = opened
    (engine,) = [a for a in manifest.artifacts if a.fields.get("role") == MATCHER]
    path = root / "cache" / engine.path
    backbone = Backbone("matcher", MATCHER, path, engine.sha256, found.spec, found.output)

    def load() -> Runner:
        return get_backend("onnxruntime").load(path, backbone, found.output)

    # The same network under another engine key: only the key tells them apart.
    other = Matcher(load, found.spec, found.output, "0" * 64, "matcher")
    views = self_test_views(localizer, 200)[:VIEWS]
    corpus = root / "corpus.mbtiles"
    store = DescriptorStore(tmp_path / "store.sqlite")
    kept = tmp_path / "kept"

    def run(matcher: Matcher | None) -> RegisteredResult:
        reuse = ViewReuse(store, "the engine's space", shas_of(corpus, localizer.tiles))
        return evaluate_registered(
            localizer,
            corpus,
            views,
            extractor,
            features,
            reuse=reuse,
            remembered=kept,
            matcher=matcher,
        )

    try:
        first, again, another, without = run(found), run(found), run(other), run(None)
    finally:
        store.close()
    assert (first.reused, again.reused, another.reused, without.reused) == (0, VIEWS, 0, 0)
    assert another.outcomes == first.outcomes == again.outcomes
    assert len(list(kept.iterdir())) == 3 * VIEWS
