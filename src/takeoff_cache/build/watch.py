"""The corpus watcher's check: has the corpus under a cache changed since its last build?

The cache's current manifest records the corpus fingerprint its descriptors
were computed from. Selecting the request's tiles again and comparing
fingerprints tells whether a rebuild would see different tiles. Only a
manifest that verifies with a trusted key counts: an unsigned or damaged
manifest says nothing reliable about what was built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from takeoff_cache.build import noop
from takeoff_cache.build.request import BuildRequest
from takeoff_cache.tiles import corpus
from takeoff_cache.trust.keys import TrustedKey, load_trust_store


@dataclass(frozen=True)
class CorpusCheck:
    cache_root: Path
    fingerprint: str  # of the tiles the request selects now
    tile_count: int
    built_fingerprint: str | None  # recorded in the current verified manifest
    built_tile_count: int | None
    manifest_version: int | None  # None: no manifest that verifies

    @property
    def has_manifest(self) -> bool:
        return self.manifest_version is not None

    @property
    def changed(self) -> bool:
        """A verified manifest exists and was built from different tiles."""
        return self.has_manifest and self.fingerprint != self.built_fingerprint


def check_corpus(
    request: BuildRequest, trusted: list[TrustedKey] | tuple[TrustedKey, ...] | None = None
) -> CorpusCheck:
    """Fingerprint the request's tiles and compare with the cache's verified manifest.

    ``trusted`` defaults to the request's trust store. Reads only; never takes
    the build lock, so a running build does not delay the check.
    """
    keys = tuple(trusted) if trusted is not None else tuple(load_trust_store(request.trust))
    selection = corpus.select_tiles(
        request.corpus, request.bbox.as_tuple(), request.zoom_levels, request.area
    )
    manifest = noop.current_manifest(request.cache_root, keys)
    built = manifest.signed.get("corpus", {}) if manifest is not None else {}
    return CorpusCheck(
        cache_root=request.cache_root,
        fingerprint=selection.fingerprint,
        tile_count=len(selection.tiles),
        built_fingerprint=built.get("fingerprint"),
        built_tile_count=built.get("tile_count"),
        manifest_version=manifest.version if manifest is not None else None,
    )
