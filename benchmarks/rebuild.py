"""Whole-build rebuild benchmark: what a 1% tile change costs, self-test included.

    python benchmarks/rebuild.py [--tiles 5000] [--rounds 3] [--data DIR] [--tmp DIR]

A cold build of the demo corpus (fresh work folder, empty cache root), then
``--rounds`` rounds of 1% of the selected tiles given new bytes (another
world's pixels, as ``benchmarks/embed.py`` does) and a rebuild, all in this
process through the Prefect flow, as a long-running worker runs them, with
the default self-test (200 views). Reports the whole build's ``elapsed_s``
of the median rebuild over the cold build's (the target: 10% or less), each
phase's median seconds in the rebuilds and its share, and how many of the
self-test's views the rebuilds re-embedded.

Ends with one JSON line holding every figure. Run it on an older checkout
(its ``src``, ``tasks`` and ``flows`` on ``sys.path`` first) to compare.

Measured on a 2-core host shared with other work (5,120 tiles, 3 rounds of 51
tiles changed, medians), before and after views reused their embeddings, in
three pairs run back to back (the host's load average in brackets):

| pair | before: rebuild / cold | self_test | after: rebuild / cold | self_test |
|---|---|---|---|---|
| 1 (16-22) | 11.33 / 64.63 s = 17.5% | 5.57 s | 11.60 / 85.49 s = 13.6% | 3.99 s |
| 2 (5-16) | 4.67 / 22.85 s = 20.4% | 2.47 s | 5.50 / 37.17 s = 14.8% | 1.71 s |
| 3 (3-5) | 5.58 / 20.55 s = 27.2% | 2.63 s | 3.34 / 20.73 s = 16.1% | 1.04 s |

Before, the self_test phase was about half of a rebuild (every one of 200
views rendered and embedded again); after, 172-185 views of 200 are reused
(the rest lie over a changed tile) and it is about a third: in pair 3, 1.04 s
of 3.34 s, then readiness 0.62 s, descriptors 0.35 s. What the phase still
spends is mostly fixed: loading the engine, drawing the coverage map for
5,120 tiles, and reading the reused embeddings and querying 200 views 64
deep for the confidence rule (0.4 s with ~20 views rendered, under load).

The 10% target was not met then: the rebuild's fixed costs (the front, the
engine load, readiness, the map, the commit) stay while the cold build's grow
with the tiles.

Then local features came (issue 33): every build extracts them and registers
50 of the self-test's views. Their extraction made the cold build about four
times as long (features 60-100 s of it), and the registered self-test, which
registered all 50 views on every build, made the rebuild's self_test phase
about 9 s. With the registered outcomes kept in the work folder, checked on
recall against the tiles they read and the ranking they used
(localize/registered.py), a rebuild registers 13-14 of them again. Same host,
same command, load 2-5, medians of 3 rebuilds:

| | rebuild / cold | self_test | registered kept | features |
|---|---|---|---|---|
| every view registered again | 12.7 / 122.5 s = 10.4% | 9.05 s | 0 of 50 | 2.50 s |
| outcomes kept (key held every tile retrieved) | 8.3 / 79.8 s = 10.4% | 3.94 s | 27-31 | 2.33 s |
| outcomes kept, ranking and tiles read checked | 7.9 / 83.8 s = 9.5% | 3.97 s | 36-37 | 2.34 s |

What a rebuild now spends is the self-test's changed views (a quarter of a
second each to register, under this load), writing the features file for
every tile (143 MB) and extracting the changed tiles' features.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # flows/ and tasks/ sit beside src/
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
# Prefect's temporary API starts once, before the cold build; a loaded host needs longer
# than its default 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import numpy as np  # noqa: E402

from takeoff_cache.build.request import read_request_file  # noqa: E402
from takeoff_cache.demo import DemoInputs, make_demo_data  # noqa: E402
from takeoff_cache.demo.synthetic import encode_jpeg, render_tile, replace_tile_bytes  # noqa: E402


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def build(demo: DemoInputs, work: Path) -> dict[str, Any]:
    """One build in this process, through the flow."""
    from takeoff_cache_prefect.flows.build import build_cache

    raw = read_request_file(demo.request)
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in raw.items() if v is not None}
    report: dict[str, Any] = build_cache(**params, work_dir=str(work))
    if report.get("outcome") != "success":
        raise SystemExit(f"build failed: {report.get('failure_reason')}")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiles", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "takeoff-bench")
    p.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: system tmp)")
    args = p.parse_args()

    src = make_demo_data(args.data / f"{args.tiles}", tiles=args.tiles)
    with tempfile.TemporaryDirectory(prefix="rebuild-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        root = Path(shutil.copytree(src.root, tmp / "demo"))
        demo = make_demo_data(root, tiles=args.tiles)
        for entry in (root / "cache").iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        log(f"cold build of {src.tile_count} tiles ...")
        t0 = time.perf_counter()
        cold = build(demo, tmp / "work")
        log(f"    {cold['elapsed_s']:.2f} s (wall {time.perf_counter() - t0:.2f} s)")
        rows = json.loads(next((root / "cache" / "index").glob("*.tiles.json")).read_text())["rows"]
        count = max(1, len(rows) // 100)
        picks = np.random.default_rng(1).permutation(len(rows))
        warms = []
        for round_ in range(args.rounds):
            for i in picks[round_ * count : (round_ + 1) * count]:
                z, x, y = rows[int(i)]
                data = encode_jpeg(render_tile(z, x, y, 12345 + round_))
                replace_tile_bytes(demo.corpus, z, x, y, data)
            warm = build(demo, tmp / "work")
            warms.append(warm)
            test = warm.get("self_test") or {}
            reg = test.get("registered") or {}
            log(
                f"    rebuild {round_ + 1}: {count} tiles changed, {warm['elapsed_s']:.3f} s;"
                f" descriptors {warm['phases']['descriptors']:.3f} s, self_test"
                f" {warm['phases'].get('self_test', 0.0):.3f} s"
                f" ({test.get('views_reused', 'no')} views reused of {test.get('k')};"
                f" registered {reg.get('seconds', 0.0):.3f} s,"
                f" {reg.get('views_reused', 'no')} kept of {reg.get('k')})"
            )
    rebuild_s = statistics.median(w["elapsed_s"] for w in warms)
    ratio = rebuild_s / cold["elapsed_s"]
    names = sorted({name for w in warms for name in w["phases"]})
    phases = {name: statistics.median(w["phases"].get(name, 0.0) for w in warms) for name in names}
    log(f"whole build: rebuild {rebuild_s:.3f} s / cold {cold['elapsed_s']:.3f} s = {ratio:.1%}")
    log("rebuild phases (median s, share of the rebuild):")
    for name, seconds in sorted(phases.items(), key=lambda item: -item[1]):
        log(f"    {name:<12} {seconds:7.3f}  {seconds / rebuild_s:6.1%}")
    views = [(w.get("self_test") or {}).get("views_reused") for w in warms]
    kept = [((w.get("self_test") or {}).get("registered") or {}).get("views_reused") for w in warms]
    print(
        json.dumps(
            {
                "tiles": cold["tiles"],
                "changed": count,
                "cold_elapsed_s": cold["elapsed_s"],
                "cold_phases": cold["phases"],
                "rebuild_elapsed_s": [w["elapsed_s"] for w in warms],
                "rebuild_phases_median_s": {k: round(v, 4) for k, v in phases.items()},
                "ratio": round(ratio, 4),
                "within_target": ratio <= 0.10,
                "views": (cold.get("self_test") or {}).get("k"),
                "views_reused": views,
                "registered_views_kept": kept,
                "descriptors_generated": [w["descriptors_generated"] for w in warms],
            }
        )
    )


if __name__ == "__main__":
    main()
