"""Turn tile bytes into the normalized NCHW float32 batch a backbone expects.

Decoding is a third of a CPU build's work (the engine the rest), so:

- JPEG tiles are decoded straight at the reduced scale the input needs
  (libjpeg's DCT-domain downscaling, e.g. 256 px tiles decoded as 128 px), a
  quarter of the full decode's cost. (libjpeg's fast IDCT saved nothing
  measurable on top, so the accurate one is kept);
- where the scale is one libjpeg and Pillow's ``draft`` share (tile size =
  input size times 1, 2, 4 or 8), simplejpeg runs libjpeg-turbo straight into the
  batch buffer, skipping Pillow's Python-level header parsing and the copy
  out of an Image: a third less decode time, the very same pixels (tested).
  Everything else (other scales, PNG, WebP, damaged bytes) goes through
  Pillow, which also names what is wrong with a bad tile;
- tiles are decoded into a caller's uint8 buffer, so a batch is never
  assembled from per-tile copies;
- mean/std normalization is one multiply and one add in float32, written
  straight into a reusable NCHW buffer (the transpose happens inside the
  multiply, not as a copy of its own). Folding it into the engine graph instead
  (uint8 NHWC in: Cast, Transpose, Mul, Add) was measured on ONNX Runtime's CPU
  provider and lost, alone and together with inference (benchmarks/embed.py,
  docs/design.md). An engine on a GPU is another matter: there
  it would take this work off the cores, which decoding needs.

:data:`PREPROCESS_ID` names this recipe: descriptors made by a different recipe
are different descriptors, so it is part of every descriptor key.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from takeoff_cache.backbones.spec import InputSpec

PREPROCESS_ID = "pillow-jpeg-draft/bilinear/float32-v2"


@dataclass(frozen=True)
class Normalizer:
    """``(pixel / 255 - mean) / std`` as ``pixel * scale + bias``, per channel."""

    scale: np.ndarray
    bias: np.ndarray

    @classmethod
    def for_spec(cls, spec: InputSpec) -> Normalizer:
        std = np.asarray(spec.std, dtype=np.float32)
        mean = np.asarray(spec.mean, dtype=np.float32)
        scale = (1.0 / (255.0 * std)).astype(np.float32)
        bias = (-mean / std).astype(np.float32)
        # Shaped (C, 1, 1) so they broadcast over an NCHW batch.
        return cls(scale.reshape(-1, 1, 1), bias.reshape(-1, 1, 1))

    def __call__(self, pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(N, H, W, C) uint8 → (N, C, H, W) float32, into ``out`` when given."""
        n, h, w, c = pixels.shape
        if out is None:
            out = np.empty((n, c, h, w), dtype=np.float32)
        np.multiply(pixels.transpose(0, 3, 1, 2), self.scale, out=out, dtype=np.float32)
        out += self.bias
        return out


_JPEG_MAGIC = b"\xff\xd8\xff"
_DRAFT_FACTORS = (1, 2, 4, 8)


def decode_into(data: bytes, spec: InputSpec, out: np.ndarray) -> None:
    """Decode one tile into ``out`` (size, size, channels) uint8, C-contiguous.

    Raises OSError/ValueError/SyntaxError (Pillow's choices) if the bytes are
    not a complete image; a truncated JPEG fails here, never later.
    """
    if data[:3] == _JPEG_MAGIC and _decode_jpeg_into(data, spec, out):
        return
    _decode_with_pillow(data, spec, out)


def _decode_jpeg_into(data: bytes, spec: InputSpec, out: np.ndarray) -> bool:
    """libjpeg-turbo into ``out`` when it yields Pillow's pixels; False to let Pillow do it."""
    try:
        width, height, _, _ = simplejpeg.decode_jpeg_header(data)
        factor, rest = divmod(width, spec.size)
        if width != height or rest or factor not in _DRAFT_FACTORS:
            return False  # Pillow scales by draft *and* resizes: keep its pixels
        simplejpeg.decode_jpeg(
            data,
            colorspace="RGB" if spec.channels == 3 else "GRAY",
            min_height=spec.size,
            min_width=spec.size,
            buffer=out,
            strict=True,  # libjpeg's warnings (premature end of data) are errors
        )
    except ValueError:
        return False  # damaged or unusual (CMYK...): Pillow decodes or names the problem
    return True


def _decode_with_pillow(data: bytes, spec: InputSpec, out: np.ndarray) -> None:
    image_into(Image.open(io.BytesIO(data)), spec, out)


def image_into(
    image: Image.Image, spec: InputSpec, out: np.ndarray, *, crop_square: bool = False
) -> None:
    """Decode ``image`` into ``out`` as the build decodes tiles; ``crop_square`` first
    cuts the centred square of a non-square photo, so it is not squeezed."""
    mode = "RGB" if spec.channels == 3 else "L"
    if isinstance(image, JpegImageFile):
        image.draft(mode, (spec.size, spec.size))  # DCT-domain downscale
    image.load()
    if crop_square:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.mode != mode:
        image = image.convert(mode)
    if image.size != (spec.size, spec.size):
        image = image.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image)
    out[...] = pixels if pixels.ndim == 3 else pixels[:, :, None]


def decode_tile(data: bytes, spec: InputSpec) -> np.ndarray:
    """Decode one tile to a new (size, size, channels) uint8 array."""
    out = np.empty((spec.size, spec.size, spec.channels), dtype=np.uint8)
    decode_into(data, spec, out)
    return out
