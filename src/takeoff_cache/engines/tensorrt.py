"""TensorRT backend (NVIDIA hosts): ONNX parser → builder config → serialized engine.

Written against TensorRT's documented Python API (8.6 and 10.x) and the
CUDA runtime bindings of ``cuda-python``. Both are imported lazily: on hosts
without them :meth:`TensorRTBackend.usable` is False and ``auto`` picks ONNX
Runtime. The timing cache lives in the work folder so rebuilds for another
precision or model reuse kernel measurements.

A matcher's keypoint axes are dynamic: its optimization profile runs from one
keypoint to the most a side is ever given (:data:`.spec.VIEW_KEYPOINTS` for the
view, :data:`.spec.PLACE_KEYPOINTS` for a place's 3 x 3 tiles), at its
descriptors' width, one pair at a time.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from takeoff_cache.backbones.file import Backbone
from takeoff_cache.backbones.spec import PLACE_KEYPOINTS, VIEW_KEYPOINTS, InputSpec, MatcherInput
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

Shape = tuple[int, ...]


def matcher_profile(backbone: Backbone) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of each of a matcher's inputs: one pair at a time, one
    keypoint at least, at most the view's or the place's keypoints, fixed width."""
    spec = backbone.input
    if not isinstance(spec, MatcherInput):
        raise EngineError(f"backbone {backbone.name!r}: not a matcher")
    width = backbone.descriptor_width
    if width is None:
        raise EngineError(
            f"backbone {backbone.name!r}: TensorRT's optimization profile needs the"
            " descriptors' width, which neither the matcher nor its extractor fixes:"
            " export one of them with a fixed D"
        )
    profile: dict[str, tuple[Shape, Shape, Shape]] = {}
    for side, most in enumerate((VIEW_KEYPOINTS, PLACE_KEYPOINTS)):
        names = [(spec.descriptors[side], width)]
        if spec.keypoints is not None:
            names.append((spec.keypoints[side], 2))
        for name, last in names:
            profile[name] = ((1, 1, last), (1, most, last), (1, most, last))
    return profile


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
        iter(list(calibration_batches(samples, backbone.image, batch_size)))
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
    """One execution context: calls from several threads take turns (its buffers and
    shapes are the context's). Every output of the engine is bound, the one asked for
    is copied back. A fed input the engine lacks is one its graph never read (TensorRT
    drops those, a matcher's unused keypoints say): it is not fed."""

    on_accelerator = True

    def __init__(self, engine_bytes: bytes, backbone: Backbone, output: str) -> None:
        trt = _trt()
        self._trt = trt
        self._cudart = _cudart()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._engine = trt.Runtime(self._logger).deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise EngineError(f"backbone {backbone.name!r}: TensorRT cannot load the engine")
        self._context = self._engine.create_execution_context()
        self._input = backbone.input.name if isinstance(backbone.input, InputSpec) else None
        self._output = output
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._outputs = [
            n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT
        ]
        self._inputs = frozenset(
            n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        )
        if output not in self._outputs:
            raise EngineError(
                f"backbone {backbone.name!r}: the engine has no output {output!r}"
                f" (it has {self._outputs})"
            )
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def _device(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cudart.cudaFree(ptr))
            ptr = int(_check(self._cudart.cudaMalloc(nbytes)))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self._input is None:
            raise EngineError("this engine takes named inputs (a matcher's), not images")
        return self.run_feeds({self._input: batch})

    def run_feeds(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        import numpy as np

        fed = {
            name: np.ascontiguousarray(a, dtype=np.float32)
            for name, a in feeds.items()
            if name in self._inputs
        }
        with self._lock:
            return self._run_locked(fed)

    def _run_locked(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        import numpy as np

        cudart, trt, context = self._cudart, self._trt, self._context
        kind = cudart.cudaMemcpyKind
        for name, array in feeds.items():
            if not context.set_input_shape(name, array.shape):
                raise EngineError(
                    f"TensorRT: input {name!r} of shape {array.shape} is outside the"
                    " engine's optimization profile"
                )
        for name, array in feeds.items():
            device = self._device(name, array.nbytes)
            _check(
                cudart.cudaMemcpyAsync(
                    device,
                    array.ctypes.data,
                    array.nbytes,
                    kind.cudaMemcpyHostToDevice,
                    self._stream,
                )
            )
            context.set_tensor_address(name, device)
        out = np.empty(0, dtype=np.float32)
        device_out = 0
        for name in self._outputs:
            shape = tuple(context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            device = self._device(name, nbytes)
            context.set_tensor_address(name, device)
            if name == self._output:
                out, device_out = np.empty(shape, dtype=dtype), device
        if not context.execute_async_v3(self._stream):
            raise EngineError("TensorRT inference failed")
        _check(
            cudart.cudaMemcpyAsync(
                out.ctypes.data, device_out, out.nbytes, kind.cudaMemcpyDeviceToHost, self._stream
            )
        )
        _check(cudart.cudaStreamSynchronize(self._stream))
        return out.astype(np.float32, copy=False)

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

    def build_options(self, precision: str, backbone: Backbone) -> dict[str, Any]:
        if isinstance(backbone.input, MatcherInput):
            profile = matcher_profile(backbone)
            return {
                "workspace_bytes": WORKSPACE_BYTES,
                "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()},
            }
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
        profile = builder.create_optimization_profile()
        if isinstance(backbone.input, MatcherInput):
            inputs = {network.get_input(i).name for i in range(network.num_inputs)}
            for name, (least, opt, most) in matcher_profile(backbone).items():
                if name in inputs:
                    profile.set_shape(name, least, opt, most)
        else:
            size = backbone.input
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
