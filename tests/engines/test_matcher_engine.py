"""A matcher's engine: compiled like any backbone, run on named inputs whose keypoint
axes change from call to call; TensorRT's profile spans the counts it is ever given."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from takeoff_cache.backbones.file import Backbone, load_backbones, matcher
from takeoff_cache.backbones.spec import PLACE_KEYPOINTS, VIEW_KEYPOINTS, MatcherInput
from takeoff_cache.demo.models import MATCHER_MIN_COSINE, build_matcher_model
from takeoff_cache.engines import get_backend
from takeoff_cache.engines.onnxruntime import OnnxRuntimeBackend
from takeoff_cache.engines.store import engine_key, ensure_engine
from takeoff_cache.engines.tensorrt import matcher_profile
from takeoff_cache.errors import EngineError
from takeoff_cache.features.extract import MAX_KEYPOINTS, VIEW_SCALES

BACKBONES = """
[[backbone]]
name = "vpr"
role = "place_recognition"
onnx = "models/vpr.onnx"
input = { name = "image", size = 32, channels = 3 }
output = "descriptor"

[[backbone]]
name = "m"
role = "matcher"
onnx = "models/matcher.onnx"
input.descriptors = ["descriptors0", "descriptors1"]
input.keypoints = ["keypoints0", "keypoints1"]
output = "scores"
"""


@pytest.fixture
def backbone(tmp_path: Path) -> Backbone:
    from tests.backbones.test_backbones import make_onnx

    make_onnx(tmp_path / "models" / "vpr.onnx")
    # Without a local_features backbone a matcher takes SIFT's width.
    build_matcher_model(tmp_path / "models" / "matcher.onnx", dim=128)
    (tmp_path / "backbones.toml").write_text(BACKBONES)
    found = matcher(load_backbones(tmp_path / "backbones.toml"))
    assert found is not None
    return found


def units(rng: np.random.Generator, n: int, d: int = 128) -> np.ndarray:
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_onnxruntime_runs_a_matcher_at_any_keypoint_counts(
    backbone: Backbone, tmp_path: Path
) -> None:
    backend = OnnxRuntimeBackend()
    record = ensure_engine(backbone, backend, "fp32", None, None, tmp_path / "work")
    runner = backend.load(Path(record.store_path), backbone, "scores")
    rng = np.random.default_rng(0)
    for n, m in ((5, 7), (768, 2304), (1, 1)):
        d0, d1 = units(rng, n), units(rng, m)
        feeds = {
            "descriptors0": d0[None],
            "descriptors1": d1[None],
            "keypoints0": rng.random((1, n, 2), dtype=np.float32),
            "keypoints1": rng.random((1, m, 2), dtype=np.float32),
        }
        scores = runner.run_feeds(feeds)
        assert scores.shape == (1, n, m) and scores.dtype == np.float32
        np.testing.assert_allclose(scores[0], d0 @ d1.T - MATCHER_MIN_COSINE, atol=1e-5)
    with pytest.raises(EngineError, match="not images"):
        runner.run(np.zeros((1, 3, 32, 32), np.float32))


def test_an_int8_request_builds_the_matcher_at_fp32_uncalibrated(
    backbone: Backbone, tmp_path: Path
) -> None:
    backend = OnnxRuntimeBackend()
    # No calibration file is read: a matcher cannot be calibrated with images.
    record = ensure_engine(
        backbone, backend, "int8", tmp_path / "none.npz", "c" * 64, tmp_path / "work"
    )
    assert record.precision == "fp32" and ".fp32." in record.file_name
    again = ensure_engine(backbone, backend, "fp32", None, None, tmp_path / "work")
    assert (again.key, again.built) == (record.key, False)


def test_other_input_names_are_another_engine(backbone: Backbone) -> None:
    backend = OnnxRuntimeBackend()
    host = backend.host_identity()
    renamed = dataclasses.replace(backbone, input=MatcherInput(("descriptors0", "descriptors1")))
    assert engine_key(backbone, backend, host, "fp32", None) != engine_key(
        renamed, backend, host, "fp32", None
    )


def test_the_tensorrt_profile_spans_every_keypoint_count_a_side_is_given(
    backbone: Backbone,
) -> None:
    # A view: every scale's strongest keypoints; a place: its 3 x 3 tiles'.
    assert len(VIEW_SCALES) * MAX_KEYPOINTS == VIEW_KEYPOINTS
    assert 9 * MAX_KEYPOINTS == PLACE_KEYPOINTS
    profile = matcher_profile(backbone)
    assert profile == {
        "descriptors0": ((1, 1, 128), (1, 768, 128), (1, 768, 128)),
        "descriptors1": ((1, 1, 128), (1, 2304, 128), (1, 2304, 128)),
        "keypoints0": ((1, 1, 2), (1, 768, 2), (1, 768, 2)),
        "keypoints1": ((1, 1, 2), (1, 2304, 2), (1, 2304, 2)),
    }
    with pytest.raises(EngineError, match="fixed D"):
        matcher_profile(dataclasses.replace(backbone, descriptor_width=None))


@pytest.mark.gpu
def test_tensorrt_matcher_scores_match_onnxruntime(backbone: Backbone, tmp_path: Path) -> None:
    trt, ort_backend = get_backend("tensorrt"), get_backend("onnxruntime")
    a = ensure_engine(backbone, trt, "fp32", None, None, tmp_path / "work")
    b = ensure_engine(backbone, ort_backend, "fp32", None, None, tmp_path / "work")
    on_gpu = trt.load(Path(a.store_path), backbone, "scores")
    on_cpu = ort_backend.load(Path(b.store_path), backbone, "scores")
    rng = np.random.default_rng(1)
    # Counts at the profile's ends and between, one engine for them all.
    for n, m in ((1, 1), (300, 1500), (VIEW_KEYPOINTS, PLACE_KEYPOINTS)):
        feeds = {
            "descriptors0": units(rng, n)[None],
            "descriptors1": units(rng, m)[None],
            "keypoints0": rng.random((1, n, 2), dtype=np.float32),
            "keypoints1": rng.random((1, m, 2), dtype=np.float32),
        }
        np.testing.assert_allclose(
            on_gpu.run_feeds(feeds), on_cpu.run_feeds(feeds), rtol=1e-3, atol=1e-3
        )
    with pytest.raises(EngineError, match="optimization profile"):
        on_gpu.run_feeds(
            {
                "descriptors0": units(rng, VIEW_KEYPOINTS + 1)[None],
                "descriptors1": units(rng, 5)[None],
                "keypoints0": rng.random((1, VIEW_KEYPOINTS + 1, 2), dtype=np.float32),
                "keypoints1": rng.random((1, 5, 2), dtype=np.float32),
            }
        )
