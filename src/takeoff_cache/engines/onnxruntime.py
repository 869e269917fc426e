"""ONNX Runtime backend: the engine is the graph optimized for this CPU and saved.

``ORT_ENABLE_ALL`` adds layout and kernel choices specific to the host's
instruction set; ONNX Runtime documents that such a saved model is only for
the hardware it was produced on — exactly what the engine key records.
``int8`` first quantizes the graph statically (QDQ) from calibration samples.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from takeoff_cache.backbones.file import Backbone
from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.engines.base import Backend, Runner, first_line
from takeoff_cache.engines.hostinfo import cpu_identity, isa_tag
from takeoff_cache.errors import EngineError

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime as ort

# Static QDQ quantization: int8 weights per channel, int8 activations, min/max
# calibration. Hashed into the engine key and handed to the quantizer as is.
_QUANT_OPTIONS = {
    "format": "QDQ",
    "weight_type": "QInt8",
    "activation_type": "QInt8",
    "per_channel": True,
    "calibrate_method": "MinMax",
}


def _ort() -> Any:
    # Imported on first use: validating a request (and so a no-op re-run) only
    # needs the version, and importing ONNX Runtime is a noticeable part of a no-op.
    import onnxruntime

    return onnxruntime


@lru_cache(maxsize=1)
def ort_version() -> str:
    """``onnxruntime.__version__``, read without importing ONNX Runtime.

    The package takes its version from ``capi/build_and_package_info.py``, a
    file of two constants; it is read from the package found on ``sys.path``,
    the one an import would load. Anything unexpected falls back to importing.
    """
    spec = importlib.util.find_spec("onnxruntime")
    if spec is not None and spec.origin:
        info = Path(spec.origin).parent / "capi" / "build_and_package_info.py"
        try:
            for node in ast.parse(info.read_text(encoding="utf-8")).body:
                if (
                    isinstance(node, ast.Assign)
                    and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
                    and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str)
                ):
                    return node.value.value
        except (OSError, SyntaxError, ValueError):
            pass
    return str(_ort().__version__)


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class OnnxRuntimeRunner(Runner):
    """``input_name``: the image input that :meth:`run` feeds (None for a matcher, whose
    inputs :meth:`run_feeds` names)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        input_name: str | None,
        output: str,
        streams: int = 1,
    ) -> None:
        self._session = session
        self._input = input_name
        self._output = output
        self.streams = streams  # InferenceSession.run is thread-safe

    def _image(self) -> str:
        if self._input is None:
            raise EngineError("this engine takes named inputs (a matcher's), not images")
        return self._input

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_feeds({self._image(): batch})

    def run_feeds(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        import numpy as np

        result = self._session.run([self._output], dict(feeds))[0]
        return np.asarray(result, dtype=np.float32)

    def run_outputs(self, batch: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
        import numpy as np

        results = self._session.run(list(names), {self._image(): batch})
        return [np.asarray(r, dtype=np.float32) for r in results]


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    suffix = "onnx"
    runtime = "onnxruntime"
    precisions = ("fp32", "int8")

    @property
    def version(self) -> str:
        return ort_version()

    def host_identity(self) -> dict[str, Any]:
        return {"backend": self.name, "backend_version": self.version, "cpu": cpu_identity()}

    def host_tag(self) -> str:
        ident = self.host_identity()
        return f"{self.name}-{isa_tag(ident['cpu'])}"

    def build_options(self, precision: str, backbone: Backbone) -> dict[str, Any]:
        # The same for every backbone: ONNX Runtime keeps a graph's dynamic axes dynamic.
        options: dict[str, Any] = {
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "providers": ["CPUExecutionProvider"],
        }
        if precision == "int8":
            options["quantization"] = _QUANT_OPTIONS
        return options

    def compile(
        self,
        backbone: Backbone,
        precision: str,
        calibration: Path | None,
        out_path: Path,
        work_dir: Path,
    ) -> None:
        if precision not in self.precisions:
            raise EngineError(
                f"backbone {backbone.name!r}: the onnxruntime backend builds fp32 and int8"
                f" engines; {precision} needs the tensorrt backend"
            )
        source = backbone.onnx
        quantized = out_path.with_name(out_path.name + ".qdq.onnx")
        try:
            if precision == "int8":
                # Imported only for int8: ONNX Runtime's quantizer is slow to load.
                from takeoff_cache.engines.ort_int8 import quantize

                quantize(backbone, calibration, quantized, _QUANT_OPTIONS)
                source = quantized
            ort = _ort()
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.optimized_model_filepath = str(out_path)
            options.log_severity_level = 3
            try:
                ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
                raise EngineError(
                    f"backbone {backbone.name!r}: onnxruntime could not compile"
                    f" {backbone.onnx}: {first_line(exc)}"
                ) from exc
        finally:
            quantized.unlink(missing_ok=True)
        if not out_path.is_file():
            raise EngineError(f"backbone {backbone.name!r}: onnxruntime wrote no optimized model")

    def load(self, engine_path: Path, backbone: Backbone, output: str) -> Runner:
        ort = _ort()
        options = ort.SessionOptions()
        # Already optimized at compile time; doing it again only costs start-up.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # One thread per call and one call per core: whole batches in parallel
        # need no per-operator barrier, so a core busy decoding tiles (or lent
        # to another process) never stalls the other (docs/design.md).
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                str(engine_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise EngineError(
                f"backbone {backbone.name!r}: cannot load engine {engine_path}: {first_line(exc)}"
            ) from exc
        image = backbone.input.name if isinstance(backbone.input, InputSpec) else None
        return OnnxRuntimeRunner(session, image, output, streams=_threads())
