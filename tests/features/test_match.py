"""A matcher at work: each tensor fed under its name, matches taken from its scores as
docs/backbones.md says (each other's best, above 0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from takeoff_cache.backbones.file import MATCHER, Backbone
from takeoff_cache.backbones.spec import MatcherInput
from takeoff_cache.engines.base import Runner
from takeoff_cache.engines.onnxruntime import OnnxRuntimeBackend
from takeoff_cache.errors import DescriptorError
from takeoff_cache.features.match import Matcher, matches_from_scores

SPEC = MatcherInput(("d_view", "d_place"), ("k_view", "k_place"))


def probe_model(path: Path) -> Path:
    """scores[i, j] = d_view[i] . d_place[j] + k_view[i].x + 10 k_place[j].y: every input
    shows in the scores, each in its own way."""
    const = numpy_helper.from_array
    nodes = [
        helper.make_node("Transpose", ["d_place"], ["d_place_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["d_view", "d_place_t"], ["cosine"]),
        helper.make_node("Slice", ["k_view", "zero", "one", "two"], ["x_view"]),
        helper.make_node("Slice", ["k_place", "one", "two", "two"], ["y_place"]),
        helper.make_node("Transpose", ["y_place"], ["y_place_t"], perm=[0, 2, 1]),
        helper.make_node("Mul", ["y_place_t", "ten"], ["y_place_10"]),
        helper.make_node("Add", ["cosine", "x_view"], ["with_x"]),
        helper.make_node("Add", ["with_x", "y_place_10"], ["scores"]),
    ]
    inits = [
        const(np.array([0], np.int64), "zero"),
        const(np.array([1], np.int64), "one"),
        const(np.array([2], np.int64), "two"),
        const(np.array(10.0, np.float32), "ten"),
    ]
    inputs = [
        helper.make_tensor_value_info("d_view", TensorProto.FLOAT, [1, "N", 4]),
        helper.make_tensor_value_info("d_place", TensorProto.FLOAT, [1, "M", 4]),
        helper.make_tensor_value_info("k_view", TensorProto.FLOAT, [1, "N", 2]),
        helper.make_tensor_value_info("k_place", TensorProto.FLOAT, [1, "M", 2]),
    ]
    out = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, "N", "M"])
    graph = helper.make_graph(nodes, "probe", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def matcher_on(path: Path, engine_key: str = "e" * 64) -> Matcher:
    backbone = Backbone("probe", MATCHER, path, "0" * 64, SPEC, "scores", 4)

    def load() -> Runner:
        return OnnxRuntimeBackend().load(path, backbone, "scores")

    return Matcher(load, SPEC, "scores", engine_key, "probe")


def test_each_input_is_fed_under_its_own_name(tmp_path: Path) -> None:
    matcher = matcher_on(probe_model(tmp_path / "probe.onnx"))
    rng = np.random.default_rng(0)
    dv, dp = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    kv, kp = rng.random((3, 2)), rng.random((5, 2))
    scores = matcher.scores(kv, dv, kp, dp)
    want = dv @ dp.T + kv[:, :1] + 10.0 * kp[:, 1][None, :]
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)


def test_matches_are_each_others_best_above_zero() -> None:
    scores = np.array(
        [
            [0.9, 0.1, 0.0, 0.2],  # 0 <-> 0
            [0.8, 0.3, 0.0, 0.1],  # its best, 0, prefers row 0: none
            [0.0, 0.1, -0.2, -0.5],  # best column 1, which prefers row 1... (0.3): none
            [-0.1, -0.3, -0.1, -0.05],  # each other's best with column 3, but below 0
            [0.0, 0.2, np.nan, 0.0],  # 4 <-> 2 would be NaN: not a match
        ],
        dtype=np.float32,
    )
    rows, cols = matches_from_scores(scores)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0)]
    assert matches_from_scores(np.zeros((0, 4), np.float32))[0].size == 0


def test_an_empty_side_matches_nothing_without_running(tmp_path: Path) -> None:
    matcher = matcher_on(tmp_path / "never-loaded.onnx")
    rows, cols = matcher.match(
        np.zeros((0, 2)), np.zeros((0, 4)), np.zeros((3, 2)), np.ones((3, 4))
    )
    assert rows.size == cols.size == 0


def test_scores_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    # The sides named the wrong way round: the scores come out (M, N).
    path = probe_model(tmp_path / "probe.onnx")
    swapped = MatcherInput(("d_place", "d_view"), ("k_place", "k_view"))
    backbone = Backbone("probe", MATCHER, path, "0" * 64, swapped, "scores", 4)
    matcher = Matcher(
        lambda: OnnxRuntimeBackend().load(path, backbone, "scores"),
        swapped,
        "scores",
        "e" * 64,
        "probe",
    )
    with pytest.raises(DescriptorError, match=r"of shape \(1, 3, 2\), want \(1, 2, 3\)"):
        matcher.scores(np.zeros((2, 2)), np.ones((2, 4)), np.zeros((3, 2)), np.ones((3, 4)))


def test_the_space_and_identity_name_the_engine_and_its_inputs(tmp_path: Path) -> None:
    a, b = matcher_on(tmp_path / "a.onnx", "a" * 64), matcher_on(tmp_path / "a.onnx", "b" * 64)
    assert a.space != b.space
    assert a.identity() == {
        "backbone": "probe",
        "engine_key": "a" * 64,
        "input": {"descriptors": ["d_view", "d_place"], "keypoints": ["k_view", "k_place"]},
        "output": "scores",
    }
