"""The cache's features file: every selected tile's local features, in one file.

Layout: ``TCFEATS1`` and a newline, a 4-byte little-endian header length, the
header (UTF-8 JSON: the format, the extractor, and per tile ``[z, x, y]`` with
the byte span of its features), then each tile's features as the feature store
packs them (:func:`.store.pack`), in tile order. A tile whose bytes could not
be decoded has no features (a span of zero bytes). The file is listed and
signed in the manifest like any artifact, so ``verify`` refuses it changed.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from takeoff_cache.core.fsutil import atomic_output
from takeoff_cache.errors import DescriptorError
from takeoff_cache.features.extract import MAX_KEYPOINTS, Features
from takeoff_cache.features.store import FeatureStore, unpack

MAGIC = b"TCFEATS1\n"
FORMAT = "takeoff-cache-features"
FORMAT_VERSION = 1
_LENGTH = struct.Struct("<I")
# Tiles read from the store per query while the file is written.
_CHUNK = 1024

TileKey = tuple[int, int, int]
Row = TypeVar("Row")


@dataclass(frozen=True)
class FeaturesFile:
    """A written features file and what the manifest records of it."""

    path: str
    sha256: str
    size: int
    tiles: int
    keypoints: int  # over every tile
    dimension: int  # descriptor bytes per keypoint


def write_features(
    path: Path,
    tiles: Sequence[tuple[TileKey, str]],
    store: FeatureStore,
    space: str,
    extractor: dict[str, Any],
) -> FeaturesFile:
    """Write the features of ``tiles`` ((z, x, y), SHA-256) from ``store`` to ``path``.

    Every tile's features must be stored (a tile the build found bad is refused
    before this); the file is written beside ``path`` and renamed over it.
    """
    # Two passes over the store, a chunk at a time: the sizes first, each row checked to
    # unpack (the header, which comes first, holds every span), then the rows as stored
    # (what pack() writes), hashed as they are written; never the whole file in memory.
    spans, at, keypoints, dimension = [], 0, 0, 0
    for chunk, stored in _chunks(tiles, store.packed, space):
        for key, sha in chunk:
            row = stored.get(sha)
            if row is None:
                raise DescriptorError(
                    f"features: tile {key[0]}/{key[1]}/{key[2]} has no stored features"
                )
            blob, count, width = row
            spans.append([at, len(blob)])
            at += len(blob)
            keypoints += count
            if count:
                dimension = width
    header = json.dumps(
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "extractor": extractor,
            "max_keypoints": MAX_KEYPOINTS,
            "tiles": [[*key, *span] for (key, _), span in zip(tiles, spans, strict=True)],
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_output(path, point="features.file", read_only=True) as tmp, tmp.open("wb") as fh:
        head = MAGIC + _LENGTH.pack(len(header)) + header
        fh.write(head)
        digest.update(head)
        size = len(head)
        for (chunk, rows), start in zip(
            _chunks(tiles, store.raw, space), range(0, len(tiles), _CHUNK), strict=True
        ):
            for i, (_, sha) in enumerate(chunk):
                data = rows.get(sha)
                if data is None or len(data) != spans[start + i][1]:
                    raise DescriptorError("features: the feature store changed while written")
                fh.write(data)
                digest.update(data)
                size += len(data)
    return FeaturesFile(str(path), digest.hexdigest(), size, len(tiles), keypoints, dimension)


def _chunks(
    tiles: Sequence[tuple[TileKey, str]],
    read: Callable[[str, Sequence[str]], dict[str, Row]],
    space: str,
) -> Iterator[tuple[Sequence[tuple[TileKey, str]], dict[str, Row]]]:
    """``tiles`` a chunk at a time, with what ``read`` gives of their rows."""
    for start in range(0, len(tiles), _CHUNK):
        chunk = tiles[start : start + _CHUNK]
        yield chunk, read(space, [sha for _, sha in chunk])


class FeatureSet:
    """A features file, read once: each tile's features by (z, x, y)."""

    def __init__(self, path: Path) -> None:
        # Mapped, not read: a corpus's features are far more than one view needs.
        try:
            with path.open("rb") as fh:
                data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise DescriptorError(f"cache: features file {path} cannot be read: {exc}") from exc
        try:
            if data[: len(MAGIC)] != MAGIC:
                raise ValueError("not a features file")
            (length,) = _LENGTH.unpack_from(data, len(MAGIC))
            body = len(MAGIC) + _LENGTH.size + length
            header = json.loads(data[len(MAGIC) + _LENGTH.size : body])
            if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
                raise ValueError(f"format {header.get('format')!r} {header.get('version')!r}")
            self.extractor: dict[str, Any] = dict(header["extractor"])
            self._spans: dict[TileKey, tuple[int, int]] = {
                (int(z), int(x), int(y)): (body + int(at), int(n))
                for z, x, y, at, n in header["tiles"]
            }
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            data.close()
            raise DescriptorError(f"cache: features file {path} cannot be read: {exc}") from exc
        self._data = data
        self._cache: dict[TileKey, Features | None] = {}

    def __len__(self) -> int:
        return len(self._spans)

    def __contains__(self, tile: TileKey) -> bool:
        return tile in self._spans

    def of(self, tile: TileKey) -> Features | None:
        """The features of ``tile``; None where the file holds none."""
        if tile not in self._cache:
            span = self._spans.get(tile)
            found = None
            if span is not None:
                at, n = span
                found = unpack(self._data[at : at + n])
            self._cache[tile] = found if found is not None and len(found) else None
        return self._cache[tile]
