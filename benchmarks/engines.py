"""Engine phase: cold compile vs warm reuse for the demo backbones.

Cold: an empty engine store, so every backbone is compiled (ONNX Runtime
graph optimization, or TensorRT build on an NVIDIA host). Warm: the same
request again; the store's digest check is all the work. Prints a table and
ends with one JSON line of the figures.

    .venv/bin/python benchmarks/engines.py [--repeat 5] [--precision fp32|int8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from takeoff_cache.backbones.file import load_backbones
from takeoff_cache.build.request import read_request_file
from takeoff_cache.core.fsutil import sha256_file
from takeoff_cache.demo import make_demo_data
from takeoff_cache.engines import get_backend
from takeoff_cache.engines.calibration import write_calibration
from takeoff_cache.engines.store import ensure_engine
from takeoff_cache.tiles.corpus import select_tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        root = Path(tmp)
        inputs = make_demo_data(root / "demo", tiles=60)
        backbones = load_backbones(inputs.backbones)
        backend = get_backend(args.backend)
        calibration, calib_sha = None, None
        if args.precision == "int8":
            req = read_request_file(inputs.request)
            selection = select_tiles(
                Path(req["corpus"]), tuple(req["bbox"]), tuple(req["zoom_levels"])
            )
            calibration = root / "calib.npz"
            write_calibration(calibration, selection, Path(req["corpus"]), 32)
            calib_sha = sha256_file(calibration)

        cold: dict[str, list[float]] = {b.name: [] for b in backbones}
        warm: dict[str, list[float]] = {b.name: [] for b in backbones}
        for i in range(args.repeat):
            work = root / f"work-{i}"
            for store_state, times in (("cold", cold), ("warm", warm)):
                for backbone in backbones:
                    start = time.perf_counter()
                    record = ensure_engine(
                        backbone, backend, args.precision, calibration, calib_sha, work
                    )
                    times[backbone.name].append(time.perf_counter() - start)
                    if record.built != (store_state == "cold"):
                        raise SystemExit(f"{backbone.name}: expected a {store_state} run")

    figures: dict[str, dict[str, float]] = {}
    print(
        f"backend {backend.name} {backend.version}, precision {args.precision},"
        f" median of {args.repeat}"
    )
    print(f"{'backbone':<12}{'cold compile s':>16}{'warm reuse s':>14}{'ratio':>10}")
    for name in cold:
        c, w = statistics.median(cold[name]), statistics.median(warm[name])
        figures[name] = {"cold_s": round(c, 4), "warm_s": round(w, 5), "ratio": round(c / w, 1)}
        print(f"{name:<12}{c:>16.3f}{w:>14.4f}{c / w:>9.0f}x")
    total_c = sum(statistics.median(v) for v in cold.values())
    total_w = sum(statistics.median(v) for v in warm.values())
    print(f"{'all':<12}{total_c:>16.3f}{total_w:>14.4f}{total_c / total_w:>9.0f}x")
    print(
        json.dumps(
            {
                "benchmark": "engines",
                "backend": backend.name,
                "precision": args.precision,
                "repeat": args.repeat,
                "backbones": figures,
                "cold_s": round(total_c, 4),
                "warm_s": round(total_w, 5),
                "ratio": round(total_c / total_w, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
