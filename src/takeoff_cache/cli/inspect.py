"""``takeoff-cache inspect``: a cache's manifest summarized, and its coverage map
drawn, without verifying it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from takeoff_cache.cli.args import printable
from takeoff_cache.errors import InvalidRequestError, TakeoffCacheError, VerificationError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="summarize a cache's manifest (does not verify)")
    p.add_argument("cache_root", type=Path, help="the cache folder to summarize")
    p.add_argument(
        "--png",
        type=Path,
        metavar="FILE",
        help="also draw its coverage map there: area, tiles, self-test hits and misses",
    )
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        lines = _inspect(args.cache_root, args.png)
    except TakeoffCacheError as exc:
        problems = exc.problems if isinstance(exc, VerificationError) else [str(exc)]
        for problem in problems:
            print(f"takeoff-cache: inspect: {printable(problem)}", file=sys.stderr)
        return exc.exit_code
    print("\n".join(printable(line) for line in lines))
    return 0


def _inspect(cache_root: Path, png: Path | None = None) -> list[str]:
    """The summary of a cache's manifest, read as ``verify`` reads it (one reader, one
    parser); with ``png``, its coverage map drawn there too."""
    import stat

    from takeoff_cache.trust.cachefiles import read_manifest
    from takeoff_cache.trust.manifest import parse_manifest_bytes

    try:
        if not stat.S_ISDIR(cache_root.stat().st_mode):
            raise InvalidRequestError(f"{cache_root} is a file, not a folder")
    except FileNotFoundError:
        raise InvalidRequestError(f"{cache_root} does not exist") from None
    except OSError as exc:
        raise InvalidRequestError(f"{cache_root} cannot be read: {exc.strerror}") from None
    data = read_manifest(cache_root)
    manifest = parse_manifest_bytes(data)
    signed = manifest.signed
    request, corpus = _object(signed.get("request")), _object(signed.get("corpus"))
    lines = [
        f"cache:          {cache_root}",
        f"version:        {signed['version']}  created {signed['created_at']}"
        f"  expires {signed.get('expires_at') or 'never'}",
        f"build identity: {signed['build_identity']}",
        f"area:           bbox {_shown(request.get('bbox'))}"
        f" zoom {_shown(request.get('zoom_levels'))} sector {_shown(request.get('sector_class'))}",
        f"corpus:         {_shown(corpus.get('tile_count'))} tiles,"
        f" fingerprint {_shown(corpus.get('fingerprint'))[:16]}",
        f"host:           {_shown(signed.get('host'))}",
        "artifacts:",
        *(f"  {a.kind[:12]:12} {a.size:>12,}  {a.path}" for a in manifest.artifacts),
        "signatures:     " + ", ".join(keyid[:16] for keyid in manifest.keyids),
    ]
    test = _object(signed.get("self_test"))
    if test:
        lines.append(f"self-test:      {_self_test_text(test)}")
    if png is not None:
        _inspect_png(cache_root, manifest, png)
        lines.append(f"coverage map:   {png}")
    lines.append("(inspect does not verify; run 'takeoff-cache verify')")
    return lines


def _inspect_png(cache_root: Path, manifest: Any, png: Path) -> None:
    """The coverage map of a cache: its area, the tiles of its tile map, the tiles the
    area needs that the corpus lacked, and each signed self-test query as a hit or miss."""
    from takeoff_cache.build.request import parse_route_field
    from takeoff_cache.localize.coverage_map import missing_tiles, short_path, write_coverage_map
    from takeoff_cache.localize.locate import read_tile_map
    from takeoff_cache.localize.selftest import queries_from_signed

    if not png.parent.is_dir():
        raise InvalidRequestError(f"png: folder {png.parent} does not exist")
    signed = manifest.signed
    request = _object(signed.get("request"))
    try:
        lat_min, lon_min, lat_max, lon_max = (float(v) for v in request["bbox"])
        zooms = [int(z) for z in request["zoom_levels"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise VerificationError(f"request: unreadable bbox or zoom levels ({exc})") from None
    maps = [a for a in manifest.artifacts if a.kind == "tile_map"]
    if len(maps) != 1:
        raise VerificationError(f"the manifest lists {len(maps)} tile maps, expected 1")
    tiles = read_tile_map(cache_root / maps[0].path)
    bbox = (lat_min, lon_min, lat_max, lon_max)
    area = request.get("area") if isinstance(request.get("area"), dict) else None
    test = _object(signed.get("self_test"))
    subtitle = f"signed self-test: {_self_test_text(test)}" if test else "no self-test recorded"
    ready = _object(signed.get("ready"))
    weakest = _object(_object(ready.get("localization")).get("weakest"))
    try:
        route = parse_route_field(request.get("route") or None)
        weak = [(float(weakest["from_km"]), float(weakest["to_km"]))] if weakest else []
    except (InvalidRequestError, KeyError, TypeError, ValueError) as exc:
        raise VerificationError(
            f"request: unreadable route or its weakest stretch ({exc})"
        ) from None
    write_coverage_map(
        png,
        bbox=bbox,
        tiles=tiles,
        missing=missing_tiles(bbox, zooms, tiles, area=area),
        area=area,
        queries=queries_from_signed(test.get("queries")),
        title=f"takeoff cache at {short_path(cache_root.resolve())}, version {signed['version']}",
        subtitle=printable(subtitle),
        route=route,
        route_holes=_route_holes(_object(ready.get("route")).get("holes")),
        weak=weak,
    )


def _route_holes(listed: Any) -> list[tuple[int, int, int]]:
    """The route's holes the signed verdict names (``{"tile": "z/x/y", "km": ...}``)."""
    out = []
    for hole in listed if isinstance(listed, list) else []:
        parts = str(_object(hole).get("tile", "")).split("/")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            out.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return out


def _self_test_text(test: dict[str, Any]) -> str:
    return (
        f"Recall@1 {_shown(test.get('recall_at_1'))}, Recall@5 {_shown(test.get('recall_at_5'))},"
        f" median error {_shown(test.get('median_error_m'))} m over {_shown(test.get('k'))} views"
    )


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _shown(value: Any) -> str:
    """A value read from a manifest, as JSON text; a string as itself."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True)
    except (ValueError, RecursionError):
        return "(not showable)"
