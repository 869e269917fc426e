"""Engines: compiled for this host, content-addressed, reused only when exactly right."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from takeoff_cache.backbones.file import load_backbones
from takeoff_cache.demo.models import KEYPOINTS_SIZE
from takeoff_cache.engines import get_backend
from takeoff_cache.engines.onnxruntime import OnnxRuntimeBackend
from takeoff_cache.engines.store import ensure_engine, lookup_engine
from takeoff_cache.errors import EngineError
from takeoff_cache.trust.keys import load_trust_store
from takeoff_cache.trust.verify import verify_cache
from tests.conftest import Demo
from tests.support.cli import run_cli
from tests.support.factories import on_another_cpu


def vpr(demo: Demo):  # type: ignore[no-untyped-def]
    return next(b for b in load_backbones(demo.root / "backbones.toml") if b.name == "vpr")


def change_weights(model_path: Path) -> None:
    """Same file name, new weights: the case ONNX Runtime's own engine cache gets wrong."""
    model = onnx.load(str(model_path))
    init = model.graph.initializer[0]
    values = numpy_helper.to_array(init).copy()
    values.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, str(model_path))


class CountingBackend(OnnxRuntimeBackend):
    def __init__(self) -> None:
        self.compiles = 0

    def compile(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.compiles += 1
        super().compile(*args, **kwargs)


def test_unchanged_model_is_reused_with_no_compile_work(demo: Demo) -> None:
    backend = CountingBackend()
    first = ensure_engine(vpr(demo), backend, "fp32", None, None, demo.work)
    second = ensure_engine(vpr(demo), backend, "fp32", None, None, demo.work)
    assert first.built and not second.built
    assert backend.compiles == 1
    assert first.store_path == second.store_path and first.sha256 == second.sha256


def test_changed_weights_under_the_same_name_force_a_rebuild(demo: Demo) -> None:
    backend = CountingBackend()
    before = ensure_engine(vpr(demo), backend, "fp32", None, None, demo.work)
    change_weights(demo.root / "models" / "vpr.onnx")
    after = ensure_engine(vpr(demo), backend, "fp32", None, None, demo.work)
    assert after.built and backend.compiles == 2
    assert after.key != before.key and after.file_name != before.file_name


def test_a_changed_input_spec_for_the_same_model_forces_a_rebuild(demo: Demo) -> None:
    # An int8 engine is calibrated through the input spec, and a TensorRT profile
    # takes its shapes from it: the same ONNX bytes with another spec are another engine.
    import dataclasses

    backend = CountingBackend()
    backbone = vpr(demo)
    before = ensure_engine(backbone, backend, "fp32", None, None, demo.work)
    other = dataclasses.replace(
        backbone, input=dataclasses.replace(backbone.input, std=(0.5, 0.5, 0.5))
    )
    after = ensure_engine(other, backend, "fp32", None, None, demo.work)
    assert after.built and backend.compiles == 2
    assert after.key != before.key


def test_another_host_identity_forces_a_rebuild(
    demo: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = CountingBackend()
    here = ensure_engine(vpr(demo), backend, "fp32", None, None, demo.work)
    on_another_cpu(monkeypatch, {"arch": "aarch64", "isa": ["asimd"]})
    there = ensure_engine(vpr(demo), backend, "fp32", None, None, demo.work)
    assert there.built and there.key != here.key
    assert "aarch64-neon" in there.file_name


def test_new_backend_version_forces_a_rebuild(demo: Demo, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = CountingBackend()
    old = ensure_engine(vpr(demo), backend, "fp32", None, None, demo.work)
    monkeypatch.setattr(CountingBackend, "version", property(lambda self: "99.0.0"))
    new = ensure_engine(vpr(demo), backend, "fp32", None, None, demo.work)
    assert new.built and new.key != old.key


def test_damaged_engine_is_rebuilt_and_never_loaded(
    demo: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = CountingBackend()
    record = ensure_engine(vpr(demo), backend, "fp32", None, None, demo.work)
    path = Path(record.store_path)
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.chmod(0o644)  # stored read-only; damage comes from outside the tool
    path.write_bytes(bytes(data))
    assert lookup_engine(path, record.key) is None
    loaded: list[Path] = []
    monkeypatch.setattr(
        CountingBackend, "load", lambda self, p, *a: loaded.append(p)
    )  # would show a stale load
    again = ensure_engine(vpr(demo), backend, "fp32", None, None, demo.work)
    assert again.built and backend.compiles == 2
    assert loaded == []
    assert lookup_engine(path, record.key) == (again.sha256, again.size)


def broken_model(path: Path) -> None:
    """Valid protobuf with the declared input/output, but an operator no runtime has."""
    node = helper.make_node("NoSuchOperator", ["image"], ["descriptor"], domain="ai.example")
    graph = helper.make_graph(
        [node],
        "broken",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 3, 128, 128])],
        [helper.make_tensor_value_info("descriptor", onnx.TensorProto.FLOAT, ["N", 8])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.example", 1)]
    )
    onnx.save(model, str(path))


def broken_local_features_model(path: Path, size: int) -> None:
    """A local_features graph with the contract's outputs, but an operator no runtime has."""
    node = helper.make_node(
        "NoSuchOperator", ["image"], ["keypoints", "scores", "descriptors"], domain="ai.example"
    )
    graph = helper.make_graph(
        [node],
        "broken",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 3, size, size])],
        [
            helper.make_tensor_value_info("keypoints", onnx.TensorProto.FLOAT, ["N", 8, 2]),
            helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("descriptors", onnx.TensorProto.FLOAT, ["N", 8, 4]),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.example", 1)]
    )
    onnx.save(model, str(path))


def test_failed_compile_leaves_no_partial_engine(demo: Demo) -> None:
    broken_model(demo.root / "models" / "vpr.onnx")
    with pytest.raises(EngineError, match="'vpr'"):
        ensure_engine(vpr(demo), get_backend("onnxruntime"), "fp32", None, None, demo.work)
    leftovers = [p.name for p in (demo.work / "engines").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_int8_engine_needs_a_calibration_file(demo: Demo) -> None:
    with pytest.raises(EngineError, match="calibration"):
        ensure_engine(vpr(demo), get_backend("onnxruntime"), "int8", None, None, demo.work)


@pytest.mark.usefixtures("prefect_harness")
class TestThroughTheBuild:
    def test_changed_weights_rebuild_only_that_engine(
        self, capsys: pytest.CaptureFixture[str], demo: Demo
    ) -> None:
        assert run_cli(capsys, *demo.build_args()).code == 0
        change_weights(demo.root / "models" / "vpr.onnx")
        result = run_cli(capsys, *demo.build_args("--json"))
        assert result.code == 0, result.err
        report = result.json()
        assert (report["engines_built"], report["engines_reused"]) == (1, 1)
        assert report["descriptors_generated"] == 80  # new engine key: every tile again
        verify_cache(demo.cache, load_trust_store(demo.trust))

    def test_host_identity_is_recorded_and_another_host_rebuilds(
        self, capsys: pytest.CaptureFixture[str], demo: Demo, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        assert run_cli(capsys, *demo.build_args()).code == 0
        signed = json.loads((demo.cache / "Manifest.json").read_text())["signed"]
        assert signed["host"]["backend"] == "onnxruntime"
        assert signed["host"]["cpu"]["arch"]
        with monkeypatch.context() as there:
            on_another_cpu(there, {"arch": "aarch64", "isa": []})
            result = run_cli(capsys, *demo.build_args("--json"))
        assert result.json()["engines_built"] == 2
        # The cache now holds engines for the simulated host, which this host refuses.
        check = run_cli(
            capsys, "verify", str(demo.cache), "--trust", str(demo.trust), "--host-check"
        )
        assert check.code == 7 and "another host" in check.err

    def test_failed_compile_exits_8_naming_backbone_and_keeps_cache(
        self, capsys: pytest.CaptureFixture[str], demo: Demo
    ) -> None:
        assert run_cli(capsys, *demo.build_args()).code == 0
        before = (demo.cache / "Manifest.json").read_bytes()
        broken_local_features_model(demo.root / "models" / "keypoints.onnx", KEYPOINTS_SIZE)
        result = run_cli(capsys, *demo.build_args())
        assert result.code == 8, result.err
        assert len(result.err_lines) == 1 and "'keypoints'" in result.err
        assert "Traceback" not in result.err
        assert (demo.cache / "Manifest.json").read_bytes() == before
        assert not (demo.cache / ".staging").exists()
        verify_cache(demo.cache, load_trust_store(demo.trust))

    def test_int8_build_records_drift_and_calibration(
        self, capsys: pytest.CaptureFixture[str], demo: Demo
    ) -> None:
        calib = demo.root / "calib.npz"
        made = run_cli(
            capsys,
            "calibrate",
            "--request",
            str(demo.request),
            "--out",
            str(calib),
            "--tiles",
            "24",
        )
        assert made.code == 0, made.err
        result = run_cli(
            capsys, *demo.build_args("--precision", "int8", "--calibration", str(calib), "--json")
        )
        assert result.code == 0, result.err
        drift = result.json()["precision_drift"]["vpr"]
        assert 0.5 < drift <= 1.0
        signed = json.loads((demo.cache / "Manifest.json").read_text())["signed"]
        kinds = {a["kind"]: a for a in signed["artifacts"]}
        assert kinds["calibration"]["sha256"]
        assert all(a["precision"] == "int8" for a in signed["artifacts"] if a["kind"] == "engine")
        verify_cache(demo.cache, load_trust_store(demo.trust))

    @pytest.mark.parametrize(
        ("flags", "words"),
        [
            (["--precision", "fp16"], ["precision", "fp16"]),
            (["--precision", "int8", "--calibration", "backbones.toml"], ["calibration"]),
        ],
    )
    def test_unsupported_precision_or_calibration_is_refused(
        self, capsys: pytest.CaptureFixture[str], demo: Demo, flags: list[str], words: list[str]
    ) -> None:
        flags = [str(demo.root / f) if f.endswith(".toml") else f for f in flags]
        result = run_cli(capsys, *demo.build_args(*flags))
        assert result.code == 2, result.err
        assert len(result.err_lines) == 1 and all(w in result.err for w in words)
        assert list(demo.cache.iterdir()) == []


def test_compile_engines_writes_only_the_work_folder(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    args = ["compile-engines", "--request", str(demo.request), "--work-dir", str(demo.work)]
    first = run_cli(capsys, *args)
    assert first.code == 0, first.err
    assert first.out.count("built ") == 2
    assert list(demo.cache.iterdir()) == []  # no lock file, no staging, nothing
    second = run_cli(capsys, *args)
    assert second.out.count("reused") == 2


@pytest.mark.usefixtures("prefect_harness")
def test_two_caches_share_the_engine_store(
    capsys: pytest.CaptureFixture[str], demo: Demo, tmp_path: Path
) -> None:
    assert (
        run_cli(
            capsys, "compile-engines", "--request", str(demo.request), "--work-dir", str(demo.work)
        ).code
        == 0
    )
    other = tmp_path / "other-cache"
    other.mkdir()
    result = run_cli(capsys, *demo.build_args("--cache-root", str(other), "--zoom", "16", "--json"))
    assert result.code == 0, result.err
    assert (result.json()["engines_built"], result.json()["engines_reused"]) == (0, 2)


@pytest.mark.gpu
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engines_build_and_compute_descriptors(
    capsys: pytest.CaptureFixture[str], demo: Demo, precision: str
) -> None:
    if precision not in get_backend("tensorrt").precisions:
        # TensorRT 11 has no FP16 builder flag; the refusal is tested without a GPU.
        pytest.skip(f"this TensorRT builds {get_backend('tensorrt').precisions}")
    result = run_cli(
        capsys, *demo.build_args("--backend", "tensorrt", "--precision", precision, "--json")
    )
    assert result.code == 0, result.err
    signed = json.loads((demo.cache / "Manifest.json").read_text())["signed"]
    assert signed["host"]["backend"] == "tensorrt" and signed["host"]["compute_capability"]
    engines = [a for a in signed["artifacts"] if a["kind"] == "engine"]
    assert all(a["path"].endswith(".engine") for a in engines)
    assert (demo.work / "tensorrt").is_dir()  # timing cache kept in the work folder
    verify_cache(demo.cache, load_trust_store(demo.trust))


@pytest.mark.gpu
def test_tensorrt_descriptors_match_onnxruntime(demo: Demo) -> None:
    backbone = vpr(demo)
    trt, ort_backend = get_backend("tensorrt"), get_backend("onnxruntime")
    a = ensure_engine(backbone, trt, "fp32", None, None, demo.work)
    b = ensure_engine(backbone, ort_backend, "fp32", None, None, demo.work)
    batch = np.random.default_rng(0).standard_normal((4, 3, 128, 128)).astype(np.float32)
    out_a = trt.load(Path(a.store_path), backbone, "descriptor").run(batch)
    out_b = ort_backend.load(Path(b.store_path), backbone, "descriptor").run(batch)
    np.testing.assert_allclose(out_a, out_b, rtol=1e-2, atol=1e-3)
    shutil.rmtree(demo.work)


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (
            lambda t: t.replace('role = "local_features"', 'role = "detector"'),
            ["'keypoints'", "role"],
        ),
        (
            lambda t: t.replace("models/keypoints.onnx", "models/missing.onnx"),
            ["'keypoints'", "onnx", "does not exist"],
        ),
        (
            lambda t: t.replace('role = "local_features"', 'role = "place_recognition"'),
            ["exactly one place_recognition"],
        ),
        (lambda t: t.replace('output = "descriptor"', 'output = "features"'), ["'vpr'", "output"]),
        (lambda t: t.replace("size = 128", "size = 96", 1), ["'vpr'", "input"]),
    ],
)
def test_bad_backbones_file_is_refused_before_any_work(
    capsys: pytest.CaptureFixture[str], demo: Demo, edit, words: list[str]
) -> None:  # type: ignore[no-untyped-def]
    path = demo.root / "backbones.toml"
    path.write_text(edit(path.read_text()))
    result = run_cli(capsys, *demo.build_args())
    assert result.code == 2, result.err
    assert len(result.err_lines) == 1 and all(w in result.err for w in words), result.err
    assert list(demo.cache.iterdir()) == [] and not (demo.work / "engines").exists()


def test_the_onnxruntime_version_is_read_without_importing_it() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from takeoff_cache.engines.onnxruntime import ort_version\n"
        "print(ort_version(), 'onnxruntime' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import onnxruntime

    assert out.stdout.split() == [onnxruntime.__version__, "False"]


@pytest.mark.parametrize(
    ("flags", "precisions"),
    [
        ({"FP16": 1, "INT8": 2}, ("fp32", "fp16", "int8")),  # TensorRT 8 to 10
        ({}, ("fp32",)),  # TensorRT 11: strongly typed networks only
    ],
)
def test_tensorrt_builds_only_the_precisions_its_builder_has_flags_for(
    monkeypatch: pytest.MonkeyPatch, demo: Demo, flags: dict[str, int], precisions: tuple[str, ...]
) -> None:
    # No TensorRT here: a stand-in module with the builder flags of each version.
    from types import SimpleNamespace

    from takeoff_cache.engines import tensorrt

    fake = SimpleNamespace(__version__="11.4.0", BuilderFlag=SimpleNamespace(**flags))
    monkeypatch.setattr(tensorrt, "_trt", lambda: fake)
    backend = tensorrt.TensorRTBackend()
    assert backend.precisions == precisions
    if "fp16" not in precisions:
        with pytest.raises(EngineError, match=r"TensorRT 11\.4\.0 builds fp32, not fp16"):
            backend.compile(vpr(demo), "fp16", None, demo.work / "x.engine", demo.work)
