"""The backbones file: every entry checked against its ONNX graph, errors naming the field."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from takeoff_cache.backbones.file import load_backbones, place_recognition
from takeoff_cache.errors import BackboneError

INPUT = '{ name = "image", size = 32, channels = 3, mean = [0.5, 0.5, 0.5], std = [0.2, 0.2, 0.2] }'


def make_onnx(
    path: Path,
    *,
    input_name: str = "image",
    input_shape: tuple[int | str, ...] = ("N", 3, 32, 32),
    output_name: str = "descriptor",
    flatten: bool = True,
    dtype: int = TensorProto.FLOAT,
) -> Path:
    """image (N,3,32,32) -> GlobalAveragePool -> Flatten -> descriptor (N,3)."""
    nodes = [helper.make_node("GlobalAveragePool", [input_name], ["pooled"])]
    if flatten:
        nodes.append(helper.make_node("Flatten", ["pooled"], [output_name], axis=1))
        out = helper.make_tensor_value_info(output_name, dtype, ["N", 3])
    else:
        nodes.append(helper.make_node("Identity", ["pooled"], [output_name]))
        out = helper.make_tensor_value_info(output_name, dtype, ["N", 3, 1, 1])
    inp = helper.make_tensor_value_info(input_name, dtype, list(input_shape))
    graph = helper.make_graph(nodes, "tiny", [inp], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_local_features_onnx(
    path: Path,
    *,
    input_name: str = "image",
    outputs: tuple[str, ...] = ("keypoints", "scores", "descriptors"),
    keypoint_width: int = 2,
) -> Path:
    """image (N,3,32,32) -> one keypoint per image: keypoints (N,1,w), scores (N,1) and
    descriptors (N,1,3), under the names ``outputs`` (in that order)."""
    kp_name, score_name, desc_name = outputs
    const = numpy_helper.from_array
    nodes = [
        helper.make_node("GlobalAveragePool", [input_name], ["pooled"]),
        helper.make_node("Reshape", ["pooled", "shape"], [desc_name]),
        helper.make_node("ReduceMean", ["pooled"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["mean", "one"], [score_name]),
        helper.make_node("Slice", [desc_name, "zero", "width", "two"], [kp_name]),
    ]
    inits = [
        const(np.array([0, 1, 3], np.int64), "shape"),
        const(np.array([1], np.int64), "one"),
        const(np.array([0], np.int64), "zero"),
        const(np.array([keypoint_width], np.int64), "width"),
        const(np.array([2], np.int64), "two"),
    ]
    outs = [
        helper.make_tensor_value_info(kp_name, TensorProto.FLOAT, ["N", 1, keypoint_width]),
        helper.make_tensor_value_info(score_name, TensorProto.FLOAT, ["N", 1]),
        helper.make_tensor_value_info(desc_name, TensorProto.FLOAT, ["N", 1, 3]),
    ]
    inp = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, 32, 32])
    graph = helper.make_graph(nodes, "tiny_features", [inp], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def entry(
    name: str = "vpr",
    role: str = "place_recognition",
    onnx_file: str = "models/vpr.onnx",
    input_spec: str = INPUT,
    output: str | None = "descriptor",
) -> str:
    lines = [
        "[[backbone]]",
        f'name = "{name}"',
        f'role = "{role}"',
        f'onnx = "{onnx_file}"',
        f"input = {input_spec}",
    ]
    if output is not None:
        lines.append(f'output = "{output}"')
    return "\n".join(lines) + "\n\n"


def write_file(tmp_path: Path, *entries: str) -> Path:
    path = tmp_path / "backbones.toml"
    path.write_text("".join(entries))
    return path


@pytest.fixture
def models(tmp_path: Path) -> Path:
    make_onnx(tmp_path / "models" / "vpr.onnx")
    make_local_features_onnx(tmp_path / "models" / "feat.onnx", input_name="x")
    return tmp_path


def refused(path: Path, *fragments: str) -> str:
    with pytest.raises(BackboneError) as info:
        load_backbones(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_valid_file_loads_with_the_model_sha256(models: Path) -> None:
    path = write_file(
        models,
        entry(),
        entry("feat-1", "local_features", "models/feat.onnx", INPUT.replace("image", "x"), None),
    )
    backbones = load_backbones(path)
    assert [b.name for b in backbones] == ["vpr", "feat-1"]
    vpr = place_recognition(backbones)
    assert vpr.name == "vpr"
    assert vpr.onnx == (models / "models" / "vpr.onnx").resolve()
    expected = hashlib.sha256((models / "models" / "vpr.onnx").read_bytes()).hexdigest()
    assert vpr.onnx_sha256 == expected
    assert vpr.input.size == 32 and vpr.input.channels == 3
    assert vpr.input.mean == (0.5, 0.5, 0.5)
    assert vpr.output == "descriptor"
    assert backbones[1].output is None
    assert vpr.identity()["onnx_sha256"] == expected


@pytest.mark.parametrize(
    ("outputs", "width", "fragments"),
    [
        (("keypoints", "scores", "features"), 2, ["no output 'descriptors'", "(N, K, D)"]),
        (("points", "scores", "descriptors"), 2, ["no output 'keypoints'"]),
        (("keypoints", "scores", "descriptors"), 3, ["'keypoints' has shape", "(N, K, 2)"]),
    ],
)
def test_a_local_features_network_with_the_wrong_outputs_is_refused(
    tmp_path: Path, outputs: tuple[str, ...], width: int, fragments: list[str]
) -> None:
    make_onnx(tmp_path / "models" / "vpr.onnx")
    make_local_features_onnx(tmp_path / "models" / "kp.onnx", outputs=outputs, keypoint_width=width)
    path = write_file(
        tmp_path, entry(), entry("kp", "local_features", "models/kp.onnx", output=None)
    )
    refused(path, "backbone 'kp'.onnx", *fragments)


def test_onnx_paths_are_relative_to_the_backbones_file(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_file(models, entry())
    monkeypatch.chdir(tmp_path / "models")
    assert load_backbones(path)[0].onnx == (models / "models" / "vpr.onnx").resolve()


def test_a_dynamic_spatial_input_accepts_any_size(tmp_path: Path) -> None:
    make_onnx(tmp_path / "models" / "vpr.onnx", input_shape=("N", 3, "H", "W"))
    spec = INPUT.replace("size = 32", "size = 224")
    assert load_backbones(write_file(tmp_path, entry(input_spec=spec)))[0].input.size == 224


def test_default_mean_and_std_apply_when_omitted(models: Path) -> None:
    spec = '{ name = "image", size = 32 }'
    backbone = load_backbones(write_file(models, entry(input_spec=spec)))[0]
    assert backbone.input.channels == 3
    assert backbone.input.mean == (0.0, 0.0, 0.0)
    assert backbone.input.std == (1.0, 1.0, 1.0)


def test_the_sha256_changes_when_the_model_changes(tmp_path: Path) -> None:
    make_onnx(tmp_path / "models" / "vpr.onnx")
    path = write_file(tmp_path, entry())
    before = load_backbones(path)[0].onnx_sha256
    make_onnx(tmp_path / "models" / "vpr.onnx", input_shape=(1, 3, 32, 32))
    assert load_backbones(path)[0].onnx_sha256 != before


def test_missing_onnx_file_is_refused(models: Path) -> None:
    refused(write_file(models, entry(onnx_file="models/gone.onnx")), "'vpr'", ".onnx", "gone")


@pytest.mark.parametrize(
    "content",
    [
        random.Random(1).randbytes(4096),
        b"this is a text file, not a model\n",
        b"",
    ],
    ids=["random", "text", "empty"],
)
def test_a_file_that_is_not_onnx_is_refused(models: Path, content: bytes) -> None:
    (models / "models" / "vpr.onnx").write_bytes(content)
    refused(write_file(models, entry()), "'vpr'", ".onnx", "not an ONNX model")


def test_unknown_role_is_refused(models: Path) -> None:
    refused(write_file(models, entry(role="detector")), "'vpr'", ".role", "detector")


def test_zero_place_recognition_backbones_is_refused(models: Path) -> None:
    path = write_file(models, entry(role="other", output=None))
    refused(path, "place_recognition", "found 0")


def test_two_place_recognition_backbones_are_refused(models: Path) -> None:
    path = write_file(models, entry(), entry(name="vpr2"))
    refused(path, "place_recognition", "found 2", "vpr", "vpr2")


def test_duplicate_names_are_refused(models: Path) -> None:
    path = write_file(models, entry(), entry(role="other", output=None))
    refused(path, "name", "'vpr'", "twice")


@pytest.mark.parametrize("name", ["VPR", "vpr net", "vpr.onnx", "", "vpr/../x", "vpr\u00e9"])
def test_bad_name_characters_are_refused(models: Path, name: str) -> None:
    refused(write_file(models, entry(name=name)), "backbone[0].name", repr(name))


def test_input_name_not_in_the_graph_is_refused(models: Path) -> None:
    spec = INPUT.replace('"image"', '"pixels"')
    refused(write_file(models, entry(input_spec=spec)), "'vpr'", ".input.name", "pixels")


@pytest.mark.parametrize(
    "spec",
    [
        INPUT.replace("size = 32", "size = 64"),
        '{ name = "image", size = 32, channels = 1, mean = [0.5], std = [0.2] }',
    ],
    ids=["size", "channels"],
)
def test_input_not_matching_a_static_graph_dim_is_refused(models: Path, spec: str) -> None:
    refused(write_file(models, entry(input_spec=spec)), "'vpr'", ".input", "does not match")


def test_input_of_wrong_rank_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "models" / "vpr.onnx"
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3])
    out = helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["descriptor"])], "flat", [inp], [out]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))
    refused(write_file(tmp_path, entry()), "'vpr'", ".input", "(N, C, H, W)")


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("size", "4", ".input.size"),
        ("size", '"32"', ".input.size"),
        ("channels", "2", ".input.channels"),
        ("std", "[0.2, 0.0, 0.2]", ".input.std"),
        ("mean", "[0.5, 0.5]", ".input.mean"),
    ],
)
def test_bad_input_values_are_refused(models: Path, field: str, value: str, fragment: str) -> None:
    parts = {
        "name": '"image"',
        "size": "32",
        "channels": "3",
        "mean": "[0.5, 0.5, 0.5]",
        "std": "[0.2, 0.2, 0.2]",
        field: value,
    }
    spec = "{ " + ", ".join(f"{k} = {v}" for k, v in parts.items()) + " }"
    refused(write_file(models, entry(input_spec=spec)), "'vpr'", fragment)


def test_float_channels_is_refused_as_a_backbone_error(models: Path) -> None:
    spec = '{ name = "image", size = 32, channels = 3.0 }'
    refused(write_file(models, entry(input_spec=spec)), "'vpr'", ".input.channels")


def test_missing_input_table_is_refused(models: Path) -> None:
    path = models / "backbones.toml"
    path.write_text(
        '[[backbone]]\nname = "vpr"\nrole = "place_recognition"\n'
        'onnx = "models/vpr.onnx"\noutput = "descriptor"\n'
    )
    refused(path, "'vpr'", ".input")


def test_output_name_missing_from_the_graph_is_refused(models: Path) -> None:
    refused(write_file(models, entry(output="embedding")), "'vpr'", ".output", "embedding")


def test_place_recognition_without_output_is_refused(models: Path) -> None:
    refused(write_file(models, entry(output=None)), "'vpr'", ".output")


def test_output_of_rank_4_is_refused(tmp_path: Path) -> None:
    make_onnx(tmp_path / "models" / "vpr.onnx", flatten=False)
    refused(write_file(tmp_path, entry()), "'vpr'", ".output", "(N, D)")


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "backbones.toml"
    path.write_text('[[backbone]]\nname = "vpr\n')
    refused(path, "backbones", "not valid TOML")


@pytest.mark.parametrize("text", ["", 'title = "models"\n', "backbone = 3\n", "backbone = []\n"])
def test_a_file_without_backbone_entries_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "backbones.toml"
    path.write_text(text)
    refused(path, "[[backbone]]")


def test_a_missing_backbones_file_is_refused(tmp_path: Path) -> None:
    refused(tmp_path / "nope.toml", "backbones", "does not exist")


def test_a_backbones_path_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, "backbones")


def test_a_passed_check_is_remembered_and_the_graph_not_parsed_again(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from takeoff_cache.backbones import file as mod

    checked = tmp_path / "checked"
    path = write_file(models, entry())
    first = load_backbones(path, checked)
    assert len(list(checked.iterdir())) == 1

    def no_parsing(*args: object) -> None:
        raise AssertionError("the graph was parsed again")

    monkeypatch.setattr(mod, "_load_graph", no_parsing)
    assert load_backbones(path, checked) == first


def test_a_remembered_check_does_not_cover_a_changed_entry_or_model(
    models: Path, tmp_path: Path
) -> None:
    checked = tmp_path / "checked"
    load_backbones(write_file(models, entry()), checked)
    # A typo in the input name: a new key, so the graph is checked and the typo named.
    typo = INPUT.replace('"image"', '"imgae"')
    with pytest.raises(BackboneError, match=r"input\.name.*imgae"):
        load_backbones(write_file(models, entry(input_spec=typo)), checked)
    # The same entry over another graph (no 'descriptor' output): checked again, refused.
    make_onnx(models / "models" / "vpr.onnx", output_name="other")
    with pytest.raises(BackboneError, match="descriptor"):
        load_backbones(write_file(models, entry()), checked)


# --------------------------------------------------------------------------- what the file holds
@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('titel = "my models"\n\n' + entry(), "titel"),
        (entry().replace('output = "descriptor"', 'outptu = "descriptor"'), "outptu"),
    ],
)
def test_an_unknown_key_is_refused_by_name(models: Path, text: str, key: str) -> None:
    path = models / "backbones.toml"
    path.write_text(text)
    refused(path, f"unknown key {key!r}")


def test_a_typo_inside_the_input_table_is_refused_naming_the_backbone(models: Path) -> None:
    # "sdt" for "std": ignored, it would normalize every tile with the default std of 1.
    typo = INPUT.replace("std =", "sdt =")
    refused(write_file(models, entry(input_spec=typo)), "backbone 'vpr'.input", "'sdt'")


def test_a_float16_input_is_refused_at_validate(tmp_path: Path) -> None:
    make_onnx(tmp_path / "models" / "vpr.onnx", dtype=TensorProto.FLOAT16)
    refused(write_file(tmp_path, entry()), "backbone 'vpr'.input", "FLOAT16", "float32")


def test_a_float16_model_is_checked_again_where_an_older_check_passed_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from takeoff_cache.backbones import file as mod

    make_onnx(tmp_path / "models" / "vpr.onnx", dtype=TensorProto.FLOAT16)
    checked = tmp_path / "checked"
    with monkeypatch.context() as patch:
        patch.setattr(mod, "_CHECKS_VERSION", 1)
        patch.setattr(mod, "_check_graph", lambda *args: None)  # as before the dtype check
        load_backbones(write_file(tmp_path, entry()), checked)
    with pytest.raises(BackboneError, match="FLOAT16"):
        load_backbones(write_file(tmp_path, entry()), checked)


def test_weights_in_external_data_files_are_refused_at_validate(tmp_path: Path) -> None:
    # raw bytes: only those go to an external file.
    weight = numpy_helper.from_array(np.full((1, 3, 1, 1), 0.5, np.float32), "w")
    nodes = [
        helper.make_node("Mul", ["image", "w"], ["scaled"]),
        helper.make_node("GlobalAveragePool", ["scaled"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["descriptor"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "external",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["N", 3])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (tmp_path / "models").mkdir()
    onnx.save_model(
        model,
        str(tmp_path / "models" / "vpr.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="vpr.weights",
        size_threshold=0,
    )
    assert (tmp_path / "models" / "vpr.weights").is_file()
    refused(write_file(tmp_path, entry()), "backbone 'vpr'.onnx", "external data")


# ----------------------------------------------------------------- paths of the wrong kind
def test_an_onnx_path_that_is_a_folder_says_so(models: Path) -> None:
    (models / "models" / "dir.onnx").mkdir()
    path = write_file(models, entry(onnx_file="models/dir.onnx"))
    refused(path, "backbone 'vpr'.onnx", "is a folder, not a file")


def test_an_onnx_path_that_is_a_fifo_is_refused_without_opening_it(models: Path) -> None:
    os.mkfifo(models / "models" / "pipe.onnx")
    refused(write_file(models, entry(onnx_file="models/pipe.onnx")), "'vpr'.onnx", "FIFO")


def test_a_backbones_file_that_is_a_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "backbones.toml")
    refused(tmp_path / "backbones.toml", "backbones", "FIFO")
