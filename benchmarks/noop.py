"""No-op benchmark: re-running a finished build, from the shell and as a flow.

    python benchmarks/noop.py [--tiles 10000] [--data DIR] [--repeat 5]
    python benchmarks/noop.py --shell-only --tiles 320 --area [--tool PATH --data DIR]
    python benchmarks/noop.py --prepare [--tool PATH --data DIR]

Builds the demo cache (320 tiles) and one of ``--tiles`` tiles once (reused
when already built). First, for both, the whole wall time of a fresh
``takeoff-cache build`` process re-run on the unchanged request, as an operator
runs it without a configured Prefect API (answered before Prefect starts),
next to ``takeoff-cache verify`` on the same cache. With ``--area`` the request
has an area, as every cache ``prepare`` makes has: a corridor across the
demo's bbox, in an ``--area`` GeoJSON file (``request-area.toml``, cache
``cache-area/``). ``--tool`` times another ``takeoff-cache`` executable (say, an
older checkout's) on the same inputs: it builds its own caches, so give it its
own ``--data``. Then, for the larger one, in the same process setup each time:

- warm, in one process with Prefect's API already up: the build-cache flow
  on the unchanged request (an ``idempotent_no_op``) against an empty flow;
- cold, each in a fresh process, as an operator runs it: ``takeoff-cache
  build`` against ``python -c`` running an empty flow, first with Prefect's
  temporary API server (each process starts its own, 13-20 s that dominate
  and vary; ``takeoff-cache`` starts it before loading Prefect, so its
  start-up overlaps the imports), then against one running ``prefect server`` (``make server``'s
  setup), where what is left is the processes' own work. The empty flow
  runs with Prefect's defaults; ``takeoff-cache build`` sends no flow-run
  heartbeats unless their interval is set (docs/operations.md), whose thread
  would otherwise hold the end of the run for up to a second.

With ``--rebuild``, Prefect's own cost of a build that runs the flow: builds
with nothing to embed (each a new takeoff origin, so engines and descriptors
are reused), timed as wall minus the report's ``elapsed_s``, without a
configured API, in a fresh PREFECT_HOME: first with a temporary API per command
(``TAKEOFF_CACHE_PREFECT_IDLE_MIN=0``, the way every command ran before the warm
API), then with the warm local API (docs/operations.md), whose first command
starts it and whose later ones reuse it (target: 2 s or less). The warm API is
stopped at the end.

With ``--prepare``, the whole wall time of ``takeoff-cache prepare`` processes
as an operator runs them before each flight, without a configured Prefect API,
against a tile server on 127.0.0.1 and the sample corridor plan: a request with
three mistakes (answered before the first request), and a re-run with nothing
to fetch or build (answered before Prefect starts), beside ``build``'s no-op of
the same cache. ``--tool`` times another checkout's ``takeoff-cache`` the same way
(give it its own ``--data``); its first prepare starts Prefect either way.

Cold runs alternate empty, no-op, empty, no-op...; the difference is the
median of the paired differences (minima beside it: noise only adds), in
wall seconds and in CPU seconds of each process and its children.
Ends with one JSON line: medians, the differences, and the no-op's phases.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")

from takeoff_cache.build.request import read_request_file  # noqa: E402
from takeoff_cache.core.env import PREFECT_IDLE_MIN  # noqa: E402
from takeoff_cache.demo import make_demo_data  # noqa: E402
from takeoff_cache.demo.synthetic import corridor_area  # noqa: E402

EMPTY_FLOW = """
from prefect import flow

@flow(name="nothing", persist_result=False, log_prints=False)
def nothing() -> int:
    return 0

nothing()
"""


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def build_params(request: Path, work: Path) -> dict[str, Any]:
    raw = read_request_file(request)
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in raw.items() if v is not None}
    params["work_dir"] = str(work)
    return params


def warm(request: Path, work: Path, repeat: int) -> dict[str, Any]:
    from prefect import flow
    from takeoff_cache_prefect.flows.build import build_cache

    @flow(name="nothing", persist_result=False, log_prints=False)
    def nothing() -> int:
        return 0

    params = build_params(request, work)
    nothing()  # starts Prefect's API for this process
    first = build_cache(**params)
    if first["outcome"] != "idempotent_no_op":
        raise SystemExit(f"expected a no-op, got {first['outcome']}: {first['failure_reason']}")
    empty_s, noop_s, reports = [], [], []
    for _ in range(repeat):
        start = time.perf_counter()
        nothing()
        empty_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        reports.append(build_cache(**params))
        noop_s.append(time.perf_counter() - start)
    assert all(r["outcome"] == "idempotent_no_op" for r in reports)
    return {
        "empty_flow_s": round(statistics.median(empty_s), 3),
        "noop_build_s": round(statistics.median(noop_s), 3),
        "difference_s": round(statistics.median(noop_s) - statistics.median(empty_s), 3),
        "empty_all_s": [round(t, 3) for t in empty_s],
        "noop_all_s": [round(t, 3) for t in noop_s],
        "phases": reports[len(reports) // 2]["phases"],
        "tiles": reports[0]["tiles"],
    }


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cold(request: Path, work: Path, repeat: int, api_url: str | None = None) -> dict[str, Any]:
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    build = [
        sys.executable,
        "-m",
        "takeoff_cache.cli.main",
        "build",
        "--request",
        str(request),
        "--work-dir",
        str(work),
        "--json",
    ]
    empty = [sys.executable, "-c", EMPTY_FLOW]
    empty_s: list[float] = []
    noop_s: list[float] = []
    # CPU seconds of each process and what it started (the temporary API server
    # too): wall time on a shared host swings by seconds, CPU time much less.
    empty_cpu: list[float] = []
    noop_cpu: list[float] = []
    for _ in range(repeat):
        for cmd, times, cpu in ((empty, empty_s, empty_cpu), (build, noop_s, noop_cpu)):
            before = _children_cpu_s()
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            times.append(time.perf_counter() - start)
            cpu.append(_children_cpu_s() - before)
            if proc.returncode != 0:
                raise SystemExit(f"{cmd[:3]} failed: {proc.stderr.strip()[-500:]}")
            if cmd is build and json.loads(proc.stdout)["outcome"] != "idempotent_no_op":
                raise SystemExit("the cold re-run was not a no-op")
    paired = [n - e for n, e in zip(noop_s, empty_s, strict=True)]
    cpu_paired = [n - e for n, e in zip(noop_cpu, empty_cpu, strict=True)]
    return {
        "cpu_empty_flow_s": round(statistics.median(empty_cpu), 3),
        "cpu_noop_build_s": round(statistics.median(noop_cpu), 3),
        "cpu_difference_s": round(statistics.median(cpu_paired), 3),
        "api": "prefect server" if api_url else "temporary, one per process",
        "empty_flow_s": round(statistics.median(empty_s), 3),
        "noop_build_s": round(statistics.median(noop_s), 3),
        "difference_s": round(statistics.median(paired), 3),
        "difference_of_minima_s": round(min(noop_s) - min(empty_s), 3),
        "empty_all_s": [round(t, 3) for t in empty_s],
        "noop_all_s": [round(t, 3) for t in noop_s],
    }


def _wall(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed: {proc.stderr.strip()}")
    return wall


def _cli(tool: Path | None) -> list[str]:
    return [str(tool)] if tool else [sys.executable, "-m", "takeoff_cache.cli.main"]


def shell(request: Path, work: Path, repeat: int, tool: Path | None = None) -> dict[str, Any]:
    """Whole-process wall time of a no-op CLI re-run and of verify, alternating."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    cli = _cli(tool)
    doc = read_request_file(request)
    build = [*cli, "build", "--request", str(request), "--work-dir", str(work), "--json"]
    verify = [*cli, "verify", doc["cache_root"], "--trust", doc["trust"]]
    builds, verifies = [], []
    for _ in range(repeat):
        builds.append(_wall(build, env))
        verifies.append(_wall(verify, env))
    last = subprocess.run(build, cwd=ROOT, env=env, capture_output=True, text=True)
    report = json.loads(last.stdout)
    return {
        "outcome": report["outcome"],
        "noop_phases": report["phases"],
        "noop_wall_s": round(statistics.median(builds), 3),
        "noop_wall_min_s": round(min(builds), 3),
        "verify_wall_s": round(statistics.median(verifies), 3),
        "verify_wall_min_s": round(min(verifies), 3),
    }


def area_request(demo: Any) -> Path:
    """``request-area.toml`` beside the demo's request: the same, with a corridor across
    its bbox as the area (a GeoJSON file, its ring not yet normalized) and its own cache."""
    request: Path = demo.root / "request-area.toml"
    if request.is_file():
        return request
    feature = corridor_area(tuple(read_request_file(demo.request)["bbox"]))
    (demo.root / "area.geojson").write_text(json.dumps(feature))
    (demo.root / "cache-area").mkdir(exist_ok=True)
    lines = [
        line for line in demo.request.read_text().splitlines() if not line.startswith("cache_root")
    ]
    lines += ['cache_root = "cache-area"', 'area = "area.geojson"']
    request.write_text("\n".join(lines) + "\n")
    return request


def built(
    data: Path, tiles: int, work: Path, area: bool = False, tool: Path | None = None
) -> tuple[Any, Path]:
    """The demo inputs of ``tiles`` tiles and the request to time, built once."""
    demo = make_demo_data(data / f"{tiles}", tiles=tiles)
    request = area_request(demo) if area else demo.request
    cache = Path(read_request_file(request)["cache_root"])
    if not (cache / "Manifest.json").is_file():
        log(f"building the {demo.tile_count}-tile cache {cache} once ...")
        argv = [*_cli(tool), "build", "--request", str(request), "--work-dir", str(work)]
        proc = subprocess.run(argv, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit("the first build failed")
    return demo, request


def cold_with_server(request: Path, work: Path, repeat: int) -> dict[str, Any]:
    from tests.support.procs import PrefectServer

    server = PrefectServer()
    try:
        server.wait_healthy()
        return cold(request, work, repeat, server.url)
    finally:
        server.stop()


def rebuild(request: Path, work: Path, repeat: int, warm_api: bool) -> dict[str, Any]:
    """Wall minus ``elapsed_s`` of builds with only a new takeoff origin, each a fresh
    process without a configured API: the first, then ``repeat`` more within minutes."""
    import shutil

    from takeoff_cache_prefect.tempapi import stop_warm

    home = Path(tempfile.mkdtemp(prefix="takeoff-bench-prefect-"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(home), PREFECT_IDLE_MIN: "10" if warm_api else "0"})
    lat, lon, alt = read_request_file(request)["takeoff_origin"]
    build = [*_cli(None), "build", "--request", str(request), "--work-dir", str(work), "--json"]
    walls: list[float] = []
    overheads: list[float] = []
    try:
        for i in range(repeat + 1):
            origin = f"--takeoff-origin={lat + (i + 1) * 1e-5},{lon},{alt}"
            started = time.perf_counter()
            argv = [*build, origin]
            proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if proc.returncode != 0:
                raise SystemExit(f"rebuild failed: {proc.stderr.strip()[-500:]}")
            report = json.loads(proc.stdout)
            if report["outcome"] != "success" or report["descriptors_generated"]:
                raise SystemExit(f"not a rebuild with nothing to embed: {report['outcome']}")
            walls.append(wall)
            overheads.append(wall - float(report["elapsed_s"]))
    finally:
        stop_warm(home)
        shutil.rmtree(home, ignore_errors=True)
    return {
        "api": "warm, kept between commands" if warm_api else "temporary, one per process",
        "first_wall_s": round(walls[0], 3),
        "first_overhead_s": round(overheads[0], 3),
        "wall_s": round(statistics.median(walls[1:]), 3),
        "overhead_s": round(statistics.median(overheads[1:]), 3),
        "overhead_all_s": [round(t, 3) for t in overheads],
    }


PLAN = ROOT / "tests" / "data" / "flights" / "survey_corridor.plan"


def prepare_walls(data: Path, repeat: int, tool: Path | None = None) -> dict[str, Any]:
    """Wall seconds of prepare's bad-input answer, its no-op, and build's no-op."""
    from tests.support.tileserver import tile_server

    demo = make_demo_data(data / "prepare", tiles=320)
    keep = ("sector_class", "backbones", "precision", "cache_root", "key", "trust")
    lines = [ln for ln in demo.request.read_text().splitlines() if ln.startswith(keep)]
    request = demo.root / "prepare.toml"
    request.write_text("\n".join(lines) + "\n")
    bad = demo.root / "prepare-bad.toml"
    bad.write_text(
        "\n".join(ln for ln in lines if not ln.startswith(("sector_class", "key"))) + "\n"
    )
    work = data / "prepare-work"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(data / "prepare-prefect-home")
    common = ["--work-dir", str(work), "--zoom", "16", "--buffer-m", "100", "--plan", str(PLAN)]
    common += ["--min-recall", "0", "--allow-gaps"]
    with tile_server() as server:
        tiles = ["--tiles-url", server.template]
        run = [*_cli(tool), "prepare", "--request", str(request), *common, *tiles]
        first = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True)
        if first.returncode != 0:
            raise SystemExit(f"the first prepare failed: {first.stderr.strip()[-500:]}")
        fetched = len(server.tile_requests())
        wrong = [*_cli(tool), "prepare", "--request", str(bad), *common, *tiles]
        wrong += ["--tiles-key-header", "X-Api-Key", "--backbones", str(data / "missing.toml")]
        bad_s, noop_s = [], []
        for _ in range(repeat):
            started = time.perf_counter()
            answer = subprocess.run(wrong, cwd=ROOT, env=env, capture_output=True, text=True)
            bad_s.append(time.perf_counter() - started)
            noop_s.append(_wall(run, env))
        again = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True)
        requests_after_first = len(server.tile_requests()) - fetched
    cache = Path(read_request_file(request)["cache_root"])
    build = [*_cli(tool), "build", "--request", str(demo.request), "--work-dir", str(work)]
    build += ["--cache-root", str(cache), "--json"]
    build_s = [_wall(build, env) for _ in range(repeat)]
    outcome = next(
        (ln.split()[-1] for ln in again.stdout.splitlines() if ln.startswith("outcome:")), None
    )
    return {
        "bad_input_exit": answer.returncode,
        "bad_input_lines": [ln for ln in answer.stderr.splitlines() if "error:" in ln],
        "bad_input_wall_s": round(statistics.median(bad_s), 3),
        "noop_outcome": outcome,
        "noop_wall_s": round(statistics.median(noop_s), 3),
        "noop_wall_min_s": round(min(noop_s), 3),
        "build_noop_wall_s": round(statistics.median(build_s), 3),
        "tile_requests_after_first": requests_after_first,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiles", type=int, default=10000)
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "takeoff-bench")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: DATA/work-N)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--cold-repeat", type=int, default=3)
    p.add_argument(
        "--shell-only", action="store_true", help="only the shell no-op and verify timings"
    )
    p.add_argument("--area", action="store_true", help="a request with an area (as prepare makes)")
    p.add_argument("--tool", type=Path, default=None, help="the takeoff-cache executable to time")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="only Prefect's cost of a rebuild: temporary API per command, then the warm one",
    )
    p.add_argument(
        "--prepare",
        action="store_true",
        help="only prepare's answers: bad input and a no-op, beside build's no-op",
    )
    args = p.parse_args()
    if args.prepare:
        log("prepare: bad input and a no-op re-run, fresh processes, no Prefect API ...")
        figures = {"benchmark": "noop-prepare", "load_before": os.getloadavg()[0]}
        figures["tool"] = str(args.tool) if args.tool else "this checkout"
        figures["prepare"] = prepare_walls(args.data, args.repeat, args.tool)
        figures["load_after"] = os.getloadavg()[0]
        figures["target_s"] = 1.0
        figures["within_target"] = figures["prepare"]["noop_wall_s"] <= 1.0
        log(f"    {figures['prepare']}")
        print(json.dumps(figures, sort_keys=True))
        return
    if args.rebuild:
        work = args.work or args.data / f"work-{args.tiles}"
        _, request = built(args.data, args.tiles, work, args.area)
        figures = {"benchmark": "noop-rebuild", "load_before": os.getloadavg()[0]}
        for key, warm_api in (("temporary", False), ("warm", True)):
            log(f"rebuild with a new takeoff origin, {key} API ...")
            figures[key] = rebuild(request, work, args.cold_repeat, warm_api)
            log(f"    {figures[key]}")
        figures["load_after"] = os.getloadavg()[0]
        figures["target_s"] = 2.0
        figures["within_target"] = figures["warm"]["overhead_s"] <= 2.0
        log(
            f"Prefect's cost of a rebuild: {figures['temporary']['overhead_s']} s with a"
            f" temporary API per command, {figures['warm']['overhead_s']} s with the warm API"
        )
        print(json.dumps(figures, sort_keys=True))
        return
    if args.tool and not args.shell_only:
        p.error("--tool times only the shell figures: add --shell-only")
    figures: dict[str, Any] = {"benchmark": "noop", "load_before": os.getloadavg()[0]}
    figures["request"] = "area" if args.area else "bbox"
    figures["tool"] = str(args.tool) if args.tool else "this checkout"
    figures["shell"] = {}
    for tiles in sorted({320, args.tiles}):
        shell_work = args.data / f"work-{tiles}"
        shell_demo, shell_request = built(args.data, tiles, shell_work, args.area, args.tool)
        log(f"shell: no-op CLI re-run and verify, {shell_demo.tile_count} tiles ...")
        figures["shell"][str(shell_demo.tile_count)] = shell(
            shell_request, shell_work, args.repeat, args.tool
        )
        log(f"    {figures['shell'][str(shell_demo.tile_count)]}")
    if args.shell_only:
        figures["within_target"] = all(v["noop_wall_s"] <= 1.0 for v in figures["shell"].values())
        print(json.dumps(figures, sort_keys=True))
        return
    work = args.work or args.data / f"work-{args.tiles}"
    _, request = built(args.data, args.tiles, work, args.area)
    log("warm: no-op build vs empty flow, one process ...")
    figures["warm"] = warm(request, work, args.repeat)
    log(f"    {figures['warm']}")
    log("cold: fresh processes, each with its own temporary API ...")
    figures["cold"] = cold(request, work, args.cold_repeat)
    log(f"    {figures['cold']}")
    log("cold: fresh processes against one prefect server ...")
    figures["cold_server"] = cold_with_server(request, work, args.repeat)
    log(f"    {figures['cold_server']}")
    figures["load_after"] = os.getloadavg()[0]
    figures["target_s"] = 1.0
    figures["within_target"] = all(
        figures[k]["difference_s"] <= 1.0 for k in ("warm", "cold", "cold_server")
    ) and all(v["noop_wall_s"] <= 1.0 for v in figures["shell"].values())
    for tiles, shell_figures in figures["shell"].items():
        log(
            f"shell no-op re-run of {tiles} tiles: {shell_figures['noop_wall_s']} s wall"
            f" (verify {shell_figures['verify_wall_s']} s)"
        )
    log(
        f"no-op of {figures['warm']['tiles']} tiles: warm +{figures['warm']['difference_s']} s,"
        f" cold +{figures['cold']['difference_s']} s (temporary API),"
        f" +{figures['cold_server']['difference_s']} s (prefect server) over an empty flow;"
        f" CPU +{figures['cold']['cpu_difference_s']} s (temporary API),"
        f" +{figures['cold_server']['cpu_difference_s']} s (prefect server)"
    )
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
