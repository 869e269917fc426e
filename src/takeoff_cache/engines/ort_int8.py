"""INT8 for the ONNX Runtime backend: static QDQ quantization from calibration samples.

Kept apart from the backend so that builds that do not quantize never load
ONNX Runtime's quantizer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from takeoff_cache.backbones.file import Backbone
from takeoff_cache.engines.base import first_line
from takeoff_cache.engines.calibration import batches as calibration_batches
from takeoff_cache.engines.calibration import load_samples
from takeoff_cache.errors import EngineError


class _Samples(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, input_name: str, batches: Iterator[np.ndarray]) -> None:
        self._input = input_name
        self._batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input: batch}


def quantize(
    backbone: Backbone, calibration: Path | None, out_path: Path, settings: Mapping[str, Any]
) -> None:
    """Write ``backbone`` quantized to ``out_path``.

    ``settings`` are the backend's quantization build options, the very values
    the engine key hashes; ONNX Runtime's enums are looked up by their names.
    """
    if calibration is None:
        raise EngineError(f"backbone {backbone.name!r}: int8 needs a calibration file")
    samples = load_samples(calibration)
    reader = _Samples(backbone.image.name, calibration_batches(samples, backbone.image))
    prepared = out_path.with_name(out_path.name + ".pre.onnx")
    try:
        # Shape inference and graph clean-up first, as ONNX Runtime's quantizer expects.
        quant_pre_process(str(backbone.onnx), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out_path),
            reader,
            quant_format=QuantFormat[settings["format"]],
            per_channel=settings["per_channel"],
            activation_type=QuantType[settings["activation_type"]],
            weight_type=QuantType[settings["weight_type"]],
            calibrate_method=CalibrationMethod[settings["calibrate_method"]],
        )
    except Exception as exc:  # the quantizer raises plain Exceptions of many kinds
        raise EngineError(
            f"backbone {backbone.name!r}: int8 quantization failed: {first_line(exc)}"
        ) from exc
    finally:
        prepared.unlink(missing_ok=True)
