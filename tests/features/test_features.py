"""Local features in the cache: extracted once per tile's bytes and extractor, one signed
file in the cache, refused by ``verify`` once changed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from takeoff_cache.demo.synthetic import encode_jpeg, render_tile, replace_tile_bytes
from takeoff_cache.errors import VerificationError
from takeoff_cache.features.artifact import FeatureSet
from takeoff_cache.features.extract import MAX_KEYPOINTS, Features, SiftExtractor, quantize
from takeoff_cache.features.store import pack, unpack
from takeoff_cache.trust.keys import load_trust_store
from takeoff_cache.trust.verify import verify_cache
from tests.support.caches import artifact_path, build_demo_cache
from tests.support.cli import run_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def built(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("features") / "built"
    return build_demo_cache(demo_source, root, "--self-test", "0")


def build(capsys: pytest.CaptureFixture[str], root: Path) -> dict[str, Any]:
    argv = ["build", "--request", str(root / "request.toml"), "--work-dir", str(root / "work")]
    result = run_cli(capsys, *argv, "--self-test", "0", "--json")
    assert result.code == 0, result.err
    return result.json()


def test_every_selected_tile_has_bounded_features_in_the_cache(built: Path) -> None:
    manifest = verify_cache(built / "cache", load_trust_store(built / "trust"))
    (art,) = [a for a in manifest.artifacts if a.kind == "local_features"]
    tiles = {(int(z), int(x), int(y)) for z, x, y in _tile_rows(built)}
    features = FeatureSet(built / "cache" / art.path)
    assert len(features) == len(tiles) == art.fields["count"]
    counts = [len(f) for t in tiles if (f := features.of(t)) is not None]
    assert len(counts) == len(tiles) and max(counts) <= MAX_KEYPOINTS and min(counts) > 50
    assert art.fields["extractor"]["extractor"] == "network"  # the demo's local_features


def _tile_rows(root: Path) -> list[list[int]]:
    import json

    manifest = verify_cache(root / "cache", load_trust_store(root / "trust"))
    (tile_map,) = [a for a in manifest.artifacts if a.kind == "tile_map"]
    rows: list[list[int]] = json.loads((root / "cache" / tile_map.path).read_bytes())["rows"]
    return rows


def test_a_changed_tile_is_the_only_one_extracted_again(
    built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = Path(shutil.copytree(built, tmp_path / "copy"))
    z, x, y = _tile_rows(root)[5]
    replace_tile_bytes(
        root / "corpus.mbtiles", z, x, y, encode_jpeg(render_tile(z, x + 40, y, seed=3))
    )
    report = build(capsys, root)
    assert report["outcome"] == "success"
    lf = report["local_features"]
    assert (lf["generated"], lf["reused"]) == (1, report["tiles"] - 1)
    assert lf["bytes_per_tile"] > 0 and lf["max_keypoints"] == MAX_KEYPOINTS


def test_a_tampered_features_file_fails_verify(built: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(built, tmp_path / "copy"))
    path = root / "cache" / artifact_path(root, "local_features")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(VerificationError) as info:
        verify_cache(root / "cache", load_trust_store(root / "trust"))
    assert any("features" in problem for problem in info.value.problems)


def test_packed_features_round_trip_and_damage_reads_as_absent() -> None:
    rng = np.random.default_rng(1)
    features = Features(
        rng.random((40, 2), dtype=np.float32),
        rng.random(40, dtype=np.float32) + 0.1,
        quantize(rng.standard_normal((40, 24))),
    )
    back = unpack(pack(features))
    assert back is not None
    assert np.abs(back.keypoints - features.keypoints).max() < 1e-4
    assert np.array_equal(back.descriptors, features.descriptors)
    assert unpack(pack(features)[:-1]) is None
    assert unpack(b"not features") is None


def test_sift_reads_a_tile_and_a_turned_copy_alike() -> None:
    tile = render_tile(17, 78290, 45317, seed=0)
    sift = SiftExtractor()
    (upright,) = sift.tiles(tile[None])
    turned = sift.view(np.ascontiguousarray(np.rot90(tile)))
    assert 50 < len(upright) <= MAX_KEYPOINTS and len(turned) > 50
    sim = turned.unit() @ upright.unit().T
    assert float(np.median(sim.max(axis=1))) > 0.9


def test_old_features_files_are_pruned_beyond_the_most_recent(tmp_path: Path) -> None:
    import os

    from takeoff_cache.core.workdir import features_dir, prune_features

    folder = features_dir(tmp_path)
    folder.mkdir()
    now = 100_000.0
    # Oldest first; the last two were written less than an hour ago.
    ages = [9000.0, 8000.0, 7000.0, 6000.0, 600.0, 60.0]
    for i, age in enumerate(ages):
        path = folder / f"keypoints.{i:012d}.features"
        path.write_bytes(b"x")
        os.utime(path, (now - age, now - age))
    removed = prune_features(tmp_path, keep=1, now=now)
    # Beyond the most recent one, all but the one younger than an hour go.
    assert sorted(p.name for p in removed) == [f"keypoints.{i:012d}.features" for i in range(4)]
    assert sorted(p.name for p in folder.iterdir()) == [
        "keypoints.000000000004.features",
        "keypoints.000000000005.features",
    ]
