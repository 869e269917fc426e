"""What ``prepare`` checks before its first request and before Prefect starts.

Everything a run will need that can be checked without the flight or its tiles:
the build request's fields (every problem at once), the tile source's template
and its key in the environment, where the flight comes from, and, when the build
runs on this machine, the cache root, backbones, signing key and trust store. A
request with three mistakes is answered with three lines, in well under a
second, having made no request to any server. (A flights API's token is not
required: an open API needs none.)

The fields the flight decides (area, bbox, takeoff origin) and the corpus, which
the download fills, are checked later, by the build's own validate phase.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from takeoff_cache.build.request import parse_fields
from takeoff_cache.build.validate import check_inputs
from takeoff_cache.core.fsutil import kind_problem
from takeoff_cache.errors import InvalidRequestError, Problems
from takeoff_cache.prepare import DEFAULT_ZOOMS
from takeoff_cache.prepare.tileserver import TileSource

# Decided by the flight (area, bbox, takeoff origin) or filled by the download (corpus).
PENDING = ("area", "bbox", "takeoff_origin", "corpus")
# A build on a companion uses the companion's cache root and key (--companion-*).
COMPANION_DECIDES = ("cache_root", "key")


def precheck(
    raw: dict[str, Any],
    job: dict[str, Any],
    *,
    companion: bool,
    pool: bool,
    backend: str,
    work_dir: Path | None,
) -> None:
    """Raise one error naming every problem found; return when there is none.

    ``raw``: the build request's fields; ``job``: the resolve phase's parameters
    (``JOB_PARAMETERS``, or any mapping holding them). Where the build runs decides
    what is this machine's to check: everything, when it runs here; on a companion
    over SSH (built there by SSH or by a work pool's worker), the backbones sent
    there and the workstation's trust store (the companion's manifest is checked
    with it), its cache root and key being the companion's; through a work pool
    alone, the fields only (paths are the worker's).
    """
    problems = Problems()
    pending = PENDING + (COMPANION_DECIDES if companion else ())
    raw = {"zoom_levels": list(DEFAULT_ZOOMS), **raw}
    fields = parse_fields(raw, problems, pending=pending)
    if not companion and not pool:
        check_inputs(fields, problems, backend, work_dir)
    elif companion and "backbones" in fields:
        with problems.check():
            if problem := kind_problem(fields["backbones"], "file"):
                raise InvalidRequestError(f"backbones: {fields['backbones']} {problem}")
        if "trust" in fields:
            from takeoff_cache.companion.session import workstation_trust  # SSH's code

            with problems.check():
                workstation_trust(fields["trust"])
    if job.get("tiles_url"):
        with problems.check():
            TileSource(
                job["tiles_url"],
                key_header=job.get("tiles_key_header") or None,
                key_param=job.get("tiles_key_param") or None,
            ).api_key()
    if job.get("plan") is None and job.get("flight") is None:
        with problems.check():
            _check_flights_api(job.get("flights_api"), job.get("flight_id"))
    problems.raise_any()


def _check_flights_api(url: str | None, flight_id: str | None) -> None:
    if not (url and flight_id):
        raise InvalidRequestError(
            "prepare: give --plan FILE, or --flight-id UUID and --flights-api URL"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequestError(f"flights API: {url!r} is not an http(s) URL")
