"""Refusing a continent: ``prepare --dry-run --max-tiles`` on a plan 2,000 km a side.

    python benchmarks/refuse_continent.py [--zoom 17] [--max-tiles 50000]
        [--src PATH] [--limit-s 120] [--limit-gb 8]

Writes a QGroundControl plan whose survey polygon spans about 2,000 by 2,200 km
(southern Europe), and a 1 km one for the start-up's share, then runs
``takeoff-cache prepare --plan ... --dry-run --max-tiles N --json`` on each in a
fresh process and prints its exit code, wall and CPU time and peak RSS (the
children's ``getrusage``). ``--src`` runs another checkout's
``src`` folder (an older commit exported with ``git archive``) for a before/after
figure; ``--limit-s`` and ``--limit-gb`` (an address-space limit) stop a run that
would list every tile. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


CONTINENT = [[36.0, -9.0], [36.0, 16.0], [54.0, 16.0], [54.0, -9.0]]
SMALL = [[45.0, 3.0], [45.0, 3.01], [45.01, 3.01], [45.01, 3.0]]  # 1 km: the start-up's cost


def continent_plan(path: Path, ring: list[list[float]] = CONTINENT) -> None:
    survey = {
        "type": "ComplexItem",
        "complexItemType": "survey",
        "polygon": ring,
        "TransectStyleComplexItem": {"Items": []},
    }
    plan = {
        "fileType": "Plan",
        "version": 1,
        "mission": {"items": [survey], "plannedHomePosition": [45.0, 3.0, 100.0]},
    }
    path.write_text(json.dumps(plan))


def run(src: Path, plan: Path, work: Path, args: argparse.Namespace) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    limit = int(args.limit_gb * (1 << 30))

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    argv = [
        sys.executable, "-m", "takeoff_cache.cli.main", "prepare", "--plan", str(plan),
        "--zoom", str(args.zoom), "--max-tiles", str(args.max_tiles), "--dry-run",
        "--work-dir", str(work), "--json",
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limits
    )
    try:
        out, err = proc.communicate(timeout=args.limit_s)
        stopped = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        stopped = True
    seconds = time.perf_counter() - started
    # communicate() reaped it: the children's usage now holds its CPU time and its
    # peak RSS (KiB on Linux; the largest of this script's children, run one by one
    # from the smallest plan up).
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    peak_kib = after.ru_maxrss
    lines = err.decode(errors="replace").strip().splitlines()
    return {
        "exit": proc.returncode,
        "stopped_at_limit": stopped,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "peak_rss_mb": round(peak_kib / 1024, 1),
        "stderr_last": lines[-1][:200] if lines else "",
        "stdout_bytes": len(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoom", type=int, default=17)
    parser.add_argument("--max-tiles", type=int, default=50_000)
    parser.add_argument("--src", type=Path, default=ROOT / "src")
    parser.add_argument("--limit-s", type=float, default=120.0)
    parser.add_argument("--limit-gb", type=float, default=8.0)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ring in (("small", SMALL), ("continent", CONTINENT)):
            plan = Path(tmp) / f"{name}.plan"
            continent_plan(plan, ring)
            results[name] = run(args.src.resolve(), plan, Path(tmp) / name, args)
    print(f"source:      {args.src}")
    print(f"plans:       small 1 km; continent 36..54 N, 9 W..16 E; z{args.zoom},"
          f" --max-tiles {args.max_tiles}")  # fmt: skip
    for name, result in results.items():
        stopped = " (stopped at the limit)" if result["stopped_at_limit"] else ""
        print(f"{name}:")
        print(f"  exit:      {result['exit']}{stopped}")
        print(f"  wall time: {result['seconds']} s, CPU {result['cpu_seconds']} s")
        print(f"  peak RSS:  {result['peak_rss_mb']} MB")
        print(f"  last line: {result['stderr_last']}")
    print(json.dumps({"benchmark": "refuse_continent", "zoom": args.zoom, **results}))


if __name__ == "__main__":
    main()
