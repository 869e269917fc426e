"""``takeoff-cache build``: build or refresh a cache, through the build-cache flow."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from takeoff_cache.cli.args import options_from, raw_request, request_args
from takeoff_cache.errors import EXIT_NOT_READY, TakeoffCacheError

EXIT_FAILURE = 3


def add_parser(sub: Any) -> None:
    p = sub.add_parser("build", help="build or refresh a takeoff cache")
    request_args(p)
    p.set_defaults(func=cmd_build)


def build_or_noop(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Build: checked and locked here first, then the flow, unless there is nothing to do.

    Without a configured Prefect API a no-op is answered here, with no flow run:
    the temporary API that would record it keeps no UI and ends with the process.
    """
    from takeoff_cache.build.front import prechecked
    from takeoff_cache_prefect.tempapi import api_configured

    options = options_from(args)
    with prechecked(raw, options) as pre:
        if pre.noop_report is not None and not api_configured():
            return pre.noop_report.to_json()
        from takeoff_cache_prefect.run import run_build

        return run_build(raw, options, args.verbose, held=(pre.lock,))


def cmd_build(args: argparse.Namespace) -> int:
    from takeoff_cache.build.report import BuildReport

    try:
        report = build_or_noop(raw_request(args), args)
    except TakeoffCacheError as exc:
        if args.json:
            print(json.dumps(BuildReport(failure_reason=str(exc)).to_json()))
        raise
    if args.json:
        print(json.dumps(report))
    else:
        print(BuildReport.from_json(report).text())
    if report["outcome"] == "failure":
        if not_ready(report.get("ready")):
            return EXIT_NOT_READY
        print(f"takeoff-cache: build failed: {report['failure_reason']}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def not_ready(ready: dict[str, Any] | None) -> bool:
    """Whether the verdict stopped the build; if so, say why on stderr, a line a reason."""
    if not ready or ready.get("ok") or not ready.get("gated", True):
        return False
    for reason in ready.get("reasons", []):
        print(f"takeoff-cache: not ready: {reason}", file=sys.stderr)
    return True
