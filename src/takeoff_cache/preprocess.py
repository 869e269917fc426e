"""Turn tile bytes into the normalized NCHW float32 batch a backbone expects.

Decoding dominates a CPU build, so: JPEG tiles are decoded straight at a
reduced scale where the input is smaller (Pillow's ``draft`` uses libjpeg's
DCT-domain downscaling), and mean/std normalization is one fused multiply-add
in float32 over the whole batch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from .backbones import InputSpec


@dataclass(frozen=True)
class Normalizer:
    """``(pixel / 255 - mean) / std`` as ``pixel * scale + bias``, per channel."""

    scale: np.ndarray
    bias: np.ndarray

    @classmethod
    def for_spec(cls, spec: InputSpec) -> Normalizer:
        std = np.asarray(spec.std, dtype=np.float32)
        mean = np.asarray(spec.mean, dtype=np.float32)
        return cls((1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 → (N, C, H, W) float32."""
        out = pixels.astype(np.float32)
        out *= self.scale
        out += self.bias
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def decode_tile(data: bytes, spec: InputSpec) -> np.ndarray:
    """Decode one tile to (size, size, channels) uint8; raises OSError/ValueError if undecodable."""
    image: Image.Image = Image.open(io.BytesIO(data))
    mode = "RGB" if spec.channels == 3 else "L"
    if isinstance(image, JpegImageFile):
        image.draft(mode, (spec.size, spec.size))
    image.load()  # decode now so a truncated tile fails here, not later
    if image.mode != mode:
        image = image.convert(mode)
    if image.size != (spec.size, spec.size):
        image = image.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels if pixels.ndim == 3 else pixels[:, :, None]
