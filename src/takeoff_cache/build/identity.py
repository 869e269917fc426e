"""The build identity: a hash of every input that determines the result.

Outputs are never part of it, so it is known before any work is done and a
matching identity in the current manifest means there is nothing to do.
"""

from __future__ import annotations

from typing import Any

from takeoff_cache import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION
from takeoff_cache.build.request import BuildRequest
from takeoff_cache.build.validate import ValidatedRequest
from takeoff_cache.core.canonical import content_key


def build_identity(validated: ValidatedRequest, corpus_fingerprint: str) -> str:
    return identity_of(
        validated.request,
        [b.identity() for b in validated.backbones],
        validated.calibration_sha256,
        validated.host,
        corpus_fingerprint,
    )


def identity_of(
    req: BuildRequest,
    backbones: list[dict[str, Any]],
    calibration_sha256: str | None,
    host: dict[str, Any],
    corpus_fingerprint: str,
) -> str:
    """The identity from its parts: what a workstation computes for a build it hands
    to a companion (whose host identity it was told) to check the manifest it gets."""
    inputs: dict[str, Any] = {
        "manifest_format": [MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION],
        "corpus_fingerprint": corpus_fingerprint,
        "bbox": list(req.bbox.as_tuple()),
        "zoom_levels": list(req.zoom_levels),
        "sector_class": req.sector_class,
        "takeoff_origin": list(req.takeoff_origin) if req.takeoff_origin else None,
        "flight_id": req.flight_id,
        "backbones": backbones,
        "precision": req.precision,
        "calibration_sha256": calibration_sha256,
        "host": host,
    }
    # Only a request with an area hashes one, so caches built before areas existed
    # keep their identity; its geometry counts, never the file it was read from.
    if req.area is not None:
        inputs["area"] = req.area
    # Likewise the route: a build without one keeps the identity it had before routes.
    if req.route is not None:
        inputs["route"] = req.route.to_geojson()
    return content_key(inputs)
