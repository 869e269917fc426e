"""``takeoff-cache locate``: which tiles of a verified cache an image shows."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from takeoff_cache.cli.args import printable
from takeoff_cache.errors import InvalidRequestError, VerificationError

MAX_K = 100


def add_parser(sub: Any) -> None:
    p = sub.add_parser("locate", help="which tiles of a cache an image shows, and where")
    p.add_argument("cache_root", type=Path, help="the cache folder (verified before any query)")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="JPEG, PNG or WebP")
    p.add_argument(
        "--trust", type=Path, required=True, help="trust store: public key file or folder (PEM)"
    )
    p.add_argument("--k", type=int, default=5, help="tiles to list per image (default: 5)")
    p.add_argument(
        "--backbones",
        type=Path,
        help="backbones TOML, if the manifest's engine lacks its input spec"
        " (default: the one the build used)",
    )
    p.add_argument(
        "--no-register",
        action="store_true",
        help="retrieval only: skip the registered fix on local features (a fix to the"
        " tile, in about a hundredth of the time)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON list of the answers")
    p.set_defaults(func=cmd_locate)


def cmd_locate(args: argparse.Namespace) -> int:
    try:
        return _locate(args)
    except VerificationError as exc:
        for problem in exc.problems:
            print(f"takeoff-cache: locate: {printable(problem)}", file=sys.stderr)
        return exc.exit_code


def _locate(args: argparse.Namespace) -> int:
    from takeoff_cache.localize.locate import locate
    from takeoff_cache.trust.keys import load_trust_store

    if not 1 <= args.k <= MAX_K:
        raise InvalidRequestError(f"k: {args.k} is outside [1, {MAX_K}]")
    trusted = load_trust_store(args.trust)
    found = locate(
        args.cache_root,
        args.images,
        trusted,
        k=args.k,
        backbones=args.backbones,
        register_views=not args.no_register,
    )
    if args.json:
        print(json.dumps([{**loc.to_json(), "ms": round(loc.seconds * 1000, 3)} for loc in found]))
        return 0
    for loc in found:
        print(printable(loc.image))
        for rank, match in enumerate(loc.matches, 1):
            print(f"  {rank:>2}  {match.zxy:<20} score {match.score:.4f}")
        if loc.position is not None:
            fix = loc.position
            print(
                f"  registered fix:     {fix.lat:.7f}, {fix.lon:.7f} ± {fix.sigma_m:.1f} m"
                f" (1 sigma), heading {fix.heading_deg:.0f} deg, {fix.inliers} inliers"
                f" on {fix.zxy}"
            )
        else:
            print("  registered fix:     none (the answer is the retrieval's, below)")
        print(f"  best tile centre:   {loc.best[0]:.6f}, {loc.best[1]:.6f}")
        print(f"  weighted estimate:  {loc.weighted[0]:.6f}, {loc.weighted[1]:.6f}")
        said = loc.confidence or "not calibrated (the cache was built without a self-test)"
        print(f"  confidence:         {said} (distance ratio {loc.ratio:.3f})")
        print(f"  query:              {loc.seconds * 1000:.1f} ms")
    return 0
