"""``takeoff-cache prepare``: a flight to a verified cache, through the prepare-flight flow.

The flight is resolved and the job sized here first, before Prefect starts: a
bad plan, an unreachable flights API or an oversized download is one line and
its code, and leaves no file behind. The workstation lock is taken here too, so a
second prepare of the same corpus is refused at once; the flow adopts it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from takeoff_cache.cli.args import request_args
from takeoff_cache.cli.build import not_ready
from takeoff_cache.core.env import FLIGHTS_TOKEN, KEY_PASSPHRASE, TILES_API_KEY
from takeoff_cache.errors import EXIT_NOT_READY, InvalidRequestError, TakeoffCacheError

if TYPE_CHECKING:
    from takeoff_cache.prepare.report import PrepareReport

EXIT_CODES = f"""\
exit codes, by the phase that stopped:
  0  prepared: the cache is built (or already was) and verifies; --dry-run printed its estimate
  2  invalid input or usage (a bad --zoom, --tiles-url, a flight id that is not a UUID)
  9  resolve: the flight cannot be resolved (file, plan, position, flights API)
  4  lock: another prepare downloading into the same corpus holds its lock
     (CORPUS.lock, beside the corpus file)
  10 download: the tile server kept failing, or more tiles than --max-tiles
  3, 5, 6, 8  build: the build's own code (failure, coverage, key, engine)
  12 not ready: a tile under the route is missing (--allow-gaps accepts it), a zoom
     holds less than --min-coverage of the area (default 0.98), or Recall@1 along
     the route is below --min-recall (default 0.5; 0 turns it off); one line per
     reason, and the previous cache stays in force
  7  verify: the built cache does not verify
  11 companion: it cannot be reached or used (host key, auth, tool, disk, paths,
     transfer); a build there that fails exits with its own code

secrets come from the environment only: {TILES_API_KEY} (sent as
--tiles-key-header or --tiles-key-param), {FLIGHTS_TOKEN} (the flights
API's bearer token), {KEY_PASSPHRASE} (the signing key's)."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "prepare",
        help="flight plan -> area -> tiles -> build -> verify",
        description="Resolve a flight, download the tiles of its area, build and verify the"
        " cache (the prepare-flight flow). The rest of the request comes from --request"
        " and the build flags.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--plan", type=Path, help="flight file: QGroundControl .plan, QGC WPL, JSON")
    p.add_argument("--flights-api", help="flights API base URL (GET URL/flights/ID)")
    p.add_argument("--tiles-url", help="XYZ tile URL template ({z} {x} {y} {-y} {s} {q})")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--tiles-key-header", help=f"send {TILES_API_KEY} as this header")
    key.add_argument("--tiles-key-param", help=f"send {TILES_API_KEY} as this parameter")
    p.add_argument("--buffer-m", type=float, default=500.0, help="buffer in metres (default 500)")
    p.add_argument("--max-age", type=float, help="revalidate tiles older than DAYS")
    p.add_argument(
        "--max-tiles", type=int, default=50_000, help="refuse a larger download (default 50000)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the download estimate only")
    c = p.add_argument_group(
        "companion computer",
        "build and verify on the drone's companion over SSH (or set [companion] in --request)",
    )
    c.add_argument("--companion", metavar="USER@HOST[:PORT]", help="the companion to build on")
    for name, what in _COMPANION_PATHS.items():
        c.add_argument(f"--companion-{name.replace('_', '-')}", metavar="PATH", help=what)
    c.add_argument("--known-hosts", metavar="FILE", help="default: ~/.ssh/known_hosts")
    c.add_argument(
        "--accept-new-host-key",
        action="store_true",
        help="trust an unknown host key once and record it (a changed key is always refused)",
    )
    c.add_argument(
        "--identity", action="append", metavar="FILE", help="private key to offer (repeatable)"
    )
    c.add_argument("--no-agent", action="store_true", help="do not offer the SSH agent's keys")
    c.add_argument(
        "--work-pool",
        metavar="NAME",
        help="build as the build-cache deployment of this Prefect work pool (its worker on"
        " the companion): with --companion the inputs go over SSH first, else the paths"
        " must exist on the worker's machine; needs PREFECT_API_URL",
    )
    c.add_argument("--connect-timeout", type=float, metavar="S", help="default: 15")
    c.add_argument("--command-timeout", type=float, metavar="S", help="default: 3600")
    request_args(p)
    p.set_defaults(func=cmd_prepare)


_COMPANION_PATHS = {
    "cache_root": "the cache folder there (must exist)",
    "key": "the signing key there (it never travels)",
    "trust": "the trust store there",
    "work_dir": "the work folder there (default: ~/.cache/takeoff-cache)",
    "inputs_dir": "where the inputs are sent (default: WORK/companion-inputs)",
    "tool": "the takeoff-cache command there (default: takeoff-cache)",
}


def cmd_prepare(args: argparse.Namespace) -> int:
    """Flight -> area -> tiles -> build -> verify; the report names the phase that stopped."""
    from takeoff_cache.prepare.report import PrepareReport

    report = PrepareReport()
    try:
        report, error = _prepare(args, report)
    except TakeoffCacheError as exc:
        report.fail(exc.exit_code, str(exc))
        error = exc
    if args.json:
        print(json.dumps(report.to_json()))
    if error is not None:
        raise error  # one line, and its code
    if not args.json:
        # The flight, area and corpus lines went out as soon as they were known.
        shown = _head(report) if report.flight is not None else []
        print("\n".join(line for line in report.text().splitlines() if line not in shown))
    if report.outcome == "failure":  # the build's own verdict, told in its report
        if report.exit_code == EXIT_NOT_READY and not_ready(report.ready):
            return EXIT_NOT_READY
        print(f"takeoff-cache: build failed: {report.error}", file=sys.stderr)
        return report.exit_code or 1
    return 0


def _prepare(
    args: argparse.Namespace, report: PrepareReport
) -> tuple[PrepareReport, TakeoffCacheError | None]:
    from takeoff_cache.build.request import FIELDS
    from takeoff_cache.cli.args import options_from as _options
    from takeoff_cache.cli.args import request_doc as _request_doc
    from takeoff_cache.prepare.precheck import precheck

    if args.area is not None:
        raise InvalidRequestError("area: prepare computes the area from the flight; drop --area")
    raw, sections = _request_doc(args, ("companion",))
    for decided in ("bbox", "area", "takeoff_origin", "route"):
        raw.pop(decided, None)  # the flight decides these
    params: dict[str, Any] = {
        "plan": str(args.plan) if args.plan else None,
        "flights_api": args.flights_api,
        "tiles_url": args.tiles_url,
        "tiles_key_header": args.tiles_key_header,
        "tiles_key_param": args.tiles_key_param,
        "buffer_m": args.buffer_m,
        "max_age_days": args.max_age,
        "max_tiles": args.max_tiles,
        **{name: raw.get(name) for name in FIELDS if name in raw},
    }
    companion = _companion(args, sections.get("companion"))
    if companion is not None:
        params["companion"] = companion.to_json()
    if args.work_pool:
        _check_work_pool()
        params["work_pool"] = args.work_pool
    builds_here = companion is None and not args.work_pool
    if not args.dry_run:
        # Every mistake at once, before the first request, before Prefect and before
        # the area's code loads; nothing is written (the work folder, if it exists
        # already, lends its checked backbones).
        fields = {name: params[name] for name in FIELDS if name in params}
        work = Path(args.work_dir).expanduser() if args.work_dir else None
        precheck(
            fields,
            params,
            companion=companion is not None,
            pool=bool(args.work_pool),
            backend=args.backend or "auto",
            work_dir=work if work is not None and work.is_dir() else None,
        )
    from takeoff_cache.prepare import job as p

    job_args: dict[str, Any] = {name: params.get(name) for name in p.JOB_PARAMETERS}
    job_args["work_dir"] = args.work_dir
    # Resolved here, before any lock or write: a bad plan leaves no trace.
    job = p.plan_job(**job_args)
    report.resolved(job)
    if not args.json:
        print("\n".join(_head(report)), flush=True)
    report.phase = "download"
    if args.dry_run:
        report.download = p.dry_run(job.corpus, job.mission, job.options)
        report.outcome = "dry_run"
        return report, None
    to_fetch = p.check_job_size(job.corpus, job.mission, job.options) if job.source else 0
    report.phase = "lock"
    args.work_dir = str(job.work)
    options = _options(args)
    params.update(flight=job.flight_json(), corpus=str(job.corpus))
    if builds_here and to_fetch == 0:
        done = _answered_here(job, params, options, report)
        if done is not None:
            return done, None
    # Taken here by a run that downloads, so a second one writing this corpus is
    # refused before Prefect starts; handed to the flow, whose lock phase adopts it.
    # A run that only reads the corpus takes none.
    with p.corpus_lock(job) as held:
        from takeoff_cache.cli.progress import ProgressBar
        from takeoff_cache_prefect.run import run_prepare

        with ProgressBar() as bar:
            return run_prepare(params, options, args.verbose, progress=bar, lines=_show, held=held)


def _answered_here(
    job: Any, params: dict[str, Any], options: Any, report: PrepareReport
) -> PrepareReport | None:
    """A re-run with nothing to fetch and nothing to build, answered without Prefect.

    As ``build`` answers its no-op: the front runs here (validate, lock, select,
    identity, and the no-op check, which checks the cache as ``verify`` does), and
    the cache's readiness is judged again on this run's thresholds, as the flow
    judges a no-op. None when there is work, or a configured Prefect API that
    should record the run.
    """
    from takeoff_cache.build.front import prechecked
    from takeoff_cache.build.options import OPTION_FIELDS, build_options, for_prepare
    from takeoff_cache.build.request import FIELDS
    from takeoff_cache.errors import NotReadyError
    from takeoff_cache.prepare import job as p
    from takeoff_cache_prefect.tempapi import api_configured

    if api_configured():
        return None
    gated = build_options(**for_prepare({f.name: getattr(options, f.name) for f in OPTION_FIELDS}))
    fields = {name: params[name] for name in FIELDS if name in params}
    raw = p.build_raw(fields, job.flight, job.mission, job.corpus)
    with p.corpus_lock(job) as held, prechecked(raw, gated) as pre:
        if pre.noop_report is None or pre.previous is None or pre.selection is None:
            return None
        report.phase = "build"
        report.lock = str(held[0].path) if held else None
        report.download = p.fetch_tiles(job.corpus, job.mission, job.source, job.options)
        area_file = p.write_area(job.work, job.flight, job.mission)
        report.area = {**job.mission.to_json(), "path": str(area_file)}
        # Judged again on this run's thresholds by the precheck, as the flow judges a
        # no-op; a gated one that is not ready is a failed build, the cache kept.
        report.ready = pre.noop_report.ready
        report.build = pre.noop_report.to_json()
        if pre.noop_report.outcome == "failure":
            error = NotReadyError(list((report.ready or {}).get("reasons", [])))
            report.fail(error.exit_code, str(error))
            return report
        report.verify = {
            "ok": True,
            "version": pre.previous.version,
            "build_identity": pre.previous.build_identity,
            "artifacts": len(pre.previous.artifacts),
        }
        report.finish(pre.noop_report.outcome)
        return report


def _head(report: PrepareReport) -> list[str]:
    """The report's flight, area and corpus lines: what resolving the flight told."""
    from takeoff_cache.prepare.report import PrepareReport

    resolved = PrepareReport(flight=report.flight, area=report.area, corpus=report.corpus)
    return resolved.text().splitlines()


def _show(line: str) -> None:
    """A line the companion's build printed (redacted there and here)."""
    print(f"companion: {line}", file=sys.stderr, flush=True)


def _check_work_pool() -> None:
    from takeoff_cache_prefect.tempapi import api_configured

    if not api_configured():
        raise InvalidRequestError(
            "--work-pool: no Prefect API configured; set PREFECT_API_URL to the server"
            " the pool's worker polls"
        )


def _companion(args: argparse.Namespace, table: dict[str, Any] | None) -> Any:
    """The companion's options, or None to build here."""
    if args.companion is None and not (table and table.get("target")):
        if any(getattr(args, f"companion_{name}") for name in _COMPANION_PATHS):
            raise InvalidRequestError("companion: --companion-* flags need --companion USER@HOST")
        return None
    from takeoff_cache.companion.options import companion_options

    flags = {name: getattr(args, f"companion_{name}") for name in _COMPANION_PATHS}
    flags.update(
        target=args.companion,
        known_hosts=args.known_hosts,
        identity=args.identity,
        accept_new_host_key=True if args.accept_new_host_key else None,
        use_agent=False if args.no_agent else None,
        connect_timeout_s=args.connect_timeout,
        command_timeout_s=args.command_timeout,
    )
    return companion_options(table or {}, flags)
