"""Self-test benchmark: its cost against a cold demo build, and recall by view scale and rotation.

    python benchmarks/self_test.py [--tiles 320] [--views 200] [--data DIR] [--repeat 3]

Makes the demo inputs and a copy whose place-recognition backbone is the
deliberately weak one, and builds both cold (fresh work folder, empty cache
root) with ``takeoff-cache build`` in a fresh process, as an operator runs
it. Then, per backbone:

- the self-test as a build runs it (``--views`` views seeded by the build
  identity, every perturbation on), timed ``--repeat`` times: its median
  seconds as a share of the cold build's wall time (the process, Prefect's
  temporary API included) and of the build's own ``elapsed_s``; and the cold
  build's own ``self_test`` phase (engine and index loading and the map
  included) as a share of both (``within_target``: of the wall time);
- Recall@1 / Recall@5 for views at one scale and one rotation (either sign),
  with the other perturbations as in the self-test: a table.

Ends with one JSON line of figures.

Measured (320 tiles, 200 views, 2 shared cores under load): the demo backbone,
heading-invariant histograms, Recall@1 0.77, Recall@5 0.925, median error 59 m
at any heading (0.77 / 0.90 / 52 m with the heading known to 15 degrees), flat
across rotation; 0.85 / 0.94 at scale 0.85-1.0, 0.53-0.65 / 0.78-0.88 at the
ends of the range (a z17 view at 0.7 looks like its z16 parent at 1.4). The
weak backbone: 0.075 / 0.225 / 1338 m. The cold build's own self_test phase
took 1.2-2.3 s: 6-7% of its wall time (19-34 s, most of it the process start and
Prefect's temporary API), within the 10% target, but 38-41% of its elapsed_s
(3.1-5.7 s), which the target is not met against on a corpus this small. The
north-up Gabor grid the demo used before reached 0.145 / 0.275 / 1366 m at any
heading, 0.525 with the heading known.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")

from takeoff_cache.demo import make_demo_data  # noqa: E402
from takeoff_cache.demo.models import build_weak_vpr_model  # noqa: E402
from takeoff_cache.localize.locate import Localizer, open_localizer  # noqa: E402
from takeoff_cache.localize.selftest import (  # noqa: E402
    SelfTestResult,
    ViewJitter,
    draw_views,
    evaluate_views,
    run_self_test,
)
from takeoff_cache.trust.keys import load_trust_store  # noqa: E402
from takeoff_cache.trust.verify import verify_cache  # noqa: E402

SCALES = (0.7, 0.85, 1.0, 1.2, 1.4)
ROTATIONS = (0, 10, 20, 45, 90, 180)
TARGET_SHARE = 0.10


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def cold_build(root: Path) -> dict[str, Any]:
    """``takeoff-cache build`` in a fresh process, fresh work folder and empty cache root."""
    shutil.rmtree(root / "work", ignore_errors=True)
    shutil.rmtree(root / "cache", ignore_errors=True)
    (root / "cache").mkdir()
    cmd = [
        sys.executable,
        "-m",
        "takeoff_cache.cli.main",
        "build",
        "--request",
        str(root / "request.toml"),
        "--work-dir",
        str(root / "work"),
        "--json",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"cold build failed ({proc.returncode}): {proc.stderr[-500:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "wall_s": round(wall, 3),
        "elapsed_s": report["elapsed_s"],
        "descriptors_s": report["phases"]["descriptors"],
        "self_test_phase_s": report["phases"]["self_test"],
        "tiles": report["tiles"],
    }


def opened(root: Path) -> tuple[str, Localizer]:
    manifest = verify_cache(root / "cache", load_trust_store(root / "trust"))
    return manifest.build_identity, open_localizer(root / "cache", manifest)


def figures_of(result: SelfTestResult) -> dict[str, float]:
    return {
        "recall_at_1": round(result.recall_at_1, 3),
        "recall_at_5": round(result.recall_at_5, 3),
        "median_error_m": round(result.median_error_m, 1),
    }


def table(localizer: Localizer, corpus: Path, seed: str, views: int) -> dict[str, Any]:
    """Recall at each (scale, rotation), the other perturbations drawn as in the self-test."""
    base = draw_views(localizer.tiles, views, seed, ViewJitter())
    cells: dict[str, Any] = {}
    for scale in SCALES:
        for rotation in ROTATIONS:
            fixed = [
                dataclasses.replace(v, scale=scale, rotation_deg=rotation if i % 2 else -rotation)
                for i, v in enumerate(base)
            ]
            result = evaluate_views(localizer, corpus, fixed)
            cells[f"{scale}/{rotation}"] = [
                round(result.recall_at_1, 2),
                round(result.recall_at_5, 2),
            ]
    return cells


def print_table(name: str, cells: dict[str, Any]) -> None:
    log(f"\n{name}: Recall@1 / Recall@5 by scale (rows) and rotation in degrees (columns)")
    log("scale  " + "".join(f"{r:>12}" for r in ROTATIONS))
    for scale in SCALES:
        row = "".join(
            f"{cells[f'{scale}/{r}'][0]:>7.2f}/{cells[f'{scale}/{r}'][1]:.2f}" for r in ROTATIONS
        )
        log(f"{scale:<6} {row}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=320)
    parser.add_argument("--views", type=int, default=200)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    data = args.data or Path(tempfile.mkdtemp(prefix="self-test-bench-"))
    demo = make_demo_data(data / "demo", tiles=args.tiles, seed=0).root
    weak = data / "weak"
    if not weak.exists():
        shutil.copytree(demo, weak)
        build_weak_vpr_model(weak / "models" / "weak.onnx")
        toml = weak / "backbones.toml"
        toml.write_text(toml.read_text().replace("models/vpr.onnx", "models/weak.onnx"))
    figures: dict[str, Any] = {"benchmark": "self_test", "views": args.views}
    figures["load_before"] = round(os.getloadavg()[0], 2)
    for name, root in (("demo", demo), ("weak", weak)):
        log(f"{name}: cold build ...")
        build = cold_build(root)
        seed, localizer = opened(root)
        corpus = root / "corpus.mbtiles"
        runs = [
            run_self_test(localizer, corpus, k=args.views, seed=seed) for _ in range(args.repeat)
        ]
        seconds = statistics.median(r.seconds for r in runs)
        entry: dict[str, Any] = {
            "cold_build": build,
            "self_test_s": round(seconds, 3),
            "share_of_cold_build_wall": round(seconds / build["wall_s"], 4),
            "share_of_build_elapsed": round(seconds / build["elapsed_s"], 4),
            "phase_share_of_cold_build_wall": round(
                build["self_test_phase_s"] / build["wall_s"], 4
            ),
            "phase_share_of_build_elapsed": round(
                build["self_test_phase_s"] / build["elapsed_s"], 4
            ),
            **figures_of(runs[0]),
            "heading_within_15deg": figures_of(
                run_self_test(
                    localizer,
                    corpus,
                    k=args.views,
                    seed=seed,
                    jitter=ViewJitter(max_rotation_deg=15.0),
                )
            ),
        }
        log(f"{name}: scale x rotation table ...")
        entry["table"] = table(localizer, corpus, seed, args.views)
        print_table(name, entry["table"])
        log(
            f"{name}: Recall@1 {entry['recall_at_1']}, Recall@5 {entry['recall_at_5']},"
            f" median error {entry['median_error_m']} m; self-test {entry['self_test_s']} s ="
            f" {entry['share_of_cold_build_wall']:.1%} of the cold build's"
            f" {build['wall_s']} s wall ({entry['share_of_build_elapsed']:.0%} of its"
            f" {build['elapsed_s']} s elapsed_s); the build's own self_test phase"
            f" {build['self_test_phase_s']} s = {entry['phase_share_of_cold_build_wall']:.1%}"
            f" of its wall, {entry['phase_share_of_build_elapsed']:.0%} of its elapsed_s"
        )
        figures[name] = entry
    figures["target_share"] = TARGET_SHARE
    # What the build itself pays for its self-test, against the wall time an operator
    # waits and against the build's own work (no process start, no Prefect API).
    figures["within_target"] = figures["demo"]["phase_share_of_cold_build_wall"] <= TARGET_SHARE
    figures["within_target_of_elapsed"] = (
        figures["demo"]["phase_share_of_build_elapsed"] <= TARGET_SHARE
    )
    figures["load_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
