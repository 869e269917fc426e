"""An image's size as its header gives it, before any pixel is decoded.

A 12000x12000 PNG is a few kilobytes of bytes and a gigabyte of pixels: every
image from outside (downloaded tiles, ``locate``'s pictures) is sized here
first and refused by its caller's pixel limit without being decoded.
"""

from __future__ import annotations

import io
import warnings


def header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the header of a JPEG, PNG or WebP image; None when no
    header can be read (not an image, or one Pillow itself refuses as a bomb)."""
    if data[:3] == b"\xff\xd8\xff":
        import simplejpeg  # and numpy: loaded by the first image, not by importing this

        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            pass  # unusual JPEGs (CMYK, arithmetic coding): Pillow reads those headers
        else:
            return width, height
    from PIL import Image  # here: a tile checker that meets only JPEGs never loads it

    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning: the caller's pixel limit decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
