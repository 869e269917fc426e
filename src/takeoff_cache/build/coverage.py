"""Coverage, of two kinds.

**Tile coverage** (:func:`tile_coverage`, SPEC §11): per zoom level, the tiles
the area needs, those the selection holds, and the holes by ``z/x/y``; and
separately the tiles under the route, buffered by a camera footprint, where a
hole blinds the drone, each hole named with where it falls along the route.

**File coverage**, the coverage phase: nothing may fly that the new manifest
does not vouch for. Files only the previous manifest lists are accounted for
(commit deletes them), and so is whatever stands at a path the new manifest
lists (commit renames the new file over it: a symlink there is replaced, never
followed); any other file, or anything else that is not a regular file, is a
violation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from takeoff_cache.core.layout import walk_cache
from takeoff_cache.core.tilemath import tile_center
from takeoff_cache.errors import CoverageError
from takeoff_cache.tiles.route import Route

_SHOWN = 20

TileKey = tuple[int, int, int]

# The ground either side of the route a hole there blinds the drone over: a nadir
# camera with a 90-degree field of view sees 150 m either side from 150 m above
# the ground, the low end of a fixed-wing's cruise and a multirotor's survey height.
DEFAULT_FOOTPRINT_M = 150.0
# Holes listed by name in the JSON (and so in the signed manifest); the count is always whole.
MAX_LISTED_HOLES = 500


def tile_name(tile: TileKey) -> str:
    return "/".join(str(v) for v in tile)


@dataclass(frozen=True)
class ZoomCoverage:
    """One zoom level: how many tiles are needed, how many are held, and which are not."""

    zoom: int
    needed: int
    present: int
    holes: tuple[TileKey, ...]

    @property
    def fraction(self) -> float:
        return self.present / self.needed if self.needed else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "needed": self.needed,
            "present": self.present,
            "fraction": round(self.fraction, 4),
            "holes_count": len(self.holes),
            "holes": [tile_name(t) for t in self.holes[:MAX_LISTED_HOLES]],
        }


@dataclass(frozen=True)
class RouteHole:
    """A tile under the route the selection lacks, and the km from takeoff it falls at."""

    tile: TileKey
    km: float

    def to_json(self) -> dict[str, Any]:
        return {"tile": tile_name(self.tile), "km": round(self.km, 2)}


@dataclass(frozen=True)
class RouteCoverage:
    length_km: float
    footprint_m: float
    per_zoom: tuple[ZoomCoverage, ...]
    holes: tuple[RouteHole, ...]  # by km along the route
    # Tiles within the footprint of the route that lie outside the area (or bbox).
    outside_area: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "length_km": round(self.length_km, 3),
            "footprint_m": self.footprint_m,
            "outside_area": self.outside_area,
            "tiles": sum(z.needed for z in self.per_zoom),
            "present": sum(z.present for z in self.per_zoom),
            "per_zoom": {str(z.zoom): z.to_json() for z in self.per_zoom},
            "holes_count": len(self.holes),
            "holes": [h.to_json() for h in self.holes[:MAX_LISTED_HOLES]],
        }


@dataclass(frozen=True)
class TileCoverage:
    """The area's coverage per zoom, and the route's when the request has one."""

    per_zoom: tuple[ZoomCoverage, ...]
    route: RouteCoverage | None

    @property
    def needed(self) -> int:
        return sum(z.needed for z in self.per_zoom)

    @property
    def present(self) -> int:
        return sum(z.present for z in self.per_zoom)

    def to_json(self) -> dict[str, Any]:
        return {
            "needed": self.needed,
            "present": self.present,
            "fraction": round(self.present / self.needed, 4) if self.needed else 1.0,
            "per_zoom": {str(z.zoom): z.to_json() for z in self.per_zoom},
        }


def _per_zoom(
    zoom_levels: Iterable[int], needed: Iterable[TileKey], have: set[TileKey]
) -> tuple[ZoomCoverage, ...]:
    by_zoom: dict[int, list[TileKey]] = {z: [] for z in sorted(set(zoom_levels))}
    for t in needed:
        by_zoom.setdefault(t[0], []).append(t)
    out = []
    for z, tiles in sorted(by_zoom.items()):
        holes = tuple(sorted(t for t in tiles if t not in have))
        out.append(ZoomCoverage(z, len(tiles), len(tiles) - len(holes), holes))
    return tuple(out)


def tile_coverage(
    bbox: tuple[float, float, float, float],
    zoom_levels: Iterable[int],
    present: Iterable[TileKey],
    *,
    area: dict[str, Any] | None = None,
    route: Route | None = None,
    footprint_m: float = DEFAULT_FOOTPRINT_M,
) -> TileCoverage:
    """What the request needs (its area's tiles, else its bbox's, listed as select lists
    them) against what ``present`` holds; with a ``route``, the tiles within
    ``footprint_m`` of it, each missing one with its km from takeoff."""
    from takeoff_cache.localize.coverage_map import needed_tiles  # Pillow: builds with work

    zooms = sorted(set(zoom_levels))
    have = set(present)
    needed = needed_tiles(bbox, zooms, area=area)
    area_cov = _per_zoom(zooms, needed, have)
    if route is None:
        return TileCoverage(area_cov, None)
    from takeoff_cache.tiles.area import tiles_for_area  # shapely: routes only

    # The route's tiles within the area: the area is the operator's (prepare's
    # --buffer-m); ground the camera sees beyond it is counted, not required.
    wanted = set(needed)
    under = tiles_for_area(route.corridor(footprint_m), zooms)
    route_cov = _per_zoom(zooms, [t for t in under if t in wanted], have)
    holes = [RouteHole(t, route.km_of(*tile_center(*t))) for z in route_cov for t in z.holes]
    holes.sort(key=lambda h: (h.km, h.tile))
    outside = sum(t not in wanted for t in under)
    return TileCoverage(
        area_cov, RouteCoverage(route.length_km, footprint_m, route_cov, tuple(holes), outside)
    )


def check_coverage(cache_root: Path, new_paths: set[str], old_paths: set[str]) -> list[str]:
    """Return the offending paths (empty when covered)."""
    entries = walk_cache(cache_root)
    unlisted = [p for p in entries.files if p not in new_paths and p not in old_paths]
    strange = [f"{p} (not a regular file)" for p in entries.others if p not in new_paths]
    return sorted(unlisted + strange)


def enforce(cache_root: Path, offending: list[str]) -> None:
    if offending:
        shown = ", ".join(offending[:_SHOWN])
        more = f" and {len(offending) - _SHOWN} more" if len(offending) > _SHOWN else ""
        raise CoverageError(
            f"coverage: {len(offending)} file(s) in {cache_root} are not listed in the manifest:"
            f" {shown}{more}; remove them or build with --coverage lenient",
            offending,
        )
