"""An image's size is read from its header, whatever its pixels would cost."""

from __future__ import annotations

import io
import struct
import time
import zlib

import pytest
from PIL import Image

from takeoff_cache.backbones.imagesize import header_size
from takeoff_cache.prepare.tileserver import image_format


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` and whose pixels are missing."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)  # the first bytes of a picture, no more
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)


def encoded(fmt: str, size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (30, 90, 60)).save(out, fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_each_format_gives_its_size(fmt: str) -> None:
    assert header_size(encoded(fmt, (300, 200))) == (300, 200)


def test_a_huge_image_is_sized_without_being_decoded() -> None:
    started = time.perf_counter()
    assert header_size(png_header(12_000, 12_000)) == (12_000, 12_000)
    assert image_format(png_header(12_000, 12_000)) is None  # refused from the header
    assert time.perf_counter() - started < 5  # a hang guard: decoding would take 1 GB


@pytest.mark.parametrize("data", [b"", b"<html>quota</html>", b"\xff\xd8\xff" + bytes(10)])
def test_what_has_no_image_header_has_no_size(data: bytes) -> None:
    assert header_size(data) is None
