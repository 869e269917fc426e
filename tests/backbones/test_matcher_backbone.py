"""A matcher backbone: its input table names tensors, not an image, and its graph is
checked against the contract of docs/backbones.md, errors naming the field."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from takeoff_cache.backbones import file as backbones_file
from takeoff_cache.backbones.file import SIFT_DESCRIPTOR_WIDTH, load_backbones, matcher
from takeoff_cache.backbones.spec import MatcherInput
from takeoff_cache.demo.models import build_matcher_model
from takeoff_cache.errors import BackboneError
from tests.backbones.test_backbones import (
    INPUT,
    entry,
    make_local_features_onnx,
    make_onnx,
    refused,
    write_file,
)

PAIRS = (
    '{ descriptors = ["descriptors0", "descriptors1"], keypoints = ["keypoints0", "keypoints1"] }'
)
FEATURES = entry("feat", "local_features", "models/feat.onnx", INPUT, None)  # D = 3


def matcher_entry(spec: str = PAIRS, output: str | None = "scores", name: str = "m") -> str:
    return entry(name, "matcher", "models/matcher.onnx", spec, output)


def make_graph(
    path: Path,
    inputs: list[tuple[str, int, list[int | str]]],
    output: tuple[str, int, list[int | str]] = ("scores", TensorProto.FLOAT, [1, "N", "M"]),
) -> Path:
    """A graph declaring ``inputs`` and ``output`` (name, element type, shape): only the
    declarations are checked at validate, so one Identity node stands for the work."""
    node = helper.make_node("Identity", [inputs[0][0]], [output[0]])
    graph = helper.make_graph(
        [node],
        "declared",
        [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*output)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def descriptor_inputs(width: int | str = 3) -> list[tuple[str, int, list[int | str]]]:
    return [
        ("descriptors0", TensorProto.FLOAT, [1, "N", width]),
        ("descriptors1", TensorProto.FLOAT, [1, "M", width]),
    ]


@pytest.fixture
def models(tmp_path: Path) -> Path:
    make_onnx(tmp_path / "models" / "vpr.onnx")
    make_local_features_onnx(tmp_path / "models" / "feat.onnx")
    build_matcher_model(tmp_path / "models" / "matcher.onnx", dim=3)
    return tmp_path


def test_a_matcher_loads_with_its_tensors_and_its_extractors_width(models: Path) -> None:
    backbones = load_backbones(write_file(models, entry(), FEATURES, matcher_entry()))
    found = matcher(backbones)
    assert found is not None and found.role == "matcher" and found.output == "scores"
    assert found.input == MatcherInput(
        ("descriptors0", "descriptors1"), ("keypoints0", "keypoints1")
    )
    assert found.descriptor_width == 3
    assert found.identity()["input"] == {
        "descriptors": ["descriptors0", "descriptors1"],
        "keypoints": ["keypoints0", "keypoints1"],
    }
    with pytest.raises(BackboneError, match="takes local features, not images"):
        _ = found.image


def test_keypoints_are_optional_for_a_graph_that_reads_descriptors_alone(
    models: Path,
) -> None:
    make_graph(models / "models" / "matcher.onnx", descriptor_inputs())
    spec = '{ descriptors = ["descriptors0", "descriptors1"] }'
    found = matcher(load_backbones(write_file(models, entry(), FEATURES, matcher_entry(spec))))
    assert found is not None and found.input == MatcherInput(("descriptors0", "descriptors1"))


def test_a_remembered_check_keeps_the_width_without_reading_the_graph(
    models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_file(models, entry(), FEATURES, matcher_entry())
    checked = models / "checked"
    load_backbones(path, checked)

    def unread(*args: object) -> None:
        raise AssertionError("the graph was parsed again")

    monkeypatch.setattr(backbones_file, "_load_graph", unread)
    found = matcher(load_backbones(path, checked))
    assert found is not None and found.descriptor_width == 3


def test_a_matcher_with_open_width_takes_its_extractors(models: Path) -> None:
    make_graph(
        models / "models" / "matcher.onnx",
        [
            *descriptor_inputs("D"),
            ("keypoints0", TensorProto.FLOAT, [1, "N", 2]),
            ("keypoints1", TensorProto.FLOAT, [1, "M", 2]),
        ],
    )
    found = matcher(load_backbones(write_file(models, entry(), FEATURES, matcher_entry())))
    assert found is not None and found.descriptor_width == 3


def test_a_descriptor_tensor_the_graph_lacks_is_refused_naming_the_field(models: Path) -> None:
    spec = PAIRS.replace('"descriptors1"', '"desc1"')
    refused(
        write_file(models, entry(), FEATURES, matcher_entry(spec)),
        "backbone 'm'.input.descriptors",
        "no input 'desc1'",
    )


def test_a_graph_input_the_table_does_not_name_is_refused(models: Path) -> None:
    spec = '{ descriptors = ["descriptors0", "descriptors1"] }'
    refused(
        write_file(models, entry(), FEATURES, matcher_entry(spec)),
        "backbone 'm'.input:",
        "'keypoints0'",
        "not named",
    )


@pytest.mark.parametrize(
    ("inputs", "field", "words"),
    [
        (
            [
                ("descriptors0", TensorProto.FLOAT, ["N", 3]),
                ("descriptors1", TensorProto.FLOAT, [1, "M", 3]),
            ],
            ".input.descriptors",
            "(B, N, D)",
        ),
        (
            [
                ("descriptors0", TensorProto.FLOAT16, [1, "N", 3]),
                ("descriptors1", TensorProto.FLOAT, [1, "M", 3]),
            ],
            ".input.descriptors",
            "FLOAT16",
        ),
        (
            [
                ("descriptors0", TensorProto.FLOAT, [1, 256, 3]),
                ("descriptors1", TensorProto.FLOAT, [1, "M", 3]),
            ],
            ".input.descriptors",
            "must be dynamic",
        ),
        (
            [
                ("descriptors0", TensorProto.FLOAT, [4, "N", 3]),
                ("descriptors1", TensorProto.FLOAT, [4, "M", 3]),
            ],
            ".input.descriptors",
            "(B, N, D)",
        ),
        (
            [
                ("descriptors0", TensorProto.FLOAT, [1, "N", 3]),
                ("descriptors1", TensorProto.FLOAT, [1, "M", 4]),
            ],
            ".input.descriptors",
            "different widths",
        ),
        (
            [
                *descriptor_inputs(),
                ("keypoints0", TensorProto.FLOAT, [1, "N", 3]),
                ("keypoints1", TensorProto.FLOAT, [1, "M", 2]),
            ],
            ".input.keypoints",
            "(B, N, 2)",
        ),
    ],
)
def test_inputs_off_the_contract_are_refused_naming_the_field(
    models: Path, inputs: list[tuple[str, int, list[int | str]]], field: str, words: str
) -> None:
    make_graph(models / "models" / "matcher.onnx", inputs)
    spec = (
        PAIRS
        if any(n.startswith("keypoints") for n, _, _ in inputs)
        else ('{ descriptors = ["descriptors0", "descriptors1"] }')
    )
    refused(
        write_file(models, entry(), FEATURES, matcher_entry(spec)), f"backbone 'm'{field}", words
    )


@pytest.mark.parametrize(
    ("output", "name", "words"),
    [
        (("scores", TensorProto.FLOAT, [1, "N", "M"]), None, "must name its output"),
        (("scores", TensorProto.FLOAT, [1, "N", "M"]), "matches", "no output 'matches'"),
        (("scores", TensorProto.FLOAT, ["N", "M"]), "scores", "(B, N, M)"),
        (("scores", TensorProto.INT64, [1, "N", "M"]), "scores", "INT64"),
    ],
)
def test_outputs_off_the_contract_are_refused_naming_the_field(
    models: Path, output: tuple[str, int, list[int | str]], name: str | None, words: str
) -> None:
    make_graph(models / "models" / "matcher.onnx", descriptor_inputs(), output)
    spec = '{ descriptors = ["descriptors0", "descriptors1"] }'
    refused(
        write_file(models, entry(), FEATURES, matcher_entry(spec, name)),
        "backbone 'm'.output",
        words,
    )


def test_a_width_other_than_the_extractors_is_refused(models: Path) -> None:
    build_matcher_model(models / "models" / "matcher.onnx", dim=64)
    message = refused(
        write_file(models, entry(), FEATURES, matcher_entry()),
        "backbone 'm'.input.descriptors",
        "64 values",
        "'feat' gives 3",
    )
    assert "\n" not in message


def test_without_local_features_a_matcher_takes_sifts_width(models: Path) -> None:
    refused(write_file(models, entry(), matcher_entry()), "'m'.input.descriptors", "SIFT", "128")
    build_matcher_model(models / "models" / "matcher.onnx", dim=SIFT_DESCRIPTOR_WIDTH)
    found = matcher(load_backbones(write_file(models, entry(), matcher_entry())))
    assert found is not None and found.descriptor_width == SIFT_DESCRIPTOR_WIDTH


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (INPUT, "unknown key"),
        ('{ descriptors = ["descriptors0"] }', "two tensor names"),
        ('{ descriptors = ["d", "d"] }', "two tensor names"),
        ('{ keypoints = ["keypoints0", "keypoints1"] }', ".input.descriptors: missing"),
        (
            '{ descriptors = ["descriptors0", "descriptors1"],'
            ' keypoints = ["descriptors0", "keypoints1"] }',
            "names a descriptors tensor",
        ),
    ],
)
def test_a_malformed_input_table_is_refused(models: Path, spec: str, words: str) -> None:
    refused(write_file(models, entry(), FEATURES, matcher_entry(spec)), "backbone 'm'.input", words)


def test_two_matchers_are_refused(models: Path) -> None:
    refused(
        write_file(models, entry(), FEATURES, matcher_entry(), matcher_entry(name="m2")),
        "at most one matcher",
        "m, m2",
    )
