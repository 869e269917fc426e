"""Local features of an image: keypoints, their scores and unit descriptors.

Two extractors, one contract. With a ``local_features`` backbone the engine
compiled from it runs (:class:`NetworkExtractor`: outputs ``keypoints``
(N, K, 2), ``scores`` (N, K) and ``descriptors`` (N, K, D), documented in
docs/backbones.md); without one, OpenCV's SIFT (:class:`SiftExtractor`).

Whatever the extractor, what is kept of an image is at most
:data:`MAX_KEYPOINTS` keypoints, the strongest, as fractions of the image's
width and height (so a tile's keypoint at (0.5, 0.5) is its centre whatever
size it was read at), and descriptors made unit length and quantized to int8
(``round(127 * d)``): D + 5 bytes a keypoint, at most 256 (D + 5) bytes a tile.

A view (a photo to locate) is read by :meth:`Extractor.view`. A network
extractor sees the view at three scales (:data:`VIEW_SCALES`) and keeps every
keypoint, mapped back into the view: a network's descriptor is computed at one
scale, and a drone flies higher or lower than the tiles were taken. SIFT finds
the scale itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from takeoff_cache.backbones.preprocess import PREPROCESS_ID, Normalizer
from takeoff_cache.backbones.spec import MAX_KEYPOINTS as MAX_KEYPOINTS
from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.core.canonical import content_key
from takeoff_cache.engines.base import Runner
from takeoff_cache.errors import DescriptorError

# MAX_KEYPOINTS (in backbones/spec.py, which derives a matcher's shapes from it): the
# most keypoints kept of a tile (and of each scale of a view); bounds a tile's features
# at MAX_KEYPOINTS * (D + 5) bytes (about 24 KB for the demo network's 90).
# Outputs of a local_features network, in this order (docs/backbones.md).
OUTPUTS = ("keypoints", "scores", "descriptors")
# How a network extractor resizes a view: a view seen from higher up (its ground
# looks smaller) matches best enlarged, one from lower down shrunk.
VIEW_SCALES = (0.75, 1.0, 4.0 / 3.0)
# SIFT without a network: what it is asked for, part of the features' key.
SIFT_SIZE = 256
SIFT_CONTRAST = 0.02
SIFT_OPTIONS = {"nfeatures": MAX_KEYPOINTS, "contrastThreshold": SIFT_CONTRAST}
FEATURES_RECIPE = "takeoff-cache local features 1"


@dataclass(frozen=True)
class Features:
    """An image's local features: ``keypoints`` (n, 2) float32 as fractions of its
    width and height (x, y), ``scores`` (n,) float32 and ``descriptors`` (n, D) int8
    (127 times a unit vector)."""

    keypoints: np.ndarray
    scores: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.keypoints)

    def unit(self) -> np.ndarray:
        """The descriptors as float32 unit vectors (their quantization undone)."""
        d = self.descriptors.astype(np.float32)
        norms = np.linalg.norm(d, axis=1, keepdims=True)
        out: np.ndarray = d / np.maximum(norms, 1e-6)
        return out


def quantize(descriptors: np.ndarray) -> np.ndarray:
    """Unit rows of ``descriptors`` as int8, 127 times each component, rounded."""
    d = np.asarray(descriptors, dtype=np.float32)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    out: np.ndarray = np.clip(np.rint(d * 127.0), -127, 127).astype(np.int8)
    return out


def strongest(
    keypoints: np.ndarray, scores: np.ndarray, descriptors: np.ndarray, size: tuple[float, float]
) -> Features:
    """The :data:`MAX_KEYPOINTS` best-scored finite keypoints, as :class:`Features`.

    ``keypoints`` in pixels (x, y; the centre of the top-left pixel at (0, 0)) of an
    image of ``size`` (width, height) pixels; those outside it are dropped.
    """
    kp = np.asarray(keypoints, dtype=np.float32).reshape(-1, 2)
    sc = np.asarray(scores, dtype=np.float32).reshape(-1)
    de = np.asarray(descriptors, dtype=np.float32).reshape(len(kp), -1)
    if not (len(kp) == len(sc) == len(de)):
        raise DescriptorError(
            f"local features: {len(kp)} keypoints, {len(sc)} scores, {len(de)} descriptors"
        )
    w, h = size
    ok = (
        np.isfinite(kp).all(axis=1)
        & np.isfinite(sc)
        & np.isfinite(de).all(axis=1)
        & (sc > 0)
        & (kp[:, 0] >= -0.5)
        & (kp[:, 0] <= w - 0.5)
        & (kp[:, 1] >= -0.5)
        & (kp[:, 1] <= h - 0.5)
    )
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(-sc[idx], kind="stable")[:MAX_KEYPOINTS]]
    fractions = (kp[idx] + 0.5) / np.array([w, h], dtype=np.float32)
    return Features(fractions.astype(np.float32), sc[idx], quantize(de[idx]))


class Extractor(ABC):
    """Reads local features of tiles (square, ``size`` pixels) and of views."""

    size: int  # tiles are decoded at this size for :meth:`tiles`

    @property
    @abstractmethod
    def space(self) -> str:
        """Which features are interchangeable: the tile features' key in the store."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What the manifest records of the extractor."""

    @abstractmethod
    def tiles(self, pixels: np.ndarray) -> list[Features]:
        """Features of each of ``pixels`` (n, size, size, 3) uint8 tiles."""

    @abstractmethod
    def view(self, pixels: np.ndarray) -> Features:
        """Features of one view, ``pixels`` (h, w, 3) uint8, any size."""


class NetworkExtractor(Extractor):
    """A ``local_features`` engine, loaded by ``load(output)`` when first needed (a
    rebuild that finds every tile's features stored never loads it): one run for the
    three outputs where the engine gives several (ONNX Runtime), else one runner per
    output."""

    def __init__(
        self, load: Callable[[str], Runner], spec: InputSpec, engine_key: str, backbone: str
    ) -> None:
        self._load = load
        self._runners: dict[str, Runner] = {}
        self.spec = spec
        self.size = spec.size
        self.engine_key = engine_key
        self.backbone = backbone
        self._normalize = Normalizer.for_spec(spec)

    @property
    def space(self) -> str:
        return content_key(
            {
                "engine_key": self.engine_key,
                "input": self.spec.identity(),
                "preprocess": PREPROCESS_ID,
                "recipe": FEATURES_RECIPE,
                "max_keypoints": MAX_KEYPOINTS,
            }
        )

    def identity(self) -> dict[str, Any]:
        return {
            "extractor": "network",
            "backbone": self.backbone,
            "engine_key": self.engine_key,
            "size": self.size,
        }

    def _run(self, pixels: np.ndarray) -> list[np.ndarray]:
        batch = self._normalize(pixels)
        if not self._runners:
            self._runners[OUTPUTS[0]] = self._load(OUTPUTS[0])
        first = self._runners[OUTPUTS[0]]
        together = first.run_outputs(batch, OUTPUTS)
        if together is not None:
            return together
        for name in OUTPUTS[1:]:
            if name not in self._runners:
                self._runners[name] = self._load(name)
        return [self._runners[name].run(batch) for name in OUTPUTS]

    def _check(self, outputs: list[np.ndarray], n: int) -> None:
        kp, sc, de = outputs
        if kp.shape[:1] != (n,) or kp.ndim != 3 or kp.shape[2] != 2:
            raise DescriptorError(f"local features: keypoints of shape {kp.shape}, want (N, K, 2)")
        if sc.shape != kp.shape[:2] or de.ndim != 3 or de.shape[:2] != kp.shape[:2]:
            raise DescriptorError(
                f"local features: scores {sc.shape} and descriptors {de.shape}"
                f" do not match keypoints {kp.shape}"
            )

    def tiles(self, pixels: np.ndarray) -> list[Features]:
        outputs = self._run(pixels)
        self._check(outputs, len(pixels))
        kp, sc, de = outputs
        size = (float(self.size), float(self.size))
        return [strongest(kp[i], sc[i], de[i], size) for i in range(len(pixels))]

    def view(self, pixels: np.ndarray) -> Features:
        import cv2

        h, w = pixels.shape[:2]
        s = self.size
        base = cv2.resize(pixels, (s, s), interpolation=_interpolation(s / max(h, w)))
        inputs, offsets = [], []
        for factor in VIEW_SCALES:
            n = round(s * factor)
            scaled = cv2.resize(base, (n, n), interpolation=_interpolation(factor))
            if n >= s:
                o = (n - s) // 2
                inputs.append(scaled[o : o + s, o : o + s])
                offsets.append(o)
            else:
                pad = (s - n) // 2
                inputs.append(
                    cv2.copyMakeBorder(
                        scaled, pad, s - n - pad, pad, s - n - pad, cv2.BORDER_REFLECT_101
                    )
                )
                offsets.append(-pad)
        outputs = self._run(np.ascontiguousarray(np.stack(inputs)))
        self._check(outputs, len(inputs))
        kp, sc, de = outputs
        parts = []
        for i, factor in enumerate(VIEW_SCALES):
            # Back into pixels of the s x s view, where it stays inside it.
            pts = (kp[i] + 0.5 + offsets[i]) / factor - 0.5
            parts.append(strongest(pts, sc[i], de[i], (float(s), float(s))))
        return Features(
            np.concatenate([p.keypoints for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.descriptors for p in parts]),
        )


def _interpolation(factor: float) -> int:
    import cv2

    return int(cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR)


class SiftExtractor(Extractor):
    """OpenCV's SIFT on luma, for a cache whose backbones name no local-feature network."""

    size = SIFT_SIZE

    def __init__(self) -> None:
        import cv2

        self._version = str(cv2.__version__)

    @property
    def space(self) -> str:
        return content_key(
            {
                "extractor": "opencv-sift",
                "opencv": self._version,
                "options": SIFT_OPTIONS,
                "size": self.size,
                "preprocess": PREPROCESS_ID,
                "recipe": FEATURES_RECIPE,
                "max_keypoints": MAX_KEYPOINTS,
            }
        )

    def identity(self) -> dict[str, Any]:
        return {"extractor": "opencv-sift", "opencv": self._version, "size": self.size}

    def _one(self, pixels: np.ndarray) -> Features:
        import cv2

        # A detector per call: OpenCV's are not documented as safe to share between threads.
        sift = cv2.SIFT.create(nfeatures=MAX_KEYPOINTS, contrastThreshold=SIFT_CONTRAST)
        gray = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)
        found, descriptors = sift.detectAndCompute(gray, None)
        h, w = gray.shape
        if not found or descriptors is None:
            return strongest(np.zeros((0, 2)), np.zeros(0), np.zeros((0, 128)), (w, h))
        kp = np.array([k.pt for k in found], dtype=np.float32)
        # SIFT's response is a contrast, always > 0 for a kept keypoint.
        sc = np.array([max(k.response, 1e-9) for k in found], dtype=np.float32)
        return strongest(kp, sc, descriptors, (float(w), float(h)))

    def tiles(self, pixels: np.ndarray) -> list[Features]:
        return [self._one(p) for p in pixels]

    def view(self, pixels: np.ndarray) -> Features:
        return self._one(pixels)
