"""Download benchmark: download_tiles against a plain concurrent fetch of the same URLs.

    python benchmarks/download.py [--tiles 2000] [--repeat 5] [--concurrency 4]

A tile server (tests/support/tileserver.py: demo JPEG tiles, each its own bytes) runs
in a process of its own on 127.0.0.1, so it does not share this process's GIL.
Then, alternating, ``--repeat`` times each:

- plain: one httpx.Client (the same limits and headers download_tiles uses)
  and a pool of ``--concurrency`` threads GETting every URL and reading its body;
- download: :func:`takeoff_cache.prepare.download.download_tiles` into a new MBTiles,
  with everything it adds: the body check and SHA-256 (in its checker process,
  started inside the timed run), the writes, commits and checkpoints.

The ratio (target >= 0.8) is the median over the runs of download tiles/s ÷ the
plain tiles/s of the run just before it: pairs close in time see the same load
on a shared host. Beside it, the ratio of the two medians, and each arm's CPU
milliseconds per tile, this process's and its children's (the checker) together.
Then, for a sample 20 km corridor flight (100 m swath, 500 m buffer) at
zoom 17, the tiles of its area against those of its bounding box.
Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from pyproj import Geod

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from takeoff_cache import USER_AGENT  # noqa: E402
from takeoff_cache.core.tilemath import tile_range  # noqa: E402
from takeoff_cache.prepare.area import flight_area  # noqa: E402
from takeoff_cache.prepare.download import DownloadOptions, download_tiles  # noqa: E402
from takeoff_cache.prepare.flight import Corridor, Flight  # noqa: E402
from takeoff_cache.prepare.tileserver import TileSource  # noqa: E402
from takeoff_cache.tiles.area import tiles_for_area  # noqa: E402

_SERVER = """
import sys, time
sys.path[:0] = sys.argv[1:3]
from tests.support.tileserver import tile_server
with tile_server() as server:
    print(server.port, flush=True)
    while True:
        time.sleep(3600)
"""


def cpu_s() -> float:
    """CPU seconds of this process and of its children that have exited."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def plain_fetch(urls: list[str], concurrency: int) -> float:
    """Seconds to GET every URL with one client and ``concurrency`` threads.

    The client's creation is timed too, as download_tiles's own is."""
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(
        headers={"User-Agent": USER_AGENT}, timeout=15.0, limits=limits, follow_redirects=True
    ) as client:

        def get(url: str) -> int:
            response = client.get(url)
            response.raise_for_status()
            return len(response.content)

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            total = sum(pool.map(get, urls))
        seconds = time.perf_counter() - start
    assert total > 0
    return seconds


def corridor_figures() -> dict[str, float | int]:
    geod = Geod(ellps="WGS84")
    lat, lon = 48.40, 35.00
    lon2, lat2, _ = geod.fwd(lon, lat, 45.0, 20_000.0)
    flight = Flight(
        None, "sample corridor", corridors=(Corridor(((lat, lon), (lat2, lon2)), 100.0),)
    )
    area = flight_area(flight, buffer_m=500.0)
    start = time.perf_counter()
    tiles = tiles_for_area(area.geojson, [17])
    select_s = time.perf_counter() - start
    x0, x1, y0, y1 = tile_range(area.bbox, 17)
    bbox_tiles = (x1 - x0 + 1) * (y1 - y0 + 1)
    return {
        "corridor_km2": round(area.km2, 2),
        "corridor_tiles_z17": len(tiles),
        "corridor_bbox_tiles_z17": bbox_tiles,
        "corridor_tiles_over_bbox": round(len(tiles) / bbox_tiles, 3),
        "corridor_select_ms": round(select_s * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    side = int(args.tiles**0.5) + 1
    tiles = sorted((17, 78_000 + i, 44_000 + j) for i in range(side) for j in range(side))
    tiles = tiles[: args.tiles]
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(ROOT / "src"), str(ROOT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        source = TileSource(f"http://127.0.0.1:{port}/tiles/{{z}}/{{x}}/{{y}}.jpg")
        urls = [source.url(*t) for t in tiles]
        options = DownloadOptions(concurrency=args.concurrency)
        plain_fetch(urls[:200], args.concurrency)  # the server renders its few base tiles once
        plain: list[float] = []
        ours: list[float] = []
        plain_cpu: list[float] = []
        ours_cpu: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.repeat):
                cpu = cpu_s()
                plain.append(len(urls) / plain_fetch(urls, args.concurrency))
                plain_cpu.append((cpu_s() - cpu) / len(urls) * 1000)
                cpu = cpu_s()
                result = download_tiles(Path(tmp) / f"run{i}.mbtiles", tiles, source, options)
                ours_cpu.append((cpu_s() - cpu) / len(urls) * 1000)
                assert result.fetched == len(tiles), result.to_json()
                ours.append(result.tiles_per_s)
                print(
                    f"run {i + 1}: plain {plain[-1]:.0f} tiles/s, download {ours[-1]:.0f} tiles/s"
                    f" ({ours[-1] / plain[-1]:.3f})",
                    file=sys.stderr,
                )
    finally:
        server.kill()
        server.wait()
    figures: dict[str, float | int] = {
        "tiles": len(tiles),
        "concurrency": args.concurrency,
        "plain_tiles_per_s": round(statistics.median(plain), 1),
        "download_tiles_per_s": round(statistics.median(ours), 1),
        "ratio": round(statistics.median(o / p for o, p in zip(ours, plain, strict=True)), 3),
        "ratio_of_medians": round(statistics.median(ours) / statistics.median(plain), 3),
        # CPU per tile of this process and the checker (the server, a child too, is
        # reaped only at the end): the cost of the checks and writes, less sensitive
        # to other load on the host than tiles/s.
        "plain_cpu_ms_per_tile": round(statistics.median(plain_cpu), 3),
        "download_cpu_ms_per_tile": round(statistics.median(ours_cpu), 3),
    }
    figures.update(corridor_figures())
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
