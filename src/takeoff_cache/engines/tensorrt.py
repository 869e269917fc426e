"""TensorRT backend (NVIDIA hosts): ONNX parser → builder config → serialized engine.

Written against TensorRT's documented Python API (8.6 and 10.x) and the
CUDA runtime bindings of ``cuda-python``. Both are imported lazily: on hosts
without them :meth:`TensorRTBackend.usable` is False and ``auto`` picks ONNX
Runtime. The timing cache lives in the work folder so rebuilds for another
precision or model reuse kernel measurements.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from takeoff_cache.backbones.file import Backbone
from takeoff_cache.core.fsutil import atomic_write_bytes, sha256_file
from takeoff_cache.core.workdir import tensorrt_dir
from takeoff_cache.engines.base import Backend, Runner
from takeoff_cache.engines.hostinfo import cpu_identity, jetson_release
from takeoff_cache.errors import EngineError, InvalidRequestError

# numpy and the calibration reader are imported where they are used: this
# module is loaded on every host to ask whether TensorRT is usable, by a no-op
# re-run too, which needs neither.
if TYPE_CHECKING:
    import numpy as np

WORKSPACE_BYTES = 1 << 30
MAX_BATCH = 64
OPT_BATCH = 32


def _trt() -> Any:
    return importlib.import_module("tensorrt")


def _cudart() -> Any:
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        return importlib.import_module("cuda.cudart")


def _check(result: Any) -> Any:
    """cuda-python returns ``(err, *values)``; raise on a non-zero error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else values


def _int8_calibrator(backbone: Backbone, calibration: Path, cache_path: Path) -> Any:
    """An entropy calibrator fed from our calibration samples, or from a TensorRT
    calibration cache when ``calibration`` is one (then no batches are needed).

    TensorRT writes the cache it derives next to the timing cache, so a rebuild
    with the same samples skips calibration.
    """
    import numpy as np

    from takeoff_cache.engines.calibration import batches as calibration_batches
    from takeoff_cache.engines.calibration import load_samples

    trt = _trt()
    cudart = _cudart()
    try:
        samples: np.ndarray | None = load_samples(calibration)
        stored = cache_path.read_bytes() if cache_path.is_file() else None
    except InvalidRequestError:
        samples, stored = None, calibration.read_bytes()
    batch_size = 8
    batches = (
        iter(list(calibration_batches(samples, backbone.input, batch_size)))
        if samples is not None
        else iter(())
    )

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._device = 0
            self._nbytes = 0

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(batches, None)
            if batch is None:
                return None
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            if batch.nbytes > self._nbytes:
                if self._device:
                    _check(cudart.cudaFree(self._device))
                self._device = int(_check(cudart.cudaMalloc(batch.nbytes)))
                self._nbytes = batch.nbytes
            _check(
                cudart.cudaMemcpy(
                    self._device,
                    batch.ctypes.data,
                    batch.nbytes,
                    cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                )
            )
            return [self._device]

        def read_calibration_cache(self) -> bytes | None:
            return stored

        def write_calibration_cache(self, data: bytes) -> None:
            atomic_write_bytes(cache_path, bytes(data))

    return Calibrator()


class TensorRTRunner(Runner):
    on_accelerator = True

    def __init__(self, engine_bytes: bytes, backbone: Backbone, output: str) -> None:
        trt = _trt()
        self._cudart = _cudart()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._engine = trt.Runtime(self._logger).deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise EngineError(f"backbone {backbone.name!r}: TensorRT cannot load the engine")
        self._context = self._engine.create_execution_context()
        self._input = backbone.input.name
        self._output = output
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}

    def _device(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cudart.cudaFree(ptr))
            ptr = int(_check(self._cudart.cudaMalloc(nbytes)))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, batch: np.ndarray) -> np.ndarray:
        import numpy as np

        cudart = self._cudart
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self._context.set_input_shape(self._input, batch.shape)
        out_shape = tuple(self._context.get_tensor_shape(self._output))
        out = np.empty(out_shape, dtype=np.float32)
        d_in = self._device(self._input, batch.nbytes)
        d_out = self._device(self._output, out.nbytes)
        kind = cudart.cudaMemcpyKind
        _check(
            cudart.cudaMemcpyAsync(
                d_in, batch.ctypes.data, batch.nbytes, kind.cudaMemcpyHostToDevice, self._stream
            )
        )
        self._context.set_tensor_address(self._input, d_in)
        self._context.set_tensor_address(self._output, d_out)
        if not self._context.execute_async_v3(self._stream):
            raise EngineError("TensorRT inference failed")
        _check(
            cudart.cudaMemcpyAsync(
                out.ctypes.data, d_out, out.nbytes, kind.cudaMemcpyDeviceToHost, self._stream
            )
        )
        _check(cudart.cudaStreamSynchronize(self._stream))
        return out

    def __del__(self) -> None:
        for ptr, _ in getattr(self, "_buffers", {}).values():
            self._cudart.cudaFree(ptr)


class TensorRTBackend(Backend):
    name = "tensorrt"
    suffix = "engine"
    runtime = "tensorrt"

    def __init__(self) -> None:
        # TensorRT 11 builds strongly typed networks only: its FP16 and INT8 builder
        # flags are gone, and a reduced precision comes from the ONNX model's own
        # types. A request for one is then refused at validate, naming what is built.
        flags = _trt().BuilderFlag
        reduced = [p for p, flag in (("fp16", "FP16"), ("int8", "INT8")) if hasattr(flags, flag)]
        self.precisions = ("fp32", *reduced)

    @staticmethod
    def usable() -> bool:
        try:
            _trt()
            count = _check(_cudart().cudaGetDeviceCount())
        except (ImportError, EngineError, OSError, RuntimeError):
            return False
        return int(count) > 0

    @property
    def version(self) -> str:
        return str(_trt().__version__)

    def host_identity(self) -> dict[str, Any]:
        cudart = _cudart()
        props = _check(cudart.cudaGetDeviceProperties(0))
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        return {
            "backend": self.name,
            "backend_version": self.version,
            "gpu": name.strip("\x00 "),
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda_runtime": int(_check(cudart.cudaRuntimeGetVersion())),
            "cuda_driver": int(_check(cudart.cudaDriverGetVersion())),
            "l4t": jetson_release(),
            "cpu": cpu_identity(),
        }

    def host_tag(self) -> str:
        ident = self.host_identity()
        gpu = "".join(c if c.isalnum() else "-" for c in ident["gpu"].lower()).strip("-")
        return f"tensorrt{self.version}-{gpu}-sm{ident['compute_capability'].replace('.', '')}"

    def build_options(self, precision: str) -> dict[str, Any]:
        return {
            "workspace_bytes": WORKSPACE_BYTES,
            "min_batch": 1,
            "opt_batch": OPT_BATCH,
            "max_batch": MAX_BATCH,
        }

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
                f"backbone {backbone.name!r}: TensorRT {self.version} builds"
                f" {' and '.join(self.precisions)}, not {precision}"
            )
        trt = _trt()
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        # TensorRT 10 networks are always explicit-batch; 8.x needs the flag.
        explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
        network = builder.create_network(0 if explicit is None else 1 << int(explicit))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(backbone.onnx.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(
                f"backbone {backbone.name!r}: TensorRT cannot parse the ONNX: {errors}"
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if precision == "fp16":
            if not getattr(builder, "platform_has_fast_fp16", True):
                raise EngineError(f"backbone {backbone.name!r}: this GPU has no fast FP16")
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "int8":
            if calibration is None:
                raise EngineError(f"backbone {backbone.name!r}: int8 needs a calibration cache")
            config.set_flag(trt.BuilderFlag.INT8)
            calib_cache = (
                tensorrt_dir(work_dir)
                / f"calib-{backbone.name}-{sha256_file(calibration)[:16]}.cache"
            )
            calib_cache.parent.mkdir(parents=True, exist_ok=True)
            config.int8_calibrator = _int8_calibrator(backbone, calibration, calib_cache)
        size = backbone.input
        profile = builder.create_optimization_profile()
        profile.set_shape(
            size.name,
            (1, size.channels, size.size, size.size),
            (OPT_BATCH, size.channels, size.size, size.size),
            (MAX_BATCH, size.channels, size.size, size.size),
        )
        config.add_optimization_profile(profile)
        timing_path = tensorrt_dir(work_dir) / f"timing-{self.host_tag()}.cache"
        timing_path.parent.mkdir(parents=True, exist_ok=True)
        timing = config.create_timing_cache(
            timing_path.read_bytes() if timing_path.exists() else b""
        )
        config.set_timing_cache(timing, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"backbone {backbone.name!r}: TensorRT engine build failed")
        out_path.write_bytes(bytes(serialized))
        atomic_write_bytes(timing_path, bytes(config.get_timing_cache().serialize()))

    def load(self, engine_path: Path, backbone: Backbone, output: str) -> Runner:
        return TensorRTRunner(engine_path.read_bytes(), backbone, output)
