"""Engine backends: compile an ONNX backbone for this host and run it.

Two real implementations share :class:`Backend`: ONNX Runtime (any host) and
TensorRT (NVIDIA hosts). :func:`get_backend` picks one.
"""

from __future__ import annotations

from takeoff_cache.engines.base import BACKENDS, PRECISIONS, Backend, Runner, first_line
from takeoff_cache.errors import EngineError, InvalidRequestError

__all__ = ["BACKENDS", "PRECISIONS", "Backend", "Runner", "first_line", "get_backend"]


def tensorrt_available() -> bool:
    from takeoff_cache.engines.tensorrt import TensorRTBackend

    usable: bool = TensorRTBackend.usable()
    return usable


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise InvalidRequestError(f"backend: must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "tensorrt" or (name == "auto" and tensorrt_available()):
        from takeoff_cache.engines.tensorrt import TensorRTBackend

        if not TensorRTBackend.usable():
            raise EngineError("backend: tensorrt needs a CUDA device and the tensorrt package")
        return TensorRTBackend()
    from takeoff_cache.engines.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend()
