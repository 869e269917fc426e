"""Pre-flight preparation (SPEC §10): a flight to the tiles its area needs.

The phases before the build, each a plain function the command line and the
``prepare-flight`` flow call in the same order: resolve the flight, compute
its area and tiles, take the workstation lock, fetch what the corpus lacks
(or say what it lacks), write the area beside the corpus. Secrets are read
from the environment where they are used (``download``, ``flight``), so no
value here, nor any report, ever holds them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from filelock import FileLock, Timeout

from .area import DEFAULT_BUFFER_M, Area, flight_area, tiles_for_area
from .download import DownloadOptions, download_tiles, estimate_download, missing_tiles
from .errors import CacheIOError, InvalidRequestError, LockHeldError, TooManyTilesError
from .flight import Flight, fetch_flight, load_flight
from .fsutil import atomic_write_bytes
from .mbtiles import Coord
from .tileserver import TileSource

DEFAULT_ZOOMS = (16, 17)
_SHOWN_MISSING = 20


@dataclass(frozen=True)
class MissionArea:
    """A flight's area and the tiles of it at the zoom levels."""

    area: Area
    zoom_levels: tuple[int, ...]
    tiles: tuple[Coord, ...]

    def to_json(self) -> dict[str, Any]:
        per_zoom: dict[str, int] = {}
        for z, _, _ in self.tiles:
            per_zoom[str(z)] = per_zoom.get(str(z), 0) + 1
        return {
            "km2": round(self.area.km2, 4),
            "bbox": list(self.area.bbox),
            "zoom_levels": list(self.zoom_levels),
            "tiles": len(self.tiles),
            "tiles_per_zoom": per_zoom,
        }


def resolve_flight(plan: Path | None, flight_id: str | None, flights_api: str | None) -> Flight:
    """The flight from a plan file, or from the flights API by id (token from the env)."""
    if plan is not None:
        return load_flight(plan)
    if flight_id and flights_api:
        return fetch_flight(flights_api, flight_id)
    raise InvalidRequestError(
        "prepare: give --plan FILE, or --flight-id UUID and --flights-api URL"
    )


def mission_area(
    flight: Flight, zoom_levels: tuple[int, ...], buffer_m: float = DEFAULT_BUFFER_M
) -> MissionArea:
    area = flight_area(flight, buffer_m)
    return MissionArea(area, zoom_levels, tuple(tiles_for_area(area.geojson, zoom_levels)))


def flight_summary(flight: Flight) -> dict[str, Any]:
    return {
        "id": flight.id,
        "source": flight.source,
        "takeoff_origin": takeoff_origin(flight),
        "positions": len(flight.positions),
        "corridors": len(flight.corridors),
        "polygons": len(flight.polygons),
        "circles": len(flight.circles),
        "points": len(flight.points),
    }


def tile_source(
    template: str, key_header: str | None = None, key_param: str | None = None
) -> TileSource:
    return TileSource(template, key_header=key_header or None, key_param=key_param or None)


def default_corpus(work: Path, template: str | None) -> Path:
    """One MBTiles per tile source in the work folder, shared by every flight."""
    host = urlsplit(template).netloc if template else ""
    slug = re.sub(r"[^a-z0-9]+", "-", host.lower()).strip("-") or "tiles"
    return work / "tiles" / f"{slug}.mbtiles"


@contextmanager
def workstation_lock(work: Path) -> Iterator[Path]:
    """One ``prepare`` per work folder at a time (a kernel ``flock``; refused at once)."""
    path = work / "prepare.lock"
    lock = FileLock(
        str(path),
        timeout=0,
        thread_local=False,
        is_singleton=False,
        fallback_to_soft=False,
        preserve_lock_file=True,
    )
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise LockHeldError(f"lock: another prepare holds {path}; wait for it to finish") from None
    except OSError as exc:
        raise CacheIOError(f"lock: cannot open {path}: {exc.strerror}") from exc
    try:
        yield path
    finally:
        lock.release()


def check_job_size(corpus: Path, mission: MissionArea, options: DownloadOptions) -> int:
    """Refuse a download larger than ``max_tiles`` before any lock, request or write."""
    to_fetch = estimate_download(corpus, mission.tiles, options).to_fetch
    if to_fetch > options.max_tiles:
        raise TooManyTilesError(
            f"download: {to_fetch:,} tiles to fetch, more than max_tiles {options.max_tiles:,};"
            " narrow the area (--buffer-m) or the zoom levels, or raise --max-tiles"
        )
    return to_fetch


def dry_run(corpus: Path, mission: MissionArea, options: DownloadOptions) -> dict[str, Any]:
    """What a download would fetch: tiles per zoom and estimated bytes; nothing written."""
    estimate = estimate_download(corpus, mission.tiles, options)
    return {
        "dry_run": True,
        "to_fetch": estimate.to_fetch,
        "per_zoom": {str(z): n for z, n in estimate.per_zoom.items()},
        "missing": estimate.missing,
        "stale": estimate.stale,
        "kept": estimate.kept,
        "estimated_bytes": estimate.estimated_bytes,
        "over_max_tiles": estimate.to_fetch > options.max_tiles,
    }


def fetch_tiles(
    corpus: Path,
    mission: MissionArea,
    source: TileSource | None,
    options: DownloadOptions,
) -> dict[str, Any]:
    """Download the area's missing tiles; without a source, list what is missing."""
    if source is None:
        missing = missing_tiles(corpus, mission.tiles)
        return {
            "source": None,
            "missing": len(missing),
            "missing_tiles": [f"{z}/{x}/{y}" for z, x, y in missing[:_SHOWN_MISSING]],
        }
    corpus.parent.mkdir(parents=True, exist_ok=True)
    result = download_tiles(corpus, mission.tiles, source, options)
    return {"source": urlsplit(source.url_template).netloc, **result.to_json()}


def write_area(work: Path, flight: Flight, mission: MissionArea) -> Path:
    """The area as a GeoJSON Feature in the work folder: what the build's ``--area`` reads."""
    name = flight.id or Path(flight.source).stem or "flight"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "flight"
    path = work / "areas" / f"{slug}.geojson"
    feature = {
        "type": "Feature",
        "properties": {"flight_id": flight.id, "km2": round(mission.area.km2, 4)},
        "geometry": mission.area.geojson,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(feature).encode(), point="prepare.area")
    return path


def build_raw(
    raw: dict[str, Any], flight: Flight, mission: MissionArea, corpus: Path
) -> dict[str, Any]:
    """The build request: the operator's fields, with what the flight decides."""
    return {
        **raw,
        "corpus": str(corpus),
        "area": mission.area.geojson,
        "bbox": list(mission.area.bbox),
        "zoom_levels": list(mission.zoom_levels),
        "flight_id": flight.id,
        "takeoff_origin": takeoff_origin(flight),
    }


def takeoff_origin(flight: Flight) -> list[float]:
    """``[lat, lon, alt]``: a plan without an altitude for home takes off at 0 m."""
    lat, lon, *alt = flight.takeoff_origin
    return [lat, lon, alt[0] if alt else 0.0]
