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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from takeoff_cache.build.lock import ExclusiveLock
from takeoff_cache.build.request import BuildRequest, parse_request, parse_zoom_levels
from takeoff_cache.core.fsutil import atomic_write_bytes
from takeoff_cache.core.workdir import (
    areas_dir,
    corpus_lock_path,
    default_corpus_path,
    default_work_dir,
    resolve_work_dir,
    tiles_dir,
)
from takeoff_cache.errors import CacheIOError, CorpusError, InvalidRequestError, TooManyTilesError
from takeoff_cache.prepare import DEFAULT_ZOOMS
from takeoff_cache.prepare.area import check_tile_budget, flight_area
from takeoff_cache.prepare.download import (
    DownloadOptions,
    DownloadProgress,
    download_tiles,
    estimate_download,
    missing_tiles,
)
from takeoff_cache.prepare.flight import Flight, parse_flight_json
from takeoff_cache.prepare.httpbody import user_agent
from takeoff_cache.prepare.sources import fetch_flight, load_flight
from takeoff_cache.prepare.tileserver import TileSource
from takeoff_cache.tiles.area import DEFAULT_BUFFER_M, Area, tiles_for_area
from takeoff_cache.tiles.corpus import Tile, select_tiles
from takeoff_cache.tiles.mbtiles import Coord
from takeoff_cache.tiles.route import Route
from takeoff_cache.trust.keys import load_trust_store
from takeoff_cache.trust.verify import verify_cache

if TYPE_CHECKING:
    from takeoff_cache.companion.options import CompanionOptions

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
            **({"warnings": list(self.area.warnings)} if self.area.warnings else {}),
        }


@dataclass(frozen=True)
class Job:
    """A resolved prepare: what to fetch, where from, into which corpus."""

    flight: Flight
    mission: MissionArea
    work: Path
    corpus: Path
    source: TileSource | None
    options: DownloadOptions

    def flight_json(self) -> dict[str, Any]:
        """The flight as a flow parameter: resolved once, on the operator's machine."""
        return {**self.flight.to_json(), "source": self.flight.source}


def plan_job(
    *,
    plan: str | Path | None = None,
    flight: dict[str, Any] | None = None,
    flight_id: str | None = None,
    flights_api: str | None = None,
    corpus: str | Path | None = None,
    zoom_levels: Any = None,
    buffer_m: float = DEFAULT_BUFFER_M,
    tiles_url: str | None = None,
    tiles_key_header: str | None = None,
    tiles_key_param: str | None = None,
    max_age_days: float | None = None,
    max_tiles: int = DownloadOptions.max_tiles,
    work_dir: str | Path | None = None,
) -> Job:
    """The resolve phase: the flight (from ``flight``, a plan file or the flights API),
    its area and tiles, the corpus. Nothing is written but the work folder, made last."""
    zooms = parse_zoom_levels(zoom_levels or list(DEFAULT_ZOOMS))
    options = DownloadOptions(max_age_days=max_age_days, max_tiles=max_tiles)
    if tiles_url:
        user_agent()  # a bad TAKEOFF_CACHE_CONTACT is refused before the flight is read
    source = tile_source(tiles_url, tiles_key_header, tiles_key_param) if tiles_url else None
    if flight is not None:
        resolved = parse_flight_json(flight, str(flight.get("source") or "flight"))
    else:
        resolved = resolve_flight(Path(plan) if plan else None, flight_id, flights_api)
    named = Path(work_dir).expanduser().resolve() if work_dir else default_work_dir()
    corpus_path = Path(corpus).expanduser() if corpus else default_corpus(named, tiles_url)
    mission = mission_area(resolved, zooms, buffer_m, max_tiles, corpus_path)
    work = resolve_work_dir(work_dir)
    return Job(resolved, mission, work, corpus_path.absolute(), source, options)


# plan_job's parameters: the flow's and the command line's for the resolve phase.
JOB_PARAMETERS = (
    "plan",
    "flight",
    "flight_id",
    "flights_api",
    "corpus",
    "zoom_levels",
    "buffer_m",
    "tiles_url",
    "tiles_key_header",
    "tiles_key_param",
    "max_age_days",
    "max_tiles",
    "work_dir",
)


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
    flight: Flight,
    zoom_levels: tuple[int, ...],
    buffer_m: float = DEFAULT_BUFFER_M,
    max_tiles: int | None = None,
    corpus: Path | None = None,
) -> MissionArea:
    area = flight_area(flight, buffer_m)
    if max_tiles is not None:  # before a continent's tiles are listed
        check_tile_budget(area, zoom_levels, max_tiles, corpus)
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
    """The work folder's corpus: :func:`default_corpus_path`, the same with or
    without a tile server, so an offline re-run builds from what was downloaded.

    Until it exists, a corpus an older release made (named after its server's
    host and port) stands in: the one of ``template``'s host, or, with no
    template, the only one there is. Several and no template to choose by is an
    input error listing them.
    """
    path = default_corpus_path(work)
    if path.exists():
        return path
    legacy = sorted(p for p in tiles_dir(work).glob("*.mbtiles") if p != path)
    if template:
        # The host and port only: never a user or password written into the URL.
        host = urlsplit(template).netloc.rpartition("@")[2]
        slug = re.sub(r"[^a-z0-9]+", "-", host.lower()).strip("-")
        named = tiles_dir(work) / f"{slug}.mbtiles"
        return named if named in legacy else path
    if len(legacy) == 1:
        return legacy[0]
    if legacy:
        names = ", ".join(p.name for p in legacy)
        raise CorpusError(
            f"corpus: {tiles_dir(work)} holds several corpora ({names}); name one with"
            " --corpus, or give --tiles-url to take its server's"
        )
    return path


def downloads(job: Job) -> bool:
    """Whether the job writes its corpus: a tile source, and tiles to fetch."""
    if job.source is None:
        return False
    return estimate_download(job.corpus, job.mission.tiles, job.options).to_fetch > 0


def workstation_lock(work: Path, corpus: Path) -> ExclusiveLock:
    """One ``prepare`` writing a corpus at a time: its lock, beside the corpus file.

    Keyed on the file (its resolved path), not the work folder: two runs that
    would write one MBTiles meet there whichever work folders they use, and
    flights over other corpora go on side by side. Taken only by runs that
    download (:func:`downloads`): runs that only read a corpus never wait.
    """
    corpus = corpus.expanduser().resolve()
    path = corpus_lock_path(corpus)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheIOError(f"lock: cannot create {path.parent}: {exc.strerror}") from exc
    return ExclusiveLock(path, f"prepare of {corpus}", point="prepare.lock")


@contextmanager
def corpus_lock(job: Job) -> Iterator[tuple[ExclusiveLock, ...]]:
    """The locks a ``prepare`` holds while it runs: the corpus's workstation lock if
    it downloads (:func:`downloads`), else none, so runs that only read one corpus
    for different caches never block each other."""
    if not downloads(job):
        yield ()
        return
    with workstation_lock(job.work, job.corpus).acquire() as lock:
        yield (lock,)


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
    progress: Callable[[DownloadProgress], None] | None = None,
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
    result = download_tiles(corpus, mission.tiles, source, options, progress=progress)
    return {"source": urlsplit(source.url_template).netloc, **result.to_json()}


def write_area(work: Path, flight: Flight, mission: MissionArea) -> Path:
    """The area as a GeoJSON Feature in the work folder: what the build's ``--area`` reads."""
    name = flight.id or Path(flight.source).stem or "flight"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "flight"
    path = areas_dir(work) / f"{slug}.geojson"
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
        "route": flight_route(flight),
    }


def flight_route(flight: Flight) -> dict[str, Any] | None:
    """The route flown, home first, as the request's GeoJSON LineString; None for a flight
    with no path (only polygons, circles, points): its readiness rests on the area."""
    if not flight.positions:
        return None
    home = (flight.planned_home,) if flight.planned_home is not None else ()
    return Route(tuple((*home, *flight.positions))).to_geojson()


def takeoff_origin(flight: Flight) -> list[float]:
    """``[lat, lon, alt]``: a plan without an altitude for home takes off at 0 m."""
    lat, lon, *alt = flight.takeoff_origin
    return [lat, lon, alt[0] if alt else 0.0]


def verify_built(cache_root: Path, trust: Path) -> dict[str, Any]:
    """The verify phase: the cache just built, checked as before takeoff."""
    manifest = verify_cache(cache_root, load_trust_store(trust))
    return {
        "ok": True,
        "version": manifest.version,
        "build_identity": manifest.build_identity,
        "artifacts": len(manifest.artifacts),
    }


def companion_request(
    job: Job, fields: dict[str, Any], companion: CompanionOptions
) -> tuple[BuildRequest, list[Tile]]:
    """The build the companion runs: this request, with the companion's cache root,
    key and trust store, and the area's tiles in the corpus (what is sent)."""
    raw = build_raw(fields, job.flight, job.mission, job.corpus)
    raw.update(cache_root=companion.cache_root, key=companion.key, trust=companion.trust)
    request = parse_request(raw)
    selection = select_tiles(
        request.corpus, request.bbox.as_tuple(), request.zoom_levels, request.area
    )
    return request, list(selection.tiles)
