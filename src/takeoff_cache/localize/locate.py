"""``locate``: which tiles of a cache an image shows, and where on Earth that is.

:func:`locate` verifies the cache first (a cache that does not verify is never
queried), opens its place-recognition engine and FAISS index, and embeds each
image exactly as the build embedded the tiles: the same decoding and
normalization (:mod:`.preprocess`), the same L2 normalization, the same engine.
:class:`Localizer` is the part that works on an engine and index already open;
the build's self-test (:mod:`.selftest`) uses it without verifying again.

The position is the centre of the best tile, and a score-weighted mean of the
centres of the top-k tiles at that zoom lying next to it: a view that straddles
a tile border scores its neighbours almost as high, and pulls the estimate
towards the border.

How sure an answer is (:class:`Confidence`) rests on one figure, the
**distance ratio**: the descriptor distance to the best tile over the distance
to the best tile outside its neighbourhood (a Lowe ratio test between places,
not between neighbouring tiles, which overlap a view alike). Well below 1, one
place stands out; near 1, several places look alike, or none is the place.
Its two thresholds are calibrated by the build's self-test and signed.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError

from takeoff_cache.backbones.file import PLACE_RECOGNITION, Backbone, load_backbones
from takeoff_cache.backbones.imagesize import header_size
from takeoff_cache.backbones.preprocess import Normalizer, decode_into, image_into
from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.core.fsutil import kind_problem, read_regular
from takeoff_cache.core.tilemath import fractional_tile_to_latlon, tile_center
from takeoff_cache.descriptors.index import descriptor_key, read_index
from takeoff_cache.descriptors.pipeline import BATCH_SIZE, check_vectors
from takeoff_cache.descriptors.store import descriptor_space, l2_normalize
from takeoff_cache.engines import Runner, get_backend
from takeoff_cache.errors import BackboneError, DescriptorError, ImageError
from takeoff_cache.localize.register import Registration, open_features, open_matcher, register
from takeoff_cache.trust.keys import TrustedKey
from takeoff_cache.trust.manifest import Artifact, Manifest
from takeoff_cache.trust.verify import verify_cache

TILE_MAP_FORMAT = "takeoff-cache-tile-map"
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
MAX_IMAGE_BYTES = 64 << 20
MAX_IMAGE_PIXELS = 8192 * 8192  # a 60-megapixel camera frame; decoded, 200 MB of RGB
DEFAULT_K = 5
# Tiles retrieved to find the best one outside the best tile's neighbourhood: the
# 3x3 neighbourhood and the tiles overlapping it at the other zooms fill the first
# ranks.
CONFIDENCE_DEPTH = 64
CONFIDENT, AMBIGUOUS, OUTSIDE = "confident", "ambiguous", "outside"

TileKey = tuple[int, int, int]


@dataclass(frozen=True)
class Match:
    """One retrieved tile and its cosine similarity to the query."""

    z: int
    x: int
    y: int
    score: float

    @property
    def zxy(self) -> str:
        return f"{self.z}/{self.x}/{self.y}"

    @property
    def center(self) -> tuple[float, float]:
        return tile_center(self.z, self.x, self.y)


def near(tile: TileKey, other: TileKey) -> bool:
    """Whether ``other`` (at any zoom) overlaps the 3x3 neighbourhood of ``tile``."""
    z, x, y = tile
    oz, ox, oy = other
    f = 2.0 ** (z - oz)  # ``other``'s size in tiles of ``tile``'s zoom
    gap_x = max(0.0, ox * f - (x + 1), x - (ox + 1) * f)
    gap_y = max(0.0, oy * f - (y + 1), y - (oy + 1) * f)
    return gap_x <= 0.0 and gap_y <= 0.0


def distance_ratio(matches: Sequence[Match], without: TileKey | None = None) -> float:
    """Descriptor distance to the best match over that to the best match outside its
    neighbourhood (1.0 where there is none). ``without``: leave out the matches near
    that tile first, as if the index did not hold the place (the self-test's stand-in
    for a view from outside the cache)."""
    kept = (m for m in matches if without is None or not near(without, (m.z, m.x, m.y)))
    best = next(kept, None)
    if best is None:
        return 1.0
    other = next((m for m in kept if not near((best.z, best.x, best.y), (m.z, m.x, m.y))), None)
    if other is None:
        return 1.0
    d_best = np.sqrt(max(0.0, 2.0 - 2.0 * best.score))  # unit vectors: |a - b|^2 = 2 - 2 a.b
    d_other = np.sqrt(max(0.0, 2.0 - 2.0 * other.score))
    return 1.0 if d_other <= 0.0 else float(min(1.0, d_best / d_other))


@dataclass(frozen=True)
class Confidence:
    """The rule that says how sure an answer is, from its :func:`distance_ratio`:
    ``confident`` up to ``confident_below``, ``outside`` from ``outside_above`` on,
    ``ambiguous`` between. Calibrated by the self-test (:func:`selftest.calibrate`)."""

    confident_below: float
    outside_above: float

    def of(self, ratio: float) -> str:
        if ratio >= self.outside_above:
            return OUTSIDE
        return CONFIDENT if ratio <= self.confident_below else AMBIGUOUS

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": "distance_ratio",
            "depth": CONFIDENCE_DEPTH,
            "confident_below": round(self.confident_below, 4),
            "outside_above": round(self.outside_above, 4),
        }

    @classmethod
    def from_signed(cls, signed: Any) -> Confidence | None:
        """The rule a manifest's ``self_test.confidence`` records; None where it has none."""
        if not isinstance(signed, dict) or signed.get("rule") != "distance_ratio":
            return None
        try:
            return cls(float(signed["confident_below"]), float(signed["outside_above"]))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Location:
    """What one image shows: top-k tiles, the position estimates, how sure (None: the
    cache records no calibration, built without a self-test) and the query's time."""

    image: str
    matches: tuple[Match, ...]
    best: tuple[float, float]  # (lat, lon) of the best tile's centre
    weighted: tuple[float, float]  # score-weighted estimate, see estimate_position
    seconds: float
    ratio: float = 1.0  # see distance_ratio
    confidence: str | None = None
    # The registered fix (register.py); None where the view did not register, or the
    # cache has no local features: the answer is then the retrieval's, best and weighted.
    position: Registration | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "matches": [{"tile": m.zxy, "score": round(m.score, 6)} for m in self.matches],
            "position": self.position.to_json() if self.position is not None else None,
            "registered": self.position is not None,
            "best": {"lat": round(self.best[0], 7), "lon": round(self.best[1], 7)},
            "weighted": {"lat": round(self.weighted[0], 7), "lon": round(self.weighted[1], 7)},
            "confidence": self.confidence,
            "distance_ratio": round(self.ratio, 4),
            "seconds": round(self.seconds, 6),
        }


def estimate_position(matches: Sequence[Match]) -> tuple[float, float]:
    """Score-weighted mean of the tile centres at the best tile's zoom, within one tile of it.

    Tiles further away are other places that look alike, not a refinement of
    this one, so they are left out; negative scores weigh nothing.
    """
    if not matches:
        raise ValueError("no matches to estimate a position from")
    best = matches[0]
    near = [
        m for m in matches if m.z == best.z and abs(m.x - best.x) <= 1 and abs(m.y - best.y) <= 1
    ]
    weights = np.array([max(m.score, 0.0) for m in near], dtype=np.float64)
    if weights.sum() <= 0.0:
        return best.center
    fx = float(np.dot(weights, [m.x + 0.5 for m in near]) / weights.sum())
    fy = float(np.dot(weights, [m.y + 0.5 for m in near]) / weights.sum())
    # Averaged in tile coordinates (Web Mercator), where neighbours are equally spaced.
    return fractional_tile_to_latlon(fx, fy, best.z)


class Localizer:
    """An open place-recognition engine and index: uint8 pixels in, ranked tiles out."""

    def __init__(
        self,
        runner: Runner,
        spec: InputSpec,
        index: Any,
        tiles: Sequence[TileKey],
        *,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        if int(index.ntotal) != len(tiles):
            raise DescriptorError(
                f"index holds {index.ntotal} rows but the tile map {len(tiles)} tiles"
            )
        self.runner = runner
        self.spec = spec
        self.index = index
        self.tiles = tuple(tiles)
        self._batch_size = batch_size
        self._normalize = Normalizer.for_spec(spec)

    def empty_pixels(self, n: int) -> np.ndarray:
        """A (n, size, size, channels) uint8 buffer to decode ``n`` images into."""
        spec = self.spec
        return np.empty((n, spec.size, spec.size, spec.channels), dtype=np.uint8)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Unit descriptors of decoded images, in batches spread over the engine's streams."""
        n = len(pixels)
        spans = [(a, min(n, a + self._batch_size)) for a in range(0, n, self._batch_size)]

        def run(span: tuple[int, int]) -> np.ndarray:
            return self.runner.run(self._normalize(pixels[span[0] : span[1]]))

        workers = min(self.runner.streams, len(spans))
        if workers <= 1:
            parts = [run(span) for span in spans]
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="locate") as pool:
                parts = list(pool.map(run, spans))
        vectors = l2_normalize(np.concatenate(parts)) if parts else np.empty((0, 0), np.float32)
        check_vectors(vectors, n)
        return vectors

    def search(self, vectors: np.ndarray, k: int) -> list[tuple[Match, ...]]:
        """The top-``k`` tiles of each descriptor, best first."""
        k = max(1, min(k, len(self.tiles)))
        scores, rows = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        out = []
        for row_scores, row_ids in zip(scores.tolist(), rows.tolist(), strict=True):
            out.append(
                tuple(
                    Match(self.tiles[i][0], self.tiles[i][1], self.tiles[i][2], float(s))
                    for s, i in zip(row_scores, row_ids, strict=True)
                    if i >= 0
                )
            )
        return out

    def query(self, pixels: np.ndarray, k: int = DEFAULT_K) -> list[tuple[Match, ...]]:
        return self.search(self.embed(pixels), k)


def read_image(path: Path, spec: InputSpec, out: np.ndarray) -> None:
    """Decode the image file ``path`` into ``out`` (size, size, channels) as the build does.

    A square image takes the build's own path (:func:`preprocess.decode_into`);
    any other is centre-cropped to a square first, since tiles are square and
    squeezing a 4:3 photo would distort every shape in it. Only a regular file of
    at most :data:`MAX_IMAGE_BYTES` is read, and its size is checked against
    :data:`MAX_IMAGE_PIXELS` from its header before any pixel is decoded.
    """
    try:
        data = read_regular(path, MAX_IMAGE_BYTES)
    except OSError as exc:
        raise ImageError(f"image {path}: cannot be read: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ImageError(f"image {path}: cannot be read: {exc}") from None
    size = header_size(data)
    if size is None:
        raise ImageError(f"image {path}: not a JPEG, PNG or WebP image")
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"image {path}: {size[0]}x{size[1]} px is more than {MAX_IMAGE_PIXELS:,} pixels"
        )
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        if image.format not in IMAGE_FORMATS:
            raise ImageError(f"image {path}: {image.format} is not a JPEG, PNG or WebP image")
        if image.width == image.height:
            decode_into(data, spec, out)
        else:
            _decode_cropped(image, spec, out)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"image {path}: not a JPEG, PNG or WebP image") from exc
    except (OSError, ValueError, SyntaxError, DecompressionBombError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"image {path}: cannot be decoded: {text[:80]}") from exc


def _decode_cropped(image: Image.Image, spec: InputSpec, out: np.ndarray) -> None:
    image_into(image, spec, out, crop_square=True)


# --------------------------------------------------------------------------- opening a cache
def _only(artifacts: list[Artifact], kind: str, where: str) -> Artifact:
    found = [a for a in artifacts if a.kind == kind]
    if len(found) != 1:
        raise DescriptorError(f"cache: {where} has {len(found)} {kind} artifacts, expected 1")
    return found[0]


def _spec_from_fields(engine: Artifact) -> tuple[InputSpec, str] | None:
    raw, output = engine.fields.get("input"), engine.fields.get("output")
    if not isinstance(raw, dict) or not isinstance(output, str):
        return None
    try:
        spec = InputSpec(
            str(raw["name"]),
            int(raw["size"]),
            int(raw["channels"]),
            tuple(float(v) for v in raw["mean"]),
            tuple(float(v) for v in raw["std"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DescriptorError(f"cache: {engine.path}: unreadable input spec: {exc}") from exc
    return spec, output


def _spec_from_backbones(path: Path, name: str) -> tuple[InputSpec, str]:
    try:
        backbones = load_backbones(path)
    except BackboneError as exc:
        raise DescriptorError(f"cache: the input spec of {name!r} is unknown: {exc}") from exc
    found = [b for b in backbones if b.name == name and b.role == PLACE_RECOGNITION]
    if not found or found[0].output is None:
        raise DescriptorError(f"cache: {path} has no place_recognition backbone {name!r}")
    return found[0].image, found[0].output


def _engine_input(
    manifest: Manifest, engine: Artifact, index: Artifact, backbones: Path | None
) -> tuple[InputSpec, str]:
    """The engine's input spec and output name, checked against the signed descriptor key.

    Mean, std and size live in the backbones file, not in the engine: a manifest
    that records them on the engine artifact is used as it is; else the
    backbones file (given, or the one the request named). Either way the spec
    must reproduce the index's signed descriptor key, so a locate with another
    preprocessing than the build's is refused instead of silently wrong.
    """
    found = _spec_from_fields(engine)
    if found is None:
        path = backbones
        if path is None:
            named = manifest.signed.get("request", {}).get("backbones")
            if not isinstance(named, str):
                raise DescriptorError("cache: the manifest names no backbones file; pass one")
            path = Path(named)
        found = _spec_from_backbones(path, str(engine.fields.get("backbone")))
    spec, output = found
    engine_key = str(engine.fields.get("engine_key"))
    fingerprint = str(manifest.signed.get("corpus", {}).get("fingerprint"))
    if descriptor_key(descriptor_space(engine_key, spec), fingerprint) != index.fields.get(
        "descriptor_key"
    ):
        raise DescriptorError(
            f"cache: the input spec of {engine.fields.get('backbone')!r} ({spec.size} px,"
            f" mean {list(spec.mean)}, std {list(spec.std)}) is not the one its index was"
            " built with"
        )
    return spec, output


def read_tile_map(path: Path) -> tuple[TileKey, ...]:
    """The row → tile map written beside the index."""
    try:
        doc = json.loads(path.read_bytes())
        if doc.get("format") != TILE_MAP_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        rows = tuple((int(z), int(x), int(y)) for z, x, y in doc["rows"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DescriptorError(f"cache: tile map {path} cannot be read: {exc}") from exc
    return rows


def open_localizer(
    cache_root: Path, manifest: Manifest, *, backbones: Path | None = None
) -> Localizer:
    """Open the place-recognition engine and index that ``manifest`` (already verified) lists."""
    artifacts = manifest.artifacts
    index_art = _only(artifacts, "faiss_index", "the manifest")
    engines = [
        a
        for a in artifacts
        if a.kind == "engine" and a.fields.get("engine_key") == index_art.fields.get("engine_key")
    ]
    if len(engines) != 1:
        raise DescriptorError("cache: no engine artifact matches the index's engine key")
    engine = engines[0]
    spec, output = _engine_input(manifest, engine, index_art, backbones)
    name = str(engine.fields.get("backbone"))
    backbone = Backbone(
        name, PLACE_RECOGNITION, cache_root / engine.path, engine.sha256, spec, output
    )
    backend = get_backend(str(engine.fields.get("backend")))
    runner = backend.load(cache_root / engine.path, backbone, output)
    try:
        index = read_index(cache_root / index_art.path)
    except RuntimeError as exc:  # faiss reports unreadable files as RuntimeError
        raise DescriptorError(f"cache: index {index_art.path} cannot be read: {exc}") from exc
    tile_map = index_art.fields.get("tile_map")
    tiles = read_tile_map(cache_root / str(tile_map))
    if int(index.d) != index_art.fields.get("dimension"):
        raise DescriptorError(
            f"cache: index dimension {index.d} != recorded {index_art.fields.get('dimension')}"
        )
    return Localizer(runner, spec, index, tiles)


def locate(
    cache_root: Path,
    images: Sequence[Path],
    trusted: list[TrustedKey],
    *,
    k: int = DEFAULT_K,
    backbones: Path | None = None,
    register_views: bool = True,
) -> list[Location]:
    """Verify the cache, then locate each image in it (one query per image, timed).

    ``register_views``: register each image on its top places' local features (a fix
    in metres) where the cache has them; False answers from retrieval alone.

    Every image is checked to be a regular file before any work (a FIFO or a
    device is refused, :class:`ImageError`, without being opened), then each is
    decoded and queried in turn: memory holds one image's pixels, however many
    are given. An unverifiable cache raises :class:`VerificationError` before any
    image is read.
    """
    for path in images:
        if problem := kind_problem(path, "file"):
            raise ImageError(f"image {path}: cannot be read: {problem}")
    manifest = verify_cache(cache_root, trusted)
    localizer = open_localizer(cache_root.resolve(), manifest, backbones=backbones)
    pixels = localizer.empty_pixels(1)
    # A cache with local features registers each image on its top k places (register.py).
    opened = (
        open_features(cache_root.resolve(), manifest, backbones=backbones)
        if register_views
        else None
    )
    # Its matcher, where it has one, pairs the view's features with a place's.
    matcher = open_matcher(cache_root.resolve(), manifest) if opened is not None else None
    test = manifest.signed.get("self_test")
    rule = Confidence.from_signed(test.get("confidence") if isinstance(test, dict) else None)
    out = []
    for path in images:
        t0 = time.perf_counter()
        read_image(path, localizer.spec, pixels[0])
        (deep,) = localizer.query(pixels, max(k, CONFIDENCE_DEPTH))
        matches = deep[:k]
        best, weighted = matches[0].center, estimate_position(matches)
        ratio = distance_ratio(deep)
        seconds = time.perf_counter() - t0
        confidence = rule.of(ratio) if rule is not None else None
        fix = None
        if opened is not None:
            extractor, features = opened
            view = np.empty((extractor.size, extractor.size, 3), dtype=np.uint8)
            read_image(path, InputSpec("view", extractor.size, 3, (0.0,) * 3, (1.0,) * 3), view)
            ranked = [(m.z, m.x, m.y) for m in deep]
            fix, _ = register(extractor.view(view), ranked, features, places=k, matcher=matcher)
            seconds = time.perf_counter() - t0
        out.append(Location(str(path), matches, best, weighted, seconds, ratio, confidence, fix))
    return out
