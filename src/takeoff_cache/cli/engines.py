"""``takeoff-cache compile-engines`` and ``calibrate``: engines and their INT8
calibration, made in the work folder without building a cache."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from takeoff_cache.cli.args import raw_request, request_args
from takeoff_cache.errors import InvalidRequestError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("compile-engines", help="compile or reuse engines in the work folder only")
    request_args(p, with_options=False)
    p.set_defaults(func=cmd_compile_engines)

    p = sub.add_parser("calibrate", help="sample corpus tiles into an INT8 calibration file")
    request_args(p, with_options=False)
    p.add_argument("--out", type=Path, required=True, help="calibration file to write (.npz)")
    p.add_argument("--tiles", type=int, default=128, help="how many tiles to sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the tile sample (default: 0)")
    p.set_defaults(func=cmd_calibrate)


def _partial_request(args: argparse.Namespace, fillers: dict[str, str]) -> Any:
    """A request for commands that need only some fields; the rest get inert fillers."""
    from takeoff_cache.build.request import parse_request

    raw = raw_request(args)
    for name, filler in fillers.items():
        raw.setdefault(name, filler)
    return parse_request(raw)


_NO_AREA = {"bbox": "0,0,1,1", "zoom_levels": "0", "corpus": "."}
_NO_TARGET = {"sector_class": "stable_rear", "cache_root": ".", "key": ".", "trust": "."}


def cmd_compile_engines(args: argparse.Namespace) -> int:
    from takeoff_cache.build.validate import check_engine_inputs
    from takeoff_cache.core.workdir import resolve_work_dir
    from takeoff_cache.engines.store import ensure_engine

    # Only what engines need: no corpus, no cache root, no key, no lock.
    request = _partial_request(args, {**_NO_AREA, **_NO_TARGET})
    backbones, calibration_sha, backend = check_engine_inputs(request, args.backend or "auto")
    work = resolve_work_dir(args.work_dir)
    for backbone in backbones:
        record = ensure_engine(
            backbone, backend, request.precision, request.calibration, calibration_sha, work
        )
        print(f"{'built ' if record.built else 'reused'} {backbone.name}: {record.store_path}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from takeoff_cache.build.validate import check_corpus
    from takeoff_cache.engines.calibration import write_calibration
    from takeoff_cache.tiles.corpus import select_tiles

    request = _partial_request(
        args, {**_NO_TARGET, "backbones": ".", "precision": "fp32", "calibration": ""}
    )
    if args.tiles < 1:
        raise InvalidRequestError(f"tiles: {args.tiles} must be at least 1")
    if not args.out.parent.is_dir():
        raise InvalidRequestError(f"out: folder {args.out.parent} does not exist")
    check_corpus(request.corpus)
    selection = select_tiles(
        request.corpus, request.bbox.as_tuple(), request.zoom_levels, request.area
    )
    count = write_calibration(args.out, selection, request.corpus, args.tiles, args.seed)
    print(f"wrote {args.out}: {count} calibration tiles sampled from {len(selection.tiles)}")
    return 0
