"""The ``takeoff-cache`` command line (SPEC §9).

Every failure prints one line per problem on stderr and exits with the code
of its error class; a traceback is never shown to an operator.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from takeoff_cache.errors import InvalidRequestError, TakeoffCacheError, VerificationError

EXIT_FAILURE = 3


class _Parser(argparse.ArgumentParser):
    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # Reported here, where the command is known, not by the top-level parser.
            command = getattr(parsed, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            raise InvalidRequestError(
                f"usage: unrecognized arguments: {' '.join(extras)} (see {prog} --help)"
            )
        return parsed

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own usage errors: one line and exit code 2, as for any invalid input.
        # prog is "takeoff-cache" or "takeoff-cache build": it names the command once.
        raise InvalidRequestError(f"usage: {message} (see {self.prog} --help)")


def _request_args(p: argparse.ArgumentParser, with_options: bool = True) -> None:
    from takeoff_cache.build.options import OPTION_FIELDS
    from takeoff_cache.build.request import REQUEST_FIELDS

    p.add_argument("--request", type=Path, help="request TOML; flags override its fields")
    for field in REQUEST_FIELDS:
        p.add_argument(field.flag, dest=field.name, help=field.help)
    for field in OPTION_FIELDS:
        # Commands that only compile take the work folder and backend, nothing more.
        if with_options or field.name in ("work_dir", "backend"):
            p.add_argument(field.flag, dest=field.name, help=field.help)
    if with_options:
        p.add_argument("--json", action="store_true", help="print the build report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's run logs")


def _raw_request(args: argparse.Namespace) -> dict[str, Any]:
    return _request_doc(args, ())[0]


def _request_doc(
    args: argparse.Namespace, tables: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The request's fields (the file's, then the flags'), and the file's ``tables``."""
    from takeoff_cache.build.request import FIELDS, read_request_sections

    raw: dict[str, Any]
    raw, sections = read_request_sections(args.request, tables) if args.request else ({}, {})
    for name in FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            raw[name] = value
    return raw, sections


def _options(args: argparse.Namespace) -> Any:
    from takeoff_cache.build.options import build_options, parse_duration

    return build_options(
        work_dir=args.work_dir,
        backend=args.backend,
        coverage=getattr(args, "coverage", None),
        expires_in_s=parse_duration(getattr(args, "expires_in_s", None)),
        dask_address=getattr(args, "dask_address", None),
        self_test=getattr(args, "self_test", None),
        min_recall=getattr(args, "min_recall", None),
    )


def _run_build(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Build: checked and locked here first, then the flow, unless there is nothing to do.

    Without a configured Prefect API a no-op is answered here, with no flow run:
    the temporary API that would record it keeps no UI and ends with the process.
    """
    from takeoff_cache.build.front import prechecked
    from takeoff_cache_prefect.tempapi import api_configured

    options = _options(args)
    with prechecked(raw, options) as pre:
        if pre.noop_report is not None and not api_configured():
            return pre.noop_report.to_json()
        from takeoff_cache_prefect.run import run_build

        return run_build(raw, options, args.verbose)


def cmd_build(args: argparse.Namespace) -> int:
    from takeoff_cache.build.report import BuildReport

    try:
        report = _run_build(_raw_request(args), args)
    except TakeoffCacheError as exc:
        if args.json:
            print(json.dumps(BuildReport(failure_reason=str(exc)).to_json()))
        raise
    if args.json:
        print(json.dumps(report))
    else:
        print(BuildReport.from_json(report).text())
    if report["outcome"] == "failure":
        print(f"takeoff-cache: build failed: {report['failure_reason']}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


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


def _partial_request(args: argparse.Namespace, fillers: dict[str, str]) -> Any:
    """A request for commands that need only some fields; the rest get inert fillers."""
    from takeoff_cache.build.request import parse_request

    raw = _raw_request(args)
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


def cmd_keygen(args: argparse.Namespace) -> int:
    from takeoff_cache.core.env import KEY_PASSPHRASE
    from takeoff_cache.trust.keys import generate_keypair

    passphrase = os.environ.get(KEY_PASSPHRASE)
    pub = generate_keypair(args.keyfile, passphrase.encode() if passphrase else None)
    print(f"wrote {args.keyfile} (mode 0600{', encrypted' if passphrase else ''}) and {pub}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        lines = _inspect(args.cache_root, args.png)
    except TakeoffCacheError as exc:
        problems = exc.problems if isinstance(exc, VerificationError) else [str(exc)]
        for problem in problems:
            print(f"takeoff-cache: inspect: {_printable(problem)}", file=sys.stderr)
        return exc.exit_code
    print("\n".join(_printable(line) for line in lines))
    return 0


def _inspect(cache_root: Path, png: Path | None = None) -> list[str]:
    """The summary of a cache's manifest, read through the parser ``verify`` uses;
    with ``png``, its coverage map drawn there too."""
    import stat

    from takeoff_cache.core.layout import MANIFEST_NAME
    from takeoff_cache.trust.manifest import parse_manifest_bytes

    try:
        if not stat.S_ISDIR(cache_root.stat().st_mode):
            raise InvalidRequestError(f"{cache_root} is a file, not a folder")
    except FileNotFoundError:
        raise InvalidRequestError(f"{cache_root} does not exist") from None
    except OSError as exc:
        raise InvalidRequestError(f"{cache_root} cannot be read: {exc.strerror}") from None
    path = cache_root / MANIFEST_NAME
    try:
        # lstat first: opening a FIFO or a device could block or read forever.
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            raise VerificationError(f"{MANIFEST_NAME} is a folder, not a file")
        if not stat.S_ISREG(mode):
            raise VerificationError(f"{MANIFEST_NAME} is not a regular file (symlink or special)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise VerificationError(f"{MANIFEST_NAME} is missing from {cache_root}") from None
    except OSError as exc:
        raise VerificationError(f"{MANIFEST_NAME} cannot be read: {exc.strerror}") from None
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
    write_coverage_map(
        png,
        bbox=bbox,
        tiles=tiles,
        missing=missing_tiles(bbox, zooms, tiles, area=area),
        area=area,
        queries=queries_from_signed(test.get("queries")),
        title=f"takeoff cache at {short_path(cache_root.resolve())}, version {signed['version']}",
        subtitle=_printable(subtitle),
    )


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


def _printable(text: str) -> str:
    """Text taken from a file, with control characters and lone surrogates escaped."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


MAX_K = 100


def cmd_locate(args: argparse.Namespace) -> int:
    try:
        return _locate(args)
    except VerificationError as exc:
        for problem in exc.problems:
            print(f"takeoff-cache: locate: {_printable(problem)}", file=sys.stderr)
        return exc.exit_code


def _locate(args: argparse.Namespace) -> int:
    from takeoff_cache.localize.locate import locate
    from takeoff_cache.trust.keys import load_trust_store

    if not 1 <= args.k <= MAX_K:
        raise InvalidRequestError(f"k: {args.k} is outside [1, {MAX_K}]")
    trusted = load_trust_store(args.trust)
    found = locate(args.cache_root, args.images, trusted, k=args.k, backbones=args.backbones)
    if args.json:
        print(json.dumps([{**loc.to_json(), "ms": round(loc.seconds * 1000, 3)} for loc in found]))
        return 0
    for loc in found:
        print(_printable(loc.image))
        for rank, match in enumerate(loc.matches, 1):
            print(f"  {rank:>2}  {match.zxy:<20} score {match.score:.4f}")
        print(f"  best tile centre:   {loc.best[0]:.6f}, {loc.best[1]:.6f}")
        print(f"  weighted estimate:  {loc.weighted[0]:.6f}, {loc.weighted[1]:.6f}")
        print(f"  query:              {loc.seconds * 1000:.1f} ms")
    return 0


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
    report = BuildReport.from_json(_run_build(_raw_request(args), args))
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="takeoff-cache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("build", help="build or refresh a takeoff cache")
    _request_args(p)
    p.set_defaults(func=cmd_build)

    from takeoff_cache.cli.prepare import add_parser as add_prepare

    add_prepare(sub, _request_args)

    p = sub.add_parser("verify", help="verify a cache before takeoff")
    p.add_argument("cache_root", type=Path, help="the cache folder to verify")
    p.add_argument(
        "--trust", type=Path, required=True, help="trust store: public key file or folder (PEM)"
    )
    p.add_argument("--state", type=Path, help="file remembering the highest version seen")
    p.add_argument("--host-check", action="store_true", help="engines must be for this host")
    p.add_argument("--json", action="store_true", help="print the result (or the problems) as JSON")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("compile-engines", help="compile or reuse engines in the work folder only")
    _request_args(p, with_options=False)
    p.set_defaults(func=cmd_compile_engines)

    p = sub.add_parser("calibrate", help="sample corpus tiles into an INT8 calibration file")
    _request_args(p, with_options=False)
    p.add_argument("--out", type=Path, required=True, help="calibration file to write (.npz)")
    p.add_argument("--tiles", type=int, default=128, help="how many tiles to sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the tile sample (default: 0)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("keygen", help="write a new Ed25519 key pair")
    p.add_argument(
        "keyfile", type=Path, help="private key to write (mode 0600); KEYFILE.pub beside it"
    )
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("inspect", help="summarize a cache's manifest (does not verify)")
    p.add_argument("cache_root", type=Path, help="the cache folder to summarize")
    p.add_argument(
        "--png",
        type=Path,
        metavar="FILE",
        help="also draw its coverage map there: area, tiles, self-test hits and misses",
    )
    p.set_defaults(func=cmd_inspect)

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
    p.add_argument("--json", action="store_true", help="print one JSON list of the answers")
    p.set_defaults(func=cmd_locate)

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
    return parser


class _Stopped(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, as Ctrl-C raises KeyboardInterrupt:
    the build unwinds (staging settled, lock released) and the cache stays as it was."""


def _stop(signum: int, frame: object) -> None:
    raise _Stopped


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
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
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Stopped)
        print(
            f"takeoff-cache: {'terminated' if terminated else 'interrupted'};"
            " the cache holds its last complete build",
            file=sys.stderr,
        )
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except Exception as exc:
        print(f"takeoff-cache: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
