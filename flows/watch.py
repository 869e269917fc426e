"""The watch-corpus flow: on a schedule, ask for a rebuild when a cache's corpus changed.

It fingerprints the tiles the request selects and compares with the
fingerprint in the cache's current verified manifest. On a difference it
emits ``takeoff-cache.corpus.changed``; the ``build-cache`` deployment's
trigger (deployments/prefect.yaml) turns that event into a build run with the
parameters the event carries. No difference, or no verified manifest yet
(the first build is the operator's call), emits nothing.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger
from takeoff_cache_prefect.tasks import watch as t

from takeoff_cache.build.request import FIELDS, parse_request
from takeoff_cache_prefect.results import json_parameters


@json_parameters
@flow(name="watch-corpus", validate_parameters=False, persist_result=False, log_prints=False)
def watch_corpus(
    corpus: str | None = None,
    bbox: list[float] | str | None = None,
    zoom_levels: list[int] | str | None = None,
    sector_class: str | None = None,
    backbones: str | None = None,
    precision: str = "fp32",
    calibration: str | None = None,
    cache_root: str | None = None,
    key: str | None = None,
    trust: str | None = None,
    takeoff_origin: list[float] | str | None = None,
    flight_id: str | None = None,
    area: dict[str, Any] | str | None = None,
    route: dict[str, Any] | str | None = None,
    work_dir: str | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """Check one cache's corpus; emit the corpus-changed event when it differs from the build."""
    params = dict(locals())
    request = parse_request({name: params[name] for name in FIELDS})
    check = t.check_corpus(request)
    logger = get_run_logger()
    result: dict[str, Any] = {
        "cache_root": str(request.cache_root),
        "changed": check.changed,
        "fingerprint": check.fingerprint,
        "tile_count": check.tile_count,
        "built_fingerprint": check.built_fingerprint,
        "manifest_version": check.manifest_version,
        "event_id": None,
    }
    if not check.has_manifest:
        logger.warning(
            "%s has no manifest that verifies; run build-cache for it first",
            request.cache_root,
        )
        return result
    if not check.changed:
        logger.info(
            "corpus unchanged for %s (%d tiles, fingerprint %s)",
            request.cache_root,
            check.tile_count,
            check.fingerprint[:12],
        )
        return result
    # Resolved paths: the triggered build may start in another working directory.
    build_parameters = {
        **request.to_json(),
        "work_dir": os.path.abspath(os.path.expanduser(work_dir)) if work_dir else None,
        "backend": backend,
    }
    result["event_id"] = t.announce_change(request, check, build_parameters)
    logger.info(
        "corpus changed for %s: fingerprint %s -> %s (%s -> %d tiles); build requested",
        request.cache_root,
        (check.built_fingerprint or "?")[:12],
        check.fingerprint[:12],
        check.built_tile_count,
        check.tile_count,
    )
    return result
