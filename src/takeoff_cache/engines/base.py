"""What every engine backend is: a compiler of ONNX backbones and a runner of engines."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from takeoff_cache.backbones.file import MATCHER, Backbone

if TYPE_CHECKING:
    import numpy as np

BACKENDS = ("auto", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")


class Runner(ABC):
    """A loaded engine: normalized float32 NCHW batch in (or, for a matcher, its named
    inputs), the requested output out."""

    # How many run() calls may usefully be in flight at once, from as many threads.
    streams: int = 1
    # Whether run() computes off the CPU (a GPU): the cores are then decoding's.
    on_accelerator: bool = False

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def run_feeds(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """The output for float32 arrays fed by input name, of any shape the engine
        takes (a matcher's descriptors and keypoints)."""

    def run_outputs(self, batch: np.ndarray, names: Sequence[str]) -> list[np.ndarray] | None:
        """Several outputs of one run, where the engine can give them (else None: the
        caller loads one runner per output)."""
        return None


class Backend(ABC):
    name: str
    suffix: str  # engine file extension
    precisions: tuple[str, ...]  # what this backend can build on this host
    runtime: str  # the module that runs engines, imported on first use (slow to load)

    @property
    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def host_identity(self) -> dict[str, Any]:
        """Everything about this host that makes an engine built here valid only here."""

    @abstractmethod
    def host_tag(self) -> str:
        """A short readable host label for file names."""

    @abstractmethod
    def build_options(self, precision: str, backbone: Backbone) -> dict[str, Any]:
        """Options that change the compiled engine; part of the engine key."""

    @abstractmethod
    def compile(
        self,
        backbone: Backbone,
        precision: str,
        calibration: Path | None,
        out_path: Path,
        work_dir: Path,
    ) -> None:
        """Write the engine for ``backbone`` to ``out_path`` (the caller renames it into place)."""

    @abstractmethod
    def load(self, engine_path: Path, backbone: Backbone, output: str) -> Runner: ...


def built_as(
    backbone: Backbone, precision: str, calibration_sha256: str | None
) -> tuple[str, str | None]:
    """The precision and calibration ``backbone``'s engine is built with, for a request
    at ``precision`` with that calibration.

    A matcher's inputs are descriptors: calibration samples are images and cannot
    calibrate it, so an int8 request builds its matcher at fp32, uncalibrated.
    """
    if backbone.role == MATCHER and precision == "int8":
        return "fp32", None
    return precision, calibration_sha256


def first_line(exc: BaseException) -> str:
    """The first line of an error's message: runtimes raise pages, a report wants a line."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
