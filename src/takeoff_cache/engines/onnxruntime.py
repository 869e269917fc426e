"""ONNX Runtime backend: the engine is the graph optimized for this CPU and saved.

``ORT_ENABLE_ALL`` adds layout and kernel choices specific to the host's
instruction set; ONNX Runtime documents that such a saved model is only for
the hardware it was produced on — exactly what the engine key records.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..backbones import Backbone
from ..errors import EngineError
from ..hostinfo import apply_override, cpu_identity, isa_tag
from . import Backend, Runner


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class OnnxRuntimeRunner(Runner):
    def __init__(self, session: ort.InferenceSession, input_name: str, output: str) -> None:
        self._session = session
        self._input = input_name
        self._output = output

    def run(self, batch: np.ndarray) -> np.ndarray:
        result = self._session.run([self._output], {self._input: batch})[0]
        return np.asarray(result, dtype=np.float32)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    suffix = "onnx"

    @property
    def version(self) -> str:
        return str(ort.__version__)

    def host_identity(self) -> dict[str, Any]:
        return apply_override(
            {"backend": self.name, "backend_version": self.version, "cpu": cpu_identity()}
        )

    def host_tag(self) -> str:
        ident = self.host_identity()
        return f"{self.name}-{isa_tag(ident['cpu'])}"

    def build_options(self, precision: str) -> dict[str, Any]:
        return {"graph_optimization_level": "ORT_ENABLE_ALL", "providers": ["CPUExecutionProvider"]}

    def compile(
        self,
        backbone: Backbone,
        precision: str,
        calibration: Path | None,
        out_path: Path,
        work_dir: Path,
    ) -> None:
        if precision != "fp32":
            raise EngineError(
                f"backbone {backbone.name!r}: the onnxruntime backend builds fp32 engines;"
                f" {precision} needs the tensorrt backend"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(out_path)
        options.log_severity_level = 3
        try:
            ort.InferenceSession(str(backbone.onnx), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
            raise EngineError(
                f"backbone {backbone.name!r}: onnxruntime could not compile {backbone.onnx}: {exc}"
            ) from exc
        if not out_path.is_file():
            raise EngineError(f"backbone {backbone.name!r}: onnxruntime wrote no optimized model")

    def load(self, engine_path: Path, backbone: Backbone, output: str) -> Runner:
        options = ort.SessionOptions()
        # Already optimized at compile time; doing it again only costs start-up.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = _threads()
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                str(engine_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise EngineError(
                f"backbone {backbone.name!r}: cannot load engine {engine_path}: {exc}"
            ) from exc
        return OnnxRuntimeRunner(session, backbone.input.name, output)
