"""``takeoff-cache verify``: the check a cache passes before takeoff."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from takeoff_cache.errors import TakeoffCacheError, VerificationError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("verify", help="verify a cache before takeoff")
    p.add_argument("cache_root", type=Path, help="the cache folder to verify")
    p.add_argument(
        "--trust", type=Path, required=True, help="trust store: public key file or folder (PEM)"
    )
    p.add_argument("--state", type=Path, help="file remembering the highest version seen")
    p.add_argument("--host-check", action="store_true", help="engines must be for this host")
    p.add_argument("--json", action="store_true", help="print the result (or the problems) as JSON")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        return _verify(args)
    except TakeoffCacheError as exc:
        if args.json:
            problems = exc.problems if isinstance(exc, VerificationError) else [str(exc)]
            print(json.dumps({"ok": False, "exit_code": exc.exit_code, "problems": problems}))
        raise


def _verify(args: argparse.Namespace) -> int:
    from takeoff_cache.engines import get_backend
    from takeoff_cache.trust.keys import load_trust_store
    from takeoff_cache.trust.verify import verify_cache

    trusted = load_trust_store(args.trust)
    host = None
    if args.host_check:
        host = _host_for(args.cache_root, get_backend)
    manifest = verify_cache(args.cache_root, trusted, state_file=args.state, host=host)
    summary = {
        "ok": True,
        "version": manifest.version,
        "build_identity": manifest.build_identity,
        "artifacts": len(manifest.artifacts),
        "keyid": manifest.keyid,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"verified: {args.cache_root} — manifest version {manifest.version},"
            f" {len(manifest.artifacts)} artifacts, signed by key {manifest.keyid[:16]}"
        )
    return 0


def _host_for(cache_root: Path, get_backend: Callable[[str], Any]) -> dict[str, Any]:
    """This host's identity for the backend the cache's engines were built with."""
    try:
        doc = json.loads((cache_root / "Manifest.json").read_bytes())
        backend = doc["signed"]["host"]["backend"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        backend = "auto"
    try:
        identity: dict[str, Any] = get_backend(backend).host_identity()
    except TakeoffCacheError as exc:
        raise VerificationError(
            f"host-check: this host cannot run {backend} engines: {exc}"
        ) from exc
    return identity
