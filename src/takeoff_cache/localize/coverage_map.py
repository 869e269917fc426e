"""The coverage map: a PNG of the area, its tiles, the flight and the self-test.

Drawn in Web Mercator (the tiles' own projection, so tiles are squares and
north is up) with Pillow alone: the selected tiles per zoom level, tiles the
area needs that the corpus lacks, the area's outline (bbox or GeoJSON
polygon), each self-test view as a hit (green dot) or a miss (red cross, with
a line to where it was placed), a legend, a scale bar and a north arrow.

With a route, the flight is drawn over the rest: the path, its waypoints and
takeoff, the tiles missing under it in a colour of their own (magenta: a hole
there blinds the drone), and its weak stretches (the self-test's weakest, in
orange). The views are then drawn small and translucent beneath the route, so
a map of many misses still shows where the drone flies.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from takeoff_cache.core.fsutil import atomic_write_bytes
from takeoff_cache.core.tilemath import lonlat_to_fractional_tile, tile_range
from takeoff_cache.errors import InvalidRequestError
from takeoff_cache.localize.selftest import QueryOutcome
from takeoff_cache.tiles.route import Route

TileKey = tuple[int, int, int]
Ring = list[tuple[float, float]]  # (lat, lon) points

# Colour per zoom level, coarsest first (colour-blind-safe Okabe-Ito hues).
ZOOM_COLOURS = [(0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233)]
MISSING_COLOUR = (90, 90, 90)
HIT_COLOUR = (0, 150, 60)
MISS_COLOUR = (213, 40, 40)
AREA_COLOUR = (20, 20, 20)
ROUTE_COLOUR = (25, 25, 112)
ROUTE_HOLE_COLOUR = (220, 0, 140)
WEAK_COLOUR = (240, 120, 0)
_MAP_PX = 900
_PANEL_PX = 320
_TITLE_PX = 56
_FOOT_PX = 64
_PAD = 24
# Metres per Web Mercator unit at the equator (the width of the world / 1).
_WORLD_M = 2.0 * math.pi * 6378137.0


def needed_tiles(
    bbox: tuple[float, float, float, float],
    zoom_levels: Iterable[int],
    *,
    area: dict[str, Any] | None = None,
) -> list[TileKey]:
    """Every tile the request needs at ``zoom_levels``, as select takes them: those
    intersecting ``area`` when there is one (tiles/area.py), else ``bbox``'s range."""
    if area is not None:
        from takeoff_cache.tiles.area import (
            tiles_for_area,  # shapely loads only for requests with an area
        )

        return tiles_for_area(area, zoom_levels)
    out = []
    for z in sorted(set(zoom_levels)):
        x0, x1, y0, y1 = tile_range(bbox, z)
        out += [(z, x, y) for x in range(x0, x1 + 1) for y in range(y0, y1 + 1)]
    return out


def missing_tiles(
    bbox: tuple[float, float, float, float],
    zoom_levels: Iterable[int],
    present: Iterable[TileKey],
    *,
    area: dict[str, Any] | None = None,
) -> list[TileKey]:
    """Tiles the request needs at ``zoom_levels`` (:func:`needed_tiles`) not in ``present``."""
    have = set(present)
    return [t for t in needed_tiles(bbox, zoom_levels, area=area) if t not in have]


def area_rings(geojson: dict[str, Any]) -> list[Ring]:
    """Outer and inner rings of a GeoJSON Polygon or MultiPolygon (or a Feature of one)."""
    kind = geojson.get("type")
    if kind == "FeatureCollection":
        return [r for f in geojson.get("features", []) for r in area_rings(f)]
    if kind == "Feature":
        return area_rings(geojson.get("geometry") or {})
    if kind not in ("Polygon", "MultiPolygon"):
        raise InvalidRequestError(f"area: a Polygon or MultiPolygon is needed, got {kind!r}")
    try:
        coords = geojson["coordinates"]
        polygons = [coords] if kind == "Polygon" else list(coords)
        return [[(float(p[1]), float(p[0])) for p in ring] for poly in polygons for ring in poly]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InvalidRequestError(f"area: unreadable {kind} coordinates") from exc


class _Frame:
    """Latitude/longitude → pixel on the map, through Web Mercator at zoom ``z_ref``."""

    def __init__(self, bounds: tuple[float, float, float, float], z_ref: int) -> None:
        lat_min, lon_min, lat_max, lon_max = bounds
        self.z = z_ref
        x0, y0 = lonlat_to_fractional_tile(lat_max, lon_min, z_ref)
        x1, y1 = lonlat_to_fractional_tile(lat_min, lon_max, z_ref)
        # A margin of 4% on every side, and the longer side fills the map.
        span = max(x1 - x0, y1 - y0) * 1.08 or 1.0
        self.cx, self.cy = (x0 + x1) / 2, (y0 + y1) / 2
        self.px_per_unit = (_MAP_PX - 2 * _PAD) / span
        self.width = round((x1 - x0) * 1.08 * self.px_per_unit) + 2 * _PAD
        self.height = round((y1 - y0) * 1.08 * self.px_per_unit) + 2 * _PAD
        self.lat = (lat_min + lat_max) / 2

    def xy(self, lat: float, lon: float) -> tuple[float, float]:
        fx, fy = lonlat_to_fractional_tile(lat, lon, self.z)
        return self.tile_xy(fx, fy, self.z)

    def tile_xy(self, fx: float, fy: float, z: int) -> tuple[float, float]:
        f = 2.0 ** (self.z - z)
        return (
            self.width / 2 + (fx * f - self.cx) * self.px_per_unit,
            self.height / 2 + (fy * f - self.cy) * self.px_per_unit,
        )

    def metres_per_px(self) -> float:
        unit_m = _WORLD_M / 2.0**self.z * math.cos(math.radians(self.lat))
        return unit_m / self.px_per_unit


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _bounds(
    bbox: tuple[float, float, float, float], rings: Sequence[Ring], queries: Sequence[QueryOutcome]
) -> tuple[float, float, float, float]:
    lats = [bbox[0], bbox[2]] + [p[0] for r in rings for p in r]
    lons = [bbox[1], bbox[3]] + [p[1] for r in rings for p in r]
    for q in queries:
        lats += [q.true[0], q.estimate[0]]
        lons += [q.true[1], q.estimate[1]]
    return min(lats), min(lons), max(lats), max(lons)


def _nice_length(max_m: float) -> float:
    """The largest 1, 2 or 5 x 10^n metres not above ``max_m``."""
    exp = 10.0 ** math.floor(math.log10(max_m))
    return max(m * exp for m in (1, 2, 5) if m * exp <= max_m)


def _draw_tiles(draw: ImageDraw.ImageDraw, frame: _Frame, tiles: Sequence[TileKey]) -> list[int]:
    """Each zoom's tiles: light fills first, then outlines from the finest zoom to the
    coarsest, thicker, so a coarse tile stays visible over its children."""
    zooms = sorted({t[0] for t in tiles})

    def boxes(z: int) -> Iterable[tuple[float, float, float, float]]:
        for _, x, y in (t for t in tiles if t[0] == z):
            yield (*frame.tile_xy(x, y, z), *frame.tile_xy(x + 1, y + 1, z))

    for i, z in enumerate(zooms):
        colour = ZOOM_COLOURS[i % len(ZOOM_COLOURS)]
        for box in boxes(z):
            draw.rectangle(box, fill=(*colour, 34))
    for i in reversed(range(len(zooms))):
        colour = ZOOM_COLOURS[i % len(ZOOM_COLOURS)]
        width = 1 + 2 * (len(zooms) - 1 - i)
        for box in boxes(zooms[i]):
            draw.rectangle(box, outline=(*colour, 230), width=width)
    return zooms


def _draw_missing(draw: ImageDraw.ImageDraw, frame: _Frame, missing: Sequence[TileKey]) -> None:
    for z, x, y in missing:
        x0, y0 = frame.tile_xy(x, y, z)
        x1, y1 = frame.tile_xy(x + 1, y + 1, z)
        draw.rectangle((x0, y0, x1, y1), fill=(*MISSING_COLOUR, 150), outline=(0, 0, 0, 255))
        draw.line((x0, y0, x1, y1), fill=(0, 0, 0, 200), width=1)
        draw.line((x0, y1, x1, y0), fill=(0, 0, 0, 200), width=1)


def _draw_queries(
    draw: ImageDraw.ImageDraw, frame: _Frame, queries: Sequence[QueryOutcome], small: bool = False
) -> None:
    """Hits and misses; ``small``: under a route, small and translucent, so that many
    misses (each with its line to where it was placed) do not hide the flight."""
    r, cross, alpha = (2.5, 3.0, 150) if small else (4.0, 5.0, 255)
    for q in queries:
        tx, ty = frame.xy(*q.true)
        ex, ey = frame.xy(*q.estimate)
        if q.hit:
            outline = None if small else (255, 255, 255)
            draw.ellipse(
                (tx - r, ty - r, tx + r, ty + r), fill=(*HIT_COLOUR, alpha), outline=outline
            )
            continue
        draw.line((tx, ty, ex, ey), fill=(*MISS_COLOUR, 60 if small else 110), width=1)
        draw.ellipse((ex - 2, ey - 2, ex + 2, ey + 2), fill=(*MISS_COLOUR, alpha // 2 + 20))
        for sx, sy in ((1, 1), (1, -1)):
            draw.line(
                (tx - cross * sx, ty - cross * sy, tx + cross * sx, ty + cross * sy),
                fill=(*MISS_COLOUR, alpha),
                width=2 if small else 3,
            )


def _draw_route_holes(draw: ImageDraw.ImageDraw, frame: _Frame, holes: Sequence[TileKey]) -> None:
    for z, x, y in holes:
        x0, y0 = frame.tile_xy(x, y, z)
        x1, y1 = frame.tile_xy(x + 1, y + 1, z)
        draw.rectangle(
            (x0, y0, x1, y1),
            fill=(*ROUTE_HOLE_COLOUR, 150),
            outline=(*ROUTE_HOLE_COLOUR, 255),
            width=3,
        )


def _stretch(route: Route, from_km: float, to_km: float) -> list[tuple[float, float]]:
    """The route's positions from ``from_km`` to ``to_km``, every 10 m or so."""
    spacing = max(10.0, route.length_km * 1000.0 / 2000.0)
    return [(p.lat, p.lon) for p in route.sample(spacing) if from_km <= p.km <= to_km]


def _draw_route(
    draw: ImageDraw.ImageDraw,
    frame: _Frame,
    route: Route,
    weak: Sequence[tuple[float, float]],
) -> None:
    """The path (white-edged, so it reads over any tile), its weak stretches, its
    waypoints, and takeoff as a square."""
    line = [frame.xy(p[0], p[1]) for p in route.points]
    if len(line) > 1:
        draw.line(line, fill=(255, 255, 255, 255), width=7, joint="curve")
        draw.line(line, fill=(*ROUTE_COLOUR, 255), width=3, joint="curve")
    for from_km, to_km in weak:
        part = [frame.xy(*p) for p in _stretch(route, from_km, to_km)]
        if len(part) > 1:
            draw.line(part, fill=(*WEAK_COLOUR, 235), width=7, joint="curve")
    for x, y in line[1:]:
        draw.ellipse(
            (x - 4, y - 4, x + 4, y + 4), fill=(255, 255, 255), outline=ROUTE_COLOUR, width=2
        )
    hx, hy = line[0]
    draw.rectangle(
        (hx - 7, hy - 7, hx + 7, hy + 7), fill=ROUTE_COLOUR, outline=(255, 255, 255), width=2
    )
    draw.text((hx + 10, hy - 8), "takeoff", fill=ROUTE_COLOUR, font=_font(15))


def _draw_north(draw: ImageDraw.ImageDraw, x: float, y: float) -> None:
    draw.polygon([(x, y), (x - 12, y + 34), (x, y + 26), (x + 12, y + 34)], fill=(20, 20, 20))
    draw.text((x, y + 38), "N", fill=(20, 20, 20), font=_font(20), anchor="mt")


def _draw_scale(draw: ImageDraw.ImageDraw, frame: _Frame, x: float, y: float) -> None:
    metres = _nice_length(frame.metres_per_px() * frame.width / 3)
    length = metres / frame.metres_per_px()
    half = length / 2
    draw.rectangle((x, y, x + half, y + 8), fill=(20, 20, 20))
    draw.rectangle((x + half, y, x + length, y + 8), fill=(255, 255, 255), outline=(20, 20, 20))
    label = f"{metres / 1000:g} km" if metres >= 1000 else f"{metres:g} m"
    font = _font(16)
    draw.text((x, y + 12), "0", fill=(20, 20, 20), font=font, anchor="mt")
    draw.text((x + length, y + 12), label, fill=(20, 20, 20), font=font, anchor="mt")


def _draw_legend(
    draw: ImageDraw.ImageDraw,
    x: float,
    y: float,
    zooms: Sequence[int],
    counts: dict[int, int],
    missing: int,
    queries: Sequence[QueryOutcome],
    outline: str,
    route: Route | None = None,
    route_holes: int = 0,
    weak: int = 0,
) -> None:
    font, head = _font(17), _font(19)
    draw.text((x, y), "Legend", fill=(20, 20, 20), font=head)
    y += 34
    for i, z in enumerate(zooms):
        colour = ZOOM_COLOURS[i % len(ZOOM_COLOURS)]
        draw.rectangle((x, y, x + 22, y + 16), fill=(*colour, 90), outline=colour, width=2)
        draw.text((x + 32, y), f"zoom {z}: {counts[z]} tiles", fill=(20, 20, 20), font=font)
        y += 28
    draw.rectangle((x, y, x + 22, y + 16), fill=(*MISSING_COLOUR, 150), outline=(0, 0, 0))
    draw.text((x + 32, y), f"missing from corpus: {missing}", fill=(20, 20, 20), font=font)
    y += 28
    draw.line((x, y + 8, x + 22, y + 8), fill=AREA_COLOUR, width=3)
    draw.text((x + 32, y), outline, fill=(20, 20, 20), font=font)
    y += 40
    if route is not None:
        draw.text((x, y), f"Flight: {route.length_km:.1f} km", fill=(20, 20, 20), font=head)
        y += 32
        draw.line((x, y + 8, x + 22, y + 8), fill=ROUTE_COLOUR, width=3)
        draw.text((x + 32, y), "route and waypoints", fill=(20, 20, 20), font=font)
        y += 28
        draw.rectangle((x + 4, y + 1, x + 18, y + 15), fill=ROUTE_COLOUR)
        draw.text((x + 32, y), "takeoff", fill=(20, 20, 20), font=font)
        y += 28
        draw.rectangle(
            (x, y, x + 22, y + 16),
            fill=(*ROUTE_HOLE_COLOUR, 150),
            outline=ROUTE_HOLE_COLOUR,
            width=2,
        )
        draw.text(
            (x + 32, y), f"missing under the route: {route_holes}", fill=(20, 20, 20), font=font
        )
        y += 28
        if weak:
            draw.line((x, y + 8, x + 22, y + 8), fill=WEAK_COLOUR, width=7)
            draw.text((x + 32, y), "weakest stretch (self-test)", fill=(20, 20, 20), font=font)
            y += 28
        y += 12
    if not queries:
        return
    hits = sum(q.hit for q in queries)
    draw.text((x, y), f"Self-test: {len(queries)} views", fill=(20, 20, 20), font=head)
    y += 32
    draw.ellipse((x + 5, y + 2, x + 17, y + 14), fill=HIT_COLOUR)
    draw.text((x + 32, y), f"hit at rank 1: {hits}", fill=(20, 20, 20), font=font)
    y += 28
    draw.line((x + 4, y + 2, x + 18, y + 16), fill=MISS_COLOUR, width=3)
    draw.line((x + 4, y + 16, x + 18, y + 2), fill=MISS_COLOUR, width=3)
    draw.text((x + 32, y), f"miss: {len(queries) - hits}", fill=(20, 20, 20), font=font)
    y += 28
    draw.line((x, y + 8, x + 22, y + 8), fill=MISS_COLOUR, width=1)
    draw.text((x + 32, y), "to where it was placed", fill=(20, 20, 20), font=font)


def coverage_map_png(
    *,
    bbox: tuple[float, float, float, float],
    tiles: Sequence[TileKey],
    missing: Sequence[TileKey] = (),
    area: dict[str, Any] | None = None,
    queries: Sequence[QueryOutcome] = (),
    title: str = "takeoff cache coverage",
    subtitle: str = "",
    route: Route | None = None,
    route_holes: Sequence[TileKey] = (),
    weak: Sequence[tuple[float, float]] = (),
) -> bytes:
    """The coverage map as PNG bytes (``bbox``: lat_min, lon_min, lat_max, lon_max).

    ``route``: the flight, drawn over the rest; ``route_holes``: tiles missing under
    it; ``weak``: stretches of it, ``(from_km, to_km)``, that localized poorly."""
    rings = area_rings(area) if area is not None else []
    all_tiles = [*tiles, *missing, *route_holes]
    z_ref = max((t[0] for t in all_tiles), default=16)
    flown = [(p[0], p[1]) for p in route.points] if route is not None else []
    frame = _Frame(_bounds(bbox, [*rings, flown], queries), z_ref)
    layer = Image.new("RGBA", (frame.width, frame.height), (246, 246, 242, 255))
    overlay = Image.new("RGBA", layer.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    zooms = _draw_tiles(draw, frame, tiles)
    _draw_missing(draw, frame, missing)
    if rings:
        for ring in rings:
            draw.line([frame.xy(*p) for p in ring], fill=AREA_COLOUR, width=3)
    else:
        lat_min, lon_min, lat_max, lon_max = bbox
        x0, y0 = frame.xy(lat_max, lon_min)
        x1, y1 = frame.xy(lat_min, lon_max)
        draw.rectangle((x0, y0, x1, y1), outline=AREA_COLOUR, width=3)
    _draw_route_holes(draw, frame, route_holes)
    _draw_queries(draw, frame, queries, small=route is not None)
    if route is not None:
        _draw_route(draw, frame, route, weak)
    layer = Image.alpha_composite(layer, overlay)

    width = frame.width + _PANEL_PX
    # Room for the legend, which lists the flight too when there is one.
    height = max(frame.height, 420 if route is None else 580) + _TITLE_PX + _FOOT_PX
    canvas = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    canvas.paste(layer, (0, _TITLE_PX))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, _TITLE_PX, frame.width - 1, _TITLE_PX + frame.height - 1), outline=(0, 0, 0))
    draw.text((_PAD, 10), title, fill=(20, 20, 20), font=_font(24))
    if subtitle:
        draw.text((_PAD, 38), subtitle, fill=(80, 80, 80), font=_font(14))
    counts = {z: sum(1 for t in tiles if t[0] == z) for z in zooms}
    outline = "area (polygon)" if rings else "area (bbox)"
    _draw_legend(
        draw,
        frame.width + _PAD,
        _TITLE_PX + 70,
        zooms,
        counts,
        len(missing),
        queries,
        outline,
        route,
        len(route_holes),
        len(weak),
    )
    _draw_north(draw, frame.width + _PANEL_PX - 50, _TITLE_PX + 8)
    _draw_scale(draw, frame, _PAD, _TITLE_PX + frame.height + 18)
    draw.text(
        (width - _PAD, height - 14),
        "Web Mercator, north up",
        fill=(110, 110, 110),
        font=_font(13),
        anchor="rs",
    )
    buf = io.BytesIO()
    canvas.convert("RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def short_path(path: Path, width: int = 60) -> str:
    """``path`` for a title: its end, where the names that tell caches apart are."""
    text = str(path)
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def write_coverage_map(path: Path, **layers: Any) -> Path:
    """Write :func:`coverage_map_png` to ``path`` atomically; return ``path``."""
    atomic_write_bytes(path, coverage_map_png(**layers))
    return path
