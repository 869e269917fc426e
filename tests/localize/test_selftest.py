"""The self-test on real demo caches: the demo backbone localizes its views at any
heading, the weak one does not, and an index whose rows no longer match its tile map
fails the gate."""

from __future__ import annotations

import shutil
from io import BytesIO
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

from takeoff_cache.errors import InvalidRequestError
from takeoff_cache.localize.selftest import (
    SelfTestResult,
    View,
    ViewJitter,
    draw_views,
    min_recall,
    render_view,
    run_self_test,
)
from tests.support.caches import artifact_path, build_demo_cache, localizer_of, replace_and_resign

pytestmark = pytest.mark.usefixtures("prefect_harness")

SEED = "self-test tests"
ANY_ANGLE = ViewJitter()
# A drone that knows its heading to within 15 degrees (compass).
HEADING_KNOWN = ViewJitter(max_rotation_deg=15.0)
GATE = 0.4


@pytest.fixture(scope="module")
def built(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_cache(demo_source, tmp_path_factory.mktemp("selftest") / "demo")


@pytest.fixture(scope="module")
def weak(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_cache(demo_source, tmp_path_factory.mktemp("selftest") / "weak", weak=True)


@pytest.fixture(scope="module")
def demo_result(built: Path) -> SelfTestResult:
    return self_test(built, ANY_ANGLE)


def self_test(root: Path, jitter: ViewJitter = ANY_ANGLE, seed: str = SEED) -> SelfTestResult:
    _, localizer = localizer_of(root)
    return run_self_test(localizer, root / "corpus.mbtiles", seed=seed, jitter=jitter)


def test_the_demo_backbone_localizes_views_at_any_heading(demo_result: SelfTestResult) -> None:
    assert demo_result.k == 80  # every tile of the small corpus, each once
    assert max(abs(q.rotation_deg) for q in demo_result.queries) > 150
    assert demo_result.recall_at_1 >= 0.6
    assert demo_result.recall_at_5 >= 0.8
    # A z17 tile here is ~200 m wide: most views are placed within one tile.
    assert demo_result.median_error_m < 200.0
    assert min_recall(demo_result, GATE) is None


def test_the_weak_backbone_is_clearly_worse(demo_result: SelfTestResult, weak: Path) -> None:
    result = self_test(weak, ANY_ANGLE)
    assert result.recall_at_1 <= demo_result.recall_at_1 - 0.3
    assert result.median_error_m > 2 * demo_result.median_error_m
    reason = min_recall(result, GATE)
    assert reason is not None and "Recall@1" in reason and "below the minimum 0.400" in reason


def test_the_demo_backbone_does_as_well_at_any_heading_as_heading_known(
    built: Path, demo_result: SelfTestResult
) -> None:
    known = self_test(built, HEADING_KNOWN)
    # Its histograms over a centred disc do not change when the view turns.
    assert abs(known.recall_at_1 - demo_result.recall_at_1) <= 0.15
    assert abs(known.recall_at_5 - demo_result.recall_at_5) <= 0.15


def test_a_rerun_gives_the_same_figures_and_another_seed_other_views(
    built: Path, demo_result: SelfTestResult
) -> None:
    again = self_test(built, ANY_ANGLE)
    assert again.queries == demo_result.queries
    assert (again.recall_at_1, again.median_error_m) == (
        demo_result.recall_at_1,
        demo_result.median_error_m,
    )
    _, localizer = localizer_of(built)
    assert draw_views(localizer.tiles, 20, "a") != draw_views(localizer.tiles, 20, "b")
    assert draw_views(localizer.tiles, 20, "a") == draw_views(localizer.tiles, 20, "a")


def test_shuffled_index_rows_fail_the_gate(built: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(built, tmp_path / "shuffled"))
    rel = artifact_path(root, "faiss_index")
    index = faiss.read_index(str(root / "cache" / rel))
    vectors = index.reconstruct_n(0, index.ntotal)
    shuffled = faiss.IndexFlatIP(index.d)
    shuffled.add(vectors[np.random.default_rng(0).permutation(index.ntotal)])
    out = tmp_path / "shuffled.faiss"
    faiss.write_index(shuffled, str(out))
    replace_and_resign(root, rel, out.read_bytes())
    result = self_test(root, ANY_ANGLE)  # the cache verifies: signed by the trusted key
    assert result.recall_at_1 < 0.25
    assert min_recall(result, GATE) is not None


def test_min_recall_refuses_a_threshold_outside_0_1(demo_result: SelfTestResult) -> None:
    with pytest.raises(InvalidRequestError, match=r"min_recall: must be in \[0, 1\]"):
        min_recall(demo_result, 1.5)
    assert min_recall(demo_result, 0.0) is None
    assert min_recall(demo_result, 1.0) is not None or demo_result.recall_at_1 == 1.0


def test_a_view_straddling_a_border_shows_the_neighbour() -> None:
    # Each cell of the 3x3 mosaic has its own flat colour: which ones a view shows
    # is then plain to read.
    t = 64
    colours = np.arange(9, dtype=np.uint8).reshape(3, 3) * 25 + 20
    mosaic = np.repeat(np.repeat(colours, t, axis=0), t, axis=1)[:, :, None].repeat(3, axis=2)
    centred = View((17, 1, 1), 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 95, 0)
    east = View((17, 1, 1), 0.0, 1.0, 0.25, 0.0, 1.0, 0.0, 0.0, 0.0, 95, 0)

    def grey(view: View) -> np.ndarray:
        image = Image.open(BytesIO(render_view(mosaic, view, t))).convert("L")
        return np.asarray(image, dtype=np.int16)

    middle, right = int(colours[1, 1]), int(colours[1, 2])
    assert np.abs(grey(centred) - middle).max() <= 3
    shifted = grey(east)
    assert np.abs(shifted[:, : t // 2 + t // 4 - 4] - middle).max() <= 3
    assert np.abs(shifted[:, -t // 4 + 4 :] - right).max() <= 3


def test_k_must_be_positive(built: Path) -> None:
    _, localizer = localizer_of(built)
    with pytest.raises(InvalidRequestError, match="must be >= 1"):
        run_self_test(localizer, built / "corpus.mbtiles", k=0, seed=SEED)
