"""The ``takeoff-cache`` command line (SPEC §9).

Every failure prints one line per problem on stderr and exits with the code
of its error class; a traceback is never shown to an operator.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import InvalidRequestError, TakeoffCacheError, VerificationError

EXIT_FAILURE = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own usage errors: one line and exit code 2, as for any invalid input.
        raise InvalidRequestError(
            f"usage: {message} (see takeoff-cache {self.prog.split()[-1]} --help)"
        )


def _prefect_env(verbose: bool) -> None:
    """Defaults for Prefect, set before it is imported: no telemetry, quiet unless asked."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The Python client's own usage events, off before it would ask the server.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY", "false")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    # The embedded API starts in a subprocess; on a busy 2-core host 20 s is not enough.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not verbose:
        # Run logs still reach the Prefect API (and UI); only the terminal copy is muted,
        # so an operator sees our one-line errors, not Prefect's tracebacks.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")


def _request_args(p: argparse.ArgumentParser, with_options: bool = True) -> None:
    p.add_argument("--request", type=Path, help="request TOML; flags override its fields")
    p.add_argument("--corpus", help="MBTiles file or XYZ folder")
    p.add_argument("--bbox", help="LAT_MIN,LON_MIN,LAT_MAX,LON_MAX (degrees)")
    p.add_argument("--zoom", dest="zoom_levels", help="Z[,Z...]")
    p.add_argument("--sector", dest="sector_class", help="active_conflict | stable_rear")
    p.add_argument("--backbones", help="backbones TOML")
    p.add_argument("--precision", help="fp32 (default) | fp16 | int8")
    p.add_argument("--calibration", help="INT8 calibration file")
    p.add_argument(
        "--cache-root", dest="cache_root", help="existing folder that receives the cache"
    )
    p.add_argument(
        "--key", help="Ed25519 private key (PEM); passphrase from TAKEOFF_CACHE_KEY_PASSPHRASE"
    )
    p.add_argument("--trust", help="trust store: PEM file or folder of public keys")
    p.add_argument("--takeoff-origin", dest="takeoff_origin", help="LAT,LON,ALT")
    p.add_argument("--flight-id", dest="flight_id", help="UUID")
    p.add_argument(
        "--work-dir", dest="work_dir", help="work folder (default ~/.cache/takeoff-cache)"
    )
    p.add_argument("--backend", default="auto", help="auto | onnxruntime | tensorrt")
    if with_options:
        p.add_argument("--coverage", default="strict", help="strict (default) | lenient")
        p.add_argument("--expires-in", dest="expires_in", help="manifest lifetime, e.g. 36h, 7d")
        p.add_argument("--json", action="store_true", help="print the build report as JSON")
        p.add_argument(
            "--dask-address",
            dest="dask_address",
            help="embed descriptors on the Dask cluster whose scheduler is here"
            " (tcp://HOST:PORT); workers need the work folder at the same path",
        )
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's run logs")


def _raw_request(args: argparse.Namespace) -> dict[str, Any]:
    from .request import FIELDS, read_request_file

    raw: dict[str, Any] = read_request_file(args.request) if args.request else {}
    for name in FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            raw[name] = value
    return raw


def parse_duration(text: str | None) -> float | None:
    if not text:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise InvalidRequestError(
            f"expires-in: {text!r} is not a duration like 36h or 7d"
        ) from None
    if value <= 0:
        raise InvalidRequestError(f"expires-in: {text!r} must be positive")
    return value


# Prefect's names for the flow-run heartbeat interval (the second is its legacy alias).
HEARTBEAT_SETTINGS = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


@contextlib.contextmanager
def _heartbeats_only_when_asked() -> Iterator[None]:
    """Flow-run heartbeats only when the operator set their interval, toward a server.

    Heartbeats let an automation on a Prefect server mark a killed run
    Crashed (Prefect's zombie-flow recipe, docs/operations.md). Without that
    automation, or toward the temporary API (which ends with this process),
    they reach no one, yet Prefect sends them by default and joins their
    thread, which sleeps in one-second steps, at the end of every run: up to
    a second of every build. Deployment runs do not come through here and
    keep Prefect's setting.
    """
    from prefect.context import get_settings_context
    from prefect.settings import get_current_settings, temporary_settings

    profile = get_settings_context().profile.settings
    asked = any(name in os.environ for name in HEARTBEAT_SETTINGS) or any(
        getattr(setting, "name", None) in HEARTBEAT_SETTINGS for setting in profile
    )
    if asked and get_current_settings().api.url:
        yield
        return
    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        yield


def _run_build(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    _prefect_env(args.verbose)
    from takeoff_cache_prefect.tempapi import serving, start_early

    # Before Prefect and the flow are imported, so the server starts meanwhile.
    server = start_early()
    from takeoff_cache_prefect.flows.build import build_cache, recorded_outcomes

    params = {k: v for k, v in raw.items() if v is not None}
    params.update(
        work_dir=args.work_dir,
        backend=args.backend,
        coverage=args.coverage,
        expires_in_s=parse_duration(args.expires_in),
        dask_address=getattr(args, "dask_address", None),
    )
    # As a state: a soft failure is a Failed run, and an unexpected error is the
    # state's data rather than a traceback through Prefect's engine.
    # Heartbeats are decided first: toward a temporary API they reach no one.
    with (
        _heartbeats_only_when_asked(),
        serving(server, args.verbose),
        recorded_outcomes() as outcomes,
    ):
        state = build_cache(**params, return_state=True)
    if outcomes:
        # What the flow itself ended with; the state's copy can lack it.
        outcome = outcomes[-1]
        if isinstance(outcome, TakeoffCacheError):
            raise outcome
        return outcome
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    if not isinstance(result, dict):
        raise TypeError(f"build-cache returned {type(result).__name__}, not a report")
    return result


def _cache_root_of(raw: dict[str, Any]) -> Path | None:
    """The request's cache root if it names an existing folder; validation speaks otherwise."""
    from .request import parse_request

    try:
        root = parse_request(raw).cache_root
    except InvalidRequestError:
        return None
    return root if root.is_dir() else None


def cmd_build(args: argparse.Namespace) -> int:
    from .faults import checkpoint
    from .lock import held_early
    from .report import BuildReport

    try:
        raw = _raw_request(args)
        root = _cache_root_of(raw)
        checkpoint("cli.before_lock", root)
        with held_early(root) if root is not None else contextlib.nullcontext():
            report = _run_build(raw, args)
    except TakeoffCacheError as exc:
        if args.json:
            print(json.dumps(BuildReport(failure_reason=str(exc)).to_json()))
        raise
    if args.json:
        print(json.dumps(report))
    else:
        print(BuildReport(**report).text())
    if report["outcome"] == "failure":
        print(f"takeoff-cache: build failed: {report['failure_reason']}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .engines import get_backend
    from .keys import load_trust_store
    from .verify import verify_cache

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


def _partial_request(args: argparse.Namespace, fillers: dict[str, str]) -> Any:
    """A request for commands that need only some fields; the rest get inert fillers."""
    from .request import parse_request

    raw = _raw_request(args)
    for name, filler in fillers.items():
        raw.setdefault(name, filler)
    return parse_request(raw)


_NO_AREA = {"bbox": "0,0,1,1", "zoom_levels": "0", "corpus": "."}
_NO_TARGET = {"sector_class": "stable_rear", "cache_root": ".", "key": ".", "trust": "."}


def cmd_compile_engines(args: argparse.Namespace) -> int:
    from .engines.store import ensure_engine
    from .validate import check_engine_inputs
    from .workdir import resolve_work_dir

    # Only what engines need: no corpus, no cache root, no key, no lock.
    request = _partial_request(args, {**_NO_AREA, **_NO_TARGET})
    backbones, calibration_sha, backend = check_engine_inputs(request, args.backend)
    work = resolve_work_dir(args.work_dir)
    for backbone in backbones:
        record = ensure_engine(
            backbone, backend, request.precision, request.calibration, calibration_sha, work
        )
        print(f"{'built ' if record.built else 'reused'} {backbone.name}: {record.store_path}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import write_calibration
    from .corpus import select_tiles
    from .validate import check_corpus

    request = _partial_request(
        args, {**_NO_TARGET, "backbones": ".", "precision": "fp32", "calibration": ""}
    )
    if args.tiles < 1:
        raise InvalidRequestError(f"tiles: {args.tiles} must be at least 1")
    if not args.out.parent.is_dir():
        raise InvalidRequestError(f"out: folder {args.out.parent} does not exist")
    check_corpus(request.corpus)
    selection = select_tiles(request.corpus, request.bbox.as_tuple(), request.zoom_levels)
    count = write_calibration(args.out, selection, request.corpus, args.tiles, args.seed)
    print(f"wrote {args.out}: {count} calibration tiles sampled from {len(selection.tiles)}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from .keys import PASSPHRASE_ENV, generate_keypair

    passphrase = os.environ.get(PASSPHRASE_ENV)
    pub = generate_keypair(args.keyfile, passphrase.encode() if passphrase else None)
    print(f"wrote {args.keyfile} (mode 0600{', encrypted' if passphrase else ''}) and {pub}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    path = args.cache_root / "Manifest.json"
    try:
        doc = json.loads(path.read_bytes())
        signed = doc["signed"]
    except FileNotFoundError:
        raise VerificationError(f"{path} does not exist") from None
    except (ValueError, KeyError, TypeError, RecursionError):
        raise VerificationError(f"{path} is not a takeoff-cache manifest") from None
    req = signed.get("request", {})
    print(f"cache:          {args.cache_root}")
    print(
        f"version:        {signed.get('version')}  created {signed.get('created_at')}"
        f"  expires {signed.get('expires_at') or 'never'}"
    )
    print(f"build identity: {signed.get('build_identity')}")
    print(
        f"area:           bbox {req.get('bbox')} zoom {req.get('zoom_levels')}"
        f" sector {req.get('sector_class')}"
    )
    print(
        f"corpus:         {signed.get('corpus', {}).get('tile_count')} tiles,"
        f" fingerprint {signed.get('corpus', {}).get('fingerprint', '')[:16]}"
    )
    print(f"host:           {json.dumps(signed.get('host'), sort_keys=True)}")
    print("artifacts:")
    for a in signed.get("artifacts", []):
        print(f"  {a.get('kind', '?'):12} {a.get('size', 0):>12,}  {a.get('path')}")
    print(
        "signatures:     " + ", ".join(s.get("keyid", "?")[:16] for s in doc.get("signatures", []))
    )
    print("(inspect does not verify; run 'takeoff-cache verify')")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from .demo import make_demo_data

    if not 1 <= args.tiles <= 1_000_000:
        raise InvalidRequestError(f"tiles: {args.tiles} is outside [1, 1000000]")
    inputs = make_demo_data(args.dir, tiles=args.tiles, seed=args.seed)
    print(
        f"demo inputs in {inputs.root}: {inputs.tile_count} tiles; build with:\n"
        f"  takeoff-cache build --request {inputs.request}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import make_demo_data
    from .keys import load_trust_store
    from .report import BuildReport
    from .request import FIELDS
    from .verify import verify_cache

    inputs = make_demo_data(args.workdir, tiles=args.tiles, seed=args.seed)
    print(f"demo inputs: {inputs.root} ({inputs.tile_count} tiles)", file=sys.stderr)
    args.request = inputs.request
    args.work_dir = args.work_dir or str(inputs.root / "work")
    for name in FIELDS:  # the demo request file says it all
        setattr(args, name, None)
    args.coverage, args.expires_in = "strict", None
    report = BuildReport(**_run_build(_raw_request(args), args))
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="takeoff-cache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("build", help="build or refresh a takeoff cache")
    _request_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("verify", help="verify a cache before takeoff")
    p.add_argument("cache_root", type=Path)
    p.add_argument("--trust", type=Path, required=True)
    p.add_argument("--state", type=Path, help="file remembering the highest version seen")
    p.add_argument("--host-check", action="store_true", help="engines must be for this host")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("compile-engines", help="compile or reuse engines in the work folder only")
    _request_args(p, with_options=False)
    p.set_defaults(func=cmd_compile_engines)

    p = sub.add_parser("calibrate", help="sample corpus tiles into an INT8 calibration file")
    _request_args(p, with_options=False)
    p.add_argument("--out", type=Path, required=True, help="calibration file to write (.npz)")
    p.add_argument("--tiles", type=int, default=128, help="how many tiles to sample")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("keygen", help="write a new Ed25519 key pair")
    p.add_argument("keyfile", type=Path)
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("inspect", help="summarize a cache's manifest")
    p.add_argument("cache_root", type=Path)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo-data", help="generate demo inputs")
    p.add_argument("dir", type=Path)
    p.add_argument("--tiles", type=int, default=320)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo", help="generate demo inputs, build, verify, print the report")
    p.add_argument("--workdir", type=Path, default=Path("takeoff-cache-demo"))
    p.add_argument("--tiles", type=int, default=320)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", dest="work_dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="auto")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code: int = args.func(args)
        return code
    except VerificationError as exc:
        for problem in exc.problems:
            print(f"takeoff-cache: verify: {problem}", file=sys.stderr)
        return exc.exit_code
    except TakeoffCacheError as exc:
        print(f"takeoff-cache: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("takeoff-cache: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"takeoff-cache: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
