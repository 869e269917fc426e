"""``locate`` on a real demo cache: corpus tiles and drone-like views of them are found;
bad images and an unverifiable cache are refused with typed errors."""

from __future__ import annotations

import io
import os
import shutil
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from takeoff_cache.core.tilemath import haversine_m, tile_center
from takeoff_cache.errors import DescriptorError, ImageError, VerificationError
from takeoff_cache.localize.locate import Location, Match, estimate_position, locate
from takeoff_cache.localize.selftest import View, hit_rank, render_view
from takeoff_cache.tiles.corpus import open_corpus
from takeoff_cache.trust.keys import load_trust_store
from tests.support.caches import artifact_path, build_demo_cache, localizer_of

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def built(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_cache(demo_source, tmp_path_factory.mktemp("locate") / "built")


@pytest.fixture
def root(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built demo, for tests that damage it."""
    return Path(shutil.copytree(built, tmp_path / "copy"))


def tiles_of(root: Path) -> tuple[tuple[int, int, int], ...]:
    return localizer_of(root)[1].tiles


def tile_bytes(root: Path, tile: tuple[int, int, int]) -> bytes:
    with open_corpus(root / "corpus.mbtiles") as corpus:
        return corpus.read(*tile)


def run(
    root: Path,
    images: list[Path],
    *,
    k: int = 5,
    backbones: Path | None = None,
    register_views: bool = True,
) -> list[Location]:
    trusted = load_trust_store(root / "trust")
    return locate(
        root / "cache", images, trusted, k=k, backbones=backbones, register_views=register_views
    )


def test_corpus_tiles_are_found_at_rank_1(built: Path, tmp_path: Path) -> None:
    tiles = tiles_of(built)
    picked = [tiles[0], tiles[len(tiles) // 2], tiles[-1]]
    images = []
    for i, tile in enumerate(picked):
        images.append(tmp_path / f"tile{i}.jpg")
        images[-1].write_bytes(tile_bytes(built, tile))
    found = run(built, images, k=3)
    for tile, location in zip(picked, found, strict=True):
        assert (location.matches[0].z, location.matches[0].x, location.matches[0].y) == tile
        assert location.matches[0].score == pytest.approx(1.0, abs=1e-4)
        assert len(location.matches) == 3
        assert location.best == pytest.approx(tile_center(*tile))
        assert location.seconds > 0


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_png_and_webp_of_any_size_are_found(built: Path, tmp_path: Path, fmt: str) -> None:
    tile = tiles_of(built)[5]
    image = Image.open(io.BytesIO(tile_bytes(built, tile))).resize((600, 600))
    path = tmp_path / f"tile.{fmt.lower()}"
    image.save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    (location,) = run(built, [path])
    assert hit_rank(tile, location.matches) == 1


def test_a_non_square_photo_is_centre_cropped(built: Path, tmp_path: Path) -> None:
    tile = tiles_of(built)[7]
    square = Image.open(io.BytesIO(tile_bytes(built, tile)))
    wide = Image.new("RGB", (square.width * 4 // 3, square.height), (128, 128, 128))
    wide.paste(square, (square.width // 6, 0))  # grey bands either side, as a 4:3 frame
    path = tmp_path / "wide.jpg"
    wide.save(path, quality=92)
    (location,) = run(built, [path])
    assert hit_rank(tile, location.matches) == 1


def test_a_drone_view_of_a_tile_finds_it_or_a_neighbour(built: Path, tmp_path: Path) -> None:
    _, localizer = localizer_of(built)
    tiles = [t for t in localizer.tiles if t[0] == max(t[0] for t in localizer.tiles)]
    tile = tiles[len(tiles) // 2 + 3]  # an inner tile: all 8 neighbours exist
    z, x, y = tile
    with open_corpus(built / "corpus.mbtiles") as corpus:
        cells = [
            np.asarray(Image.open(io.BytesIO(corpus.read(z, x + dx, y + dy))).convert("RGB"))
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ]
    mosaic = np.concatenate([np.concatenate(cells[r * 3 : r * 3 + 3], axis=1) for r in range(3)])
    view = View(tile, 8.0, 1.15, 0.2, -0.15, 1.1, -8.0, 0.8, 3.0, 70, 1)
    jpeg = render_view(mosaic, view, mosaic.shape[0] // 3)
    path = tmp_path / "view.jpg"
    path.write_bytes(jpeg)
    (location,) = run(built, [path])
    assert hit_rank(tile, location.matches) == 1
    # The estimate is within a tile of the view's true centre (a z17 tile is ~200 m here).
    assert haversine_m(*location.weighted, *view.center) < 200.0


def test_a_text_file_named_jpg_is_refused(built: Path, tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_text("not a picture\n")
    with pytest.raises(ImageError, match=r"photo\.jpg: not a JPEG, PNG or WebP image") as info:
        run(built, [path])
    assert info.value.exit_code == 2


def test_a_truncated_png_is_refused(built: Path, tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.open(io.BytesIO(tile_bytes(built, tiles_of(built)[0]))).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: cannot be decoded"):
        run(built, [path])


def test_a_missing_image_and_another_format_are_refused(built: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"absent\.jpg: cannot be read"):
        run(built, [tmp_path / "absent.jpg"])
    gif = tmp_path / "tile.gif"
    Image.new("RGB", (64, 64)).save(gif, format="GIF")
    with pytest.raises(ImageError, match="GIF is not a JPEG, PNG or WebP image"):
        run(built, [gif])


def test_an_image_too_large_is_refused_from_its_header(built: Path, tmp_path: Path) -> None:
    # 12000 x 12000 in its header, a few bytes of pixels: decoding would cost 430 MB.
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    ihdr = (12_000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    path = tmp_path / "huge.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b""))
    with pytest.raises(ImageError, match=r"huge\.png: 12000x12000 px is more than 67,108,864"):
        run(built, [path])


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_a_device_or_fifo_is_refused_before_the_cache_is_opened(
    tmp_path: Path, special: str
) -> None:
    path = Path("/dev/zero")
    if special == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)
    # No cache at all: the images are checked first.
    with pytest.raises(ImageError, match="FIFO, socket or device, not a file"):
        locate(tmp_path / "nowhere", [path], [])


def test_images_are_decoded_one_at_a_time(built: Path, tmp_path: Path) -> None:
    path = tmp_path / "tile.jpg"
    path.write_bytes(tile_bytes(built, tiles_of(built)[0]))
    # Retrieval only: what is measured is how images are decoded, not registration.
    run(built, [path], register_views=False)  # the engine and index opened once first
    many = 400
    pixels = localizer_of(built)[1].empty_pixels(many).nbytes
    tracemalloc.start()
    try:
        found = run(built, [path] * many, register_views=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(found) == many and all(loc.position is None for loc in found)
    # Decoded all up front, the pixels alone would be this peak; one at a time, a fraction.
    assert peak < pixels / 2, (peak, pixels)


def test_an_unverifiable_cache_is_refused_before_any_image(root: Path, tmp_path: Path) -> None:
    index = root / "cache" / artifact_path(root, "faiss_index")
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0x01
    index.unlink()
    index.write_bytes(bytes(data))
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a picture")
    with pytest.raises(VerificationError, match="SHA-256 differs") as info:
        run(root, [bad])
    assert info.value.exit_code == 7


def test_a_preprocessing_other_than_the_builds_is_refused(root: Path, tmp_path: Path) -> None:
    other = root / "other-backbones.toml"
    text = (root / "backbones.toml").read_text().replace("0.485", "0.5")
    other.write_text(text.replace('"models/', f'"{root}/models/'))
    image = tmp_path / "tile.jpg"
    image.write_bytes(tile_bytes(root, tiles_of(root)[0]))
    with pytest.raises(DescriptorError, match="not the one its index was built with"):
        run(root, [image], backbones=other)


def test_the_estimate_weighs_neighbours_and_ignores_far_tiles() -> None:
    best, east, far = Match(17, 100, 200, 0.9), Match(17, 101, 200, 0.9), Match(17, 140, 9, 0.89)
    lat, lon = estimate_position([best, east, far])
    # Halfway between two equal neighbours: on their shared border, at the rows' centre.
    border = (
        tile_center(17, 100, 200)[0],
        (tile_center(17, 100, 200)[1] + tile_center(17, 101, 200)[1]) / 2,
    )
    assert (lat, lon) == pytest.approx(border)
    assert estimate_position([best]) == pytest.approx(best.center)
