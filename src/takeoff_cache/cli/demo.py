"""``takeoff-cache demo-data`` and ``demo``: synthetic inputs, and a build and
verify of them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from takeoff_cache.cli.args import raw_request
from takeoff_cache.cli.build import EXIT_FAILURE, build_or_noop
from takeoff_cache.errors import InvalidRequestError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo-data", help="generate demo inputs")
    p.add_argument("dir", type=Path, help="folder to write them to (created if missing)")
    _demo_args(p)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo", help="generate demo inputs, build, verify, print the report")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("takeoff-cache-demo"),
        help="folder for the demo inputs, cache and work folder (default: %(default)s)",
    )
    _demo_args(p)
    p.add_argument(
        "--work-dir", dest="work_dir", default=None, help="work folder (default: WORKDIR/work)"
    )
    p.add_argument(
        "--backend", default="auto", help="engine backend: auto, onnxruntime or tensorrt"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's run logs")
    p.set_defaults(func=cmd_demo)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from takeoff_cache.demo import make_demo_data

    if not 1 <= args.tiles <= 1_000_000:
        raise InvalidRequestError(f"tiles: {args.tiles} is outside [1, 1000000]")
    inputs = make_demo_data(args.dir, tiles=args.tiles, seed=args.seed, force=args.force)
    print(
        f"demo inputs in {inputs.root}: {inputs.tile_count} tiles; build with:\n"
        f"  takeoff-cache build --request {inputs.request}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from takeoff_cache.build.report import BuildReport
    from takeoff_cache.build.request import FIELDS
    from takeoff_cache.demo import make_demo_data
    from takeoff_cache.trust.keys import load_trust_store
    from takeoff_cache.trust.verify import verify_cache

    if not 1 <= args.tiles <= 1_000_000:
        raise InvalidRequestError(f"tiles: {args.tiles} is outside [1, 1000000]")
    inputs = make_demo_data(args.workdir, tiles=args.tiles, seed=args.seed, force=args.force)
    print(f"demo inputs: {inputs.root} ({inputs.tile_count} tiles)", file=sys.stderr)
    args.request = inputs.request
    args.work_dir = args.work_dir or str(inputs.root / "work")
    for name in FIELDS:  # the demo request file says it all
        setattr(args, name, None)
    args.coverage, args.expires_in_s = "strict", None
    report = BuildReport.from_json(build_or_noop(raw_request(args), args))
    print(report.text())
    if report.outcome == "failure":
        print(f"takeoff-cache: build failed: {report.failure_reason}", file=sys.stderr)
        return EXIT_FAILURE
    cache_root = inputs.root / "cache"
    manifest = verify_cache(cache_root, load_trust_store(inputs.trust))
    print(
        f"verify:                ok (manifest version {manifest.version},"
        f" {len(manifest.artifacts)} artifacts) — {cache_root}"
    )
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiles", type=int, default=320, help="corpus size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of all demo data (default: 0)")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty folder not made by demo-data;"
        " files and folders it did not write are never replaced",
    )
