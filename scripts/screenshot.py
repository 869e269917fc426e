"""Screenshots of real build-cache runs in the Prefect UI, for docs/img/.

Needs the stack of ``make server`` (server, deployments, worker) at
PREFECT_API_URL (default http://127.0.0.1:4200/api) and a Chromium
(Debian: ``apt-get install -y chromium``; or set CHROMIUM). It

1. makes demo inputs with --tiles tiles and starts build-cache on them with
   an empty work folder, so every descriptor is computed;
2. while descriptors are computed, samples the progress artifact through the
   API and photographs it mid-way;
3. photographs the finished run (graph and list of the phase task runs),
   its artifacts tab and the build report artifact;
4. starts build-cache on a cache root that does not exist and photographs the
   failed run's details with its state message (the reason);
5. gives one tile new bytes, runs watch-corpus, and photographs the
   takeoff-cache.corpus.changed event and the build run its trigger started.

    .venv/bin/python scripts/screenshot.py --out docs/img
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from takeoff_cache.build.request import read_request_file
from takeoff_cache.demo import make_demo_data
from takeoff_cache.demo.synthetic import encode_jpeg, render_tile, replace_tile_bytes
from takeoff_cache.tiles.corpus import select_tiles

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
MAX_PNG_BYTES = 500_000


class Ui:
    def __init__(self, api_url: str, out: Path, chromium: str) -> None:
        self.api = httpx.Client(base_url=api_url, timeout=30)
        self.ui = api_url.removesuffix("/api")
        self.out = out
        self.chromium = chromium

    def post(self, path: str, body: dict[str, Any]) -> Any:
        response = self.api.post(path, json=body)
        response.raise_for_status()
        return response.json()

    def run_build(self, parameters: dict[str, Any], name: str = "build-cache/build-cache") -> str:
        deployment = self.api.get(f"/deployments/name/{name}")
        deployment.raise_for_status()
        run = self.post(
            f"/deployments/{deployment.json()['id']}/create_flow_run", {"parameters": parameters}
        )
        return str(run["id"])

    def flow_run(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self.api.get(f"/flow_runs/{run_id}").json()
        return run

    def wait(self, run_id: str, timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (run := self.flow_run(run_id))["state"]["type"] not in TERMINAL:
            if time.monotonic() > deadline:
                raise SystemExit(f"screenshot: run {run_id} not finished after {timeout} s")
            time.sleep(0.5)
        return run

    def artifacts(self, run_id: str, kind: str) -> list[dict[str, Any]]:
        body = {"artifacts": {"flow_run_id": {"any_": [run_id]}, "type": {"any_": [kind]}}}
        found: list[dict[str, Any]] = self.post("/artifacts/filter", body)
        return found

    def shoot(self, name: str, path: str, wait: bool = True) -> subprocess.Popen[bytes]:
        """Photograph ``path`` of the UI into out/name.png (converted to a small PNG later)."""
        profile = tempfile.mkdtemp(prefix="takeoff-cache-chromium-")
        argv = [
            self.chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            # No calls home: component updates, sync, field trials, safe browsing lists.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--window-size=1600,1000",
            "--virtual-time-budget=15000",
            f"--screenshot={self.out / (name + '.raw.png')}",
            f"{self.ui}{path}",
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait:
            proc.wait()
        return proc


def shrink(raw: Path, dest: Path) -> int:
    """A palette PNG of the screenshot: UI pages have few colours, so this stays legible."""
    image = Image.open(raw).convert("RGB")
    palette = image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    palette.save(buf, format="PNG", optimize=True)
    if buf.tell() > MAX_PNG_BYTES:
        raise SystemExit(f"screenshot: {dest.name} is {buf.tell()} bytes even as a palette PNG")
    dest.write_bytes(buf.getvalue())
    raw.unlink()
    return len(buf.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--tiles", type=int, default=1500, help="demo corpus size")
    args = parser.parse_args()
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not chromium:
        print("screenshot: no chromium; apt-get install -y chromium", file=sys.stderr)
        return 2
    api_url = os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    args.out.mkdir(parents=True, exist_ok=True)
    ui = Ui(api_url, args.out, chromium)
    try:
        ui.api.get("/health").raise_for_status()
    except httpx.HTTPError as exc:
        print(
            f"screenshot: no Prefect server at {api_url} ({exc}); run make server", file=sys.stderr
        )
        return 2

    with tempfile.TemporaryDirectory(prefix="takeoff-cache-shots-") as tmp:
        inputs = make_demo_data(Path(tmp) / "demo", tiles=args.tiles, seed=3)
        params = {**read_request_file(inputs.request), "work_dir": str(Path(tmp) / "work")}
        run_id = ui.run_build(params)
        print(f"build-cache run {run_id}: {ui.ui}/runs/flow-run/{run_id}")

        samples: list[float] = []
        camera: subprocess.Popen[bytes] | None = None
        while ui.flow_run(run_id)["state"]["type"] not in TERMINAL:
            progress = ui.artifacts(run_id, "progress")
            if progress:
                value = float(progress[0]["data"])
                if not samples or value != samples[-1]:
                    samples.append(value)
                if camera is None and 5.0 <= value <= 60.0:
                    camera = ui.shoot(
                        "progress", f"/v2/artifacts/artifact/{progress[0]['id']}", False
                    )
            time.sleep(0.25)
        if camera is not None:
            camera.wait()
        run = ui.wait(run_id)
        print(f"  state {run['state']['name']}; progress seen: {samples}")
        ui.shoot("flow-run", f"/v2/runs/flow-run/{run_id}?tab=TaskRuns")
        ui.shoot("flow-run-artifacts", f"/v2/runs/flow-run/{run_id}?tab=Artifacts")
        report = ui.artifacts(run_id, "markdown")[0]
        ui.shoot("build-report", f"/v2/artifacts/artifact/{report['id']}")

        failing = {**params, "cache_root": str(Path(tmp) / "no-such-cache")}
        failed_id = ui.run_build(failing)
        failed = ui.wait(failed_id)
        print(f"failed run {failed_id}: {failed['state']['name']}: {failed['state']['message']}")
        ui.shoot("failed-run", f"/v2/runs/flow-run/{failed_id}?tab=Details")

        selection = select_tiles(inputs.corpus, tuple(params["bbox"]), tuple(params["zoom_levels"]))
        tile = selection.tiles[-1]
        new_bytes = encode_jpeg(render_tile(tile.z, tile.x, tile.y, seed=99))
        replace_tile_bytes(inputs.corpus, tile.z, tile.x, tile.y, new_bytes)
        watcher = ui.wait(ui.run_build(params, "watch-corpus/watch-corpus"))
        print(f"watcher run {watcher['id']}: {watcher['state']['name']} after changing {tile.zxy}")
        body = {"filter": {"event": {"name": ["takeoff-cache.corpus.changed"]}}, "limit": 1}
        deadline = time.monotonic() + 120
        while True:
            events = ui.post("/events/filter", body)["events"]
            runs = ui.post("/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 20})
            triggered = [
                r
                for r in runs
                if (r.get("created_by") or {}).get("type") == "AUTOMATION"
                and r["parameters"].get("cache_root") == params["cache_root"]
            ]
            if events and triggered:
                break
            if time.monotonic() > deadline:
                raise SystemExit("screenshot: the corpus change started no build")
            time.sleep(0.5)
        event = events[0]
        ui.shoot("corpus-changed-event", f"/v2/events/event/{event['occurred'][:10]}/{event['id']}")
        rebuilt = ui.wait(triggered[0]["id"])
        print(f"triggered build {rebuilt['id']}: {rebuilt['state']['name']}")
        ui.shoot("triggered-run", f"/v2/runs/flow-run/{rebuilt['id']}?tab=Details")

    for raw in sorted(args.out.glob("*.raw.png")):
        dest = raw.with_name(raw.name.replace(".raw.png", ".png"))
        print(f"{dest}: {shrink(raw, dest)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
