"""Descriptor phase benchmark: throughput, incremental rebuilds, peak memory, index recall.

    python benchmarks/embed.py [--tiles 5000] [--data DIR] [--only pipeline,incremental,...]

Sections (all by default):

- pipeline: tiles/s of (a) the raw engine on pre-decoded, pre-normalized
  batches — the limit; (b) the descriptor phase (``embed_tiles`` into a fresh
  store: corpus reads, decoding, inference, store writes) and ``write_index``;
  (c) a naive loop that reads, decodes, normalizes and infers one tile at a
  time. Prints where the time goes, per stage, and the sweeps over decode
  workers and batch size.
- incremental: a real build (the Prefect flow through the CLI), then 1% of
  the tiles changed and a rebuild: descriptors generated == tiles changed and
  the descriptor phase's time as a share of the cold one.
- memory: peak RSS of whole cold builds in a child process, for ``--tiles``
  and ``--big-tiles`` tiles, and their ratio net of the index.
- index: the approximate index on the big corpus: recall@1 against exact
  search on held-out queries, nprobe, build time.

Demo corpora are generated once into ``--data`` and reused. Ends with one
JSON line holding every figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # flows/ and tasks/ sit beside src/

from takeoff_cache import corpus as corpus_mod  # noqa: E402
from takeoff_cache import descriptors  # noqa: E402
from takeoff_cache.backbones import Backbone, load_backbones, place_recognition  # noqa: E402
from takeoff_cache.demo import DemoInputs, make_demo_data  # noqa: E402
from takeoff_cache.engines import Runner, get_backend  # noqa: E402
from takeoff_cache.engines.store import ensure_engine  # noqa: E402
from takeoff_cache.preprocess import Normalizer, decode_tile  # noqa: E402
from takeoff_cache.request import parse_request, read_request_file  # noqa: E402

Timed = Callable[[], Any]


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def best_of(repeat: int, fn: Timed) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), times


def load_avg() -> float:
    return os.getloadavg()[0]


class Setup:
    """A demo corpus, its selection and the compiled demo VPR engine."""

    def __init__(self, data: Path, tiles: int, work: Path) -> None:
        started = time.perf_counter()
        self.demo: DemoInputs = make_demo_data(data, tiles=tiles)
        took = time.perf_counter() - started
        log(f"demo data {data}: {self.demo.tile_count} tiles ({took:.1f} s)")
        raw = read_request_file(self.demo.request)
        self.request = parse_request(raw)
        self.selection = corpus_mod.select_tiles(
            self.request.corpus, self.request.bbox.as_tuple(), self.request.zoom_levels
        )
        self.backbone: Backbone = place_recognition(load_backbones(self.request.backbones))
        self.backend = get_backend("onnxruntime")
        self.record = ensure_engine(self.backbone, self.backend, "fp32", None, None, work)
        self.space = descriptors.descriptor_space(self.record.key, self.backbone.input)

    def runner(self) -> Runner:
        return self.backend.load(
            Path(self.record.store_path), self.backbone, self.backbone.output or ""
        )


# --------------------------------------------------------------------------- pipeline


def raw_engine(setup: Setup, batch_size: int, repeat: int) -> dict[str, Any]:
    """(a): the engine alone, on batches already decoded and normalized, as the build loads it."""
    spec = setup.backbone.input
    sample = setup.selection.tiles[: 32 * batch_size]
    with corpus_mod.open_corpus(setup.request.corpus) as corpus:
        pixels = np.stack([decode_tile(corpus.read(t.z, t.x, t.y), spec) for t in sample])
    batches = [
        Normalizer.for_spec(spec)(pixels[i : i + batch_size])
        for i in range(0, len(pixels), batch_size)
    ]
    runner = setup.runner()
    n = len(setup.selection.tiles)

    def go() -> None:
        done = 0
        while done < n:
            batch = batches[(done // batch_size) % len(batches)]
            runner.run(batch[: n - done])
            done += len(batch)

    runner.run(batches[0])  # warm-up: first run allocates
    best, times = best_of(repeat, go)
    return {"tiles_per_s": n / best, "times_s": [round(t, 3) for t in times]}


def raw_engine_threads(setup: Setup, batch_size: int, threads: int, n: int) -> float:
    """Raw engine tiles/s with a given intra-op thread count: how inference scales with cores."""
    import onnxruntime as ort

    spec = setup.backbone.input
    with corpus_mod.open_corpus(setup.request.corpus) as corpus:
        tiles = setup.selection.tiles[:batch_size]
        pixels = np.stack([decode_tile(corpus.read(t.z, t.x, t.y), spec) for t in tiles])
    batch = Normalizer.for_spec(spec)(pixels)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        setup.record.store_path, options, providers=["CPUExecutionProvider"]
    )
    feed = {spec.name: batch}
    session.run(None, feed)
    start = time.perf_counter()
    for _ in range(max(1, n // batch_size)):
        session.run(None, feed)
    return max(1, n // batch_size) * batch_size / (time.perf_counter() - start)


def pipelined(
    setup: Setup, tmp: Path, batch_size: int, workers: int | None, repeat: int
) -> dict[str, Any]:
    """(b): embed_tiles into a fresh store, then write_index."""
    runner = setup.runner()
    runs = []
    for i in range(repeat):
        store_path = tmp / f"store-{i}.sqlite"
        store = descriptors.DescriptorStore(store_path)
        stats = descriptors.EmbedStats()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        result = descriptors.embed_tiles(
            setup.selection,
            setup.request.corpus,
            runner.run,
            setup.backbone.input,
            setup.space,
            store,
            batch_size=batch_size,
            workers=workers,
            stats=stats,
        )
        embed_s = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        files = descriptors.write_index(setup.selection, store, setup.space, tmp, f"bench-{i}")
        index_s = time.perf_counter() - start - embed_s
        store.close()
        assert result.generated + result.reused == len(setup.selection.tiles)
        cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        runs.append(
            {
                "embed_s": embed_s,
                "index_s": index_s,
                "cpu_s": cpu,
                "stats": stats.as_dict(),
                "generated": result.generated,
                "index_type": files.index_type,
            }
        )
        for path in tmp.glob(f"store-{i}.sqlite*"):
            path.unlink()
    best = min(runs, key=lambda r: r["embed_s"])
    n = len(setup.selection.tiles)
    return {
        "tiles_per_s": n / best["embed_s"],
        "tiles_per_s_with_index": n / (best["embed_s"] + best["index_s"]),
        "embed_s": [round(r["embed_s"], 3) for r in runs],
        "index_s": round(best["index_s"], 3),
        "cpu_cores_busy": round(best["cpu_s"] / best["embed_s"], 2),
        "stats": best["stats"],
        "generated": best["generated"],
    }


def naive(setup: Setup, limit: int) -> dict[str, Any]:
    """(c): read, decode, normalize and infer one tile at a time, the obvious way."""
    from PIL import Image

    spec = setup.backbone.input
    runner = setup.runner()
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    tiles = setup.selection.tiles[:limit]
    start = time.perf_counter()
    with corpus_mod.open_corpus(setup.request.corpus) as corpus:
        for t in tiles:
            data = corpus.read(t.z, t.x, t.y)
            image = Image.open(io.BytesIO(data)).convert("RGB").resize((spec.size, spec.size))
            x = (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std
            runner.run(x.transpose(2, 0, 1)[None].copy())
    return {"tiles_per_s": len(tiles) / (time.perf_counter() - start), "tiles": len(tiles)}


def section_pipeline(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"tiles": len(setup.selection.tiles), "load_before": load_avg()}
    with tempfile.TemporaryDirectory(prefix="embed-bench-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        log("(a) raw engine ...")
        out["raw"] = raw_engine(setup, args.batch, args.repeat)
        log(f"    {out['raw']['tiles_per_s']:.0f} tiles/s")
        log("(b) descriptor phase (embed_tiles + write_index) ...")
        out["pipelined"] = pipelined(setup, tmp, args.batch, args.workers, args.repeat)
        log(f"    {out['pipelined']['tiles_per_s']:.0f} tiles/s")
        log("(c) naive loop ...")
        out["naive"] = naive(setup, min(args.naive_tiles, len(setup.selection.tiles)))
        log(f"    {out['naive']['tiles_per_s']:.0f} tiles/s")
        n = min(2048, len(setup.selection.tiles))
        out["raw_by_threads"] = {
            str(k): round(raw_engine_threads(setup, args.batch, k, n), 1) for k in (1, 2)
        }
        if args.sweep:
            sweep: dict[str, float] = {}
            for workers in (1, 2, 3):
                for batch in (16, 32, 64):
                    r = pipelined(setup, tmp, batch, workers, 1)
                    sweep[f"workers={workers},batch={batch}"] = round(r["tiles_per_s"], 1)
                    log(f"    sweep workers={workers} batch={batch}: {r['tiles_per_s']:.0f}")
            out["sweep"] = sweep
    raw, pipe, nai = out["raw"]["tiles_per_s"], out["pipelined"], out["naive"]["tiles_per_s"]
    out["b_over_a"] = round(pipe["tiles_per_s"] / raw, 3)
    out["b_over_c"] = round(pipe["tiles_per_s"] / nai, 2)
    n = len(setup.selection.tiles)
    stats = pipe["stats"]
    # Per-tile cost of each stage in thread-milliseconds (work, not wall time).
    out["ms_per_tile"] = {
        stage: round(1000 * stats[f"{stage}_s"] / n, 3)
        for stage in ("read", "decode", "preprocess", "inference", "store", "lookup", "wait")
    }
    out["ms_per_tile"]["index_write"] = round(1000 * pipe["index_s"] / n, 3)
    out["ms_per_tile"]["raw_engine"] = round(1000 / raw, 3)
    out["load_after"] = load_avg()
    return out


# --------------------------------------------------------------------------- builds


def build(demo: DemoInputs, work: Path, *extra: str) -> tuple[dict[str, Any], int]:
    """One whole build in a child process; returns its report and peak RSS in KiB."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    cmd = [
        sys.executable,
        "-m",
        "takeoff_cache.cli",
        "build",
        "--request",
        str(demo.request),
        "--work-dir",
        str(work),
        "--json",
        *extra,
    ]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        # wait4 reports this child's own peak RSS, not the largest of all children so far.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode not in (0, 3):
        raise SystemExit(f"build failed ({proc.returncode}): {stderr.strip()}")
    return json.loads(stdout), int(usage.ru_maxrss)


def fresh_cache(demo: DemoInputs) -> None:
    for entry in (demo.root / "cache").iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def changed_jpeg(z: int, x: int, y: int) -> bytes:
    from PIL import Image

    from takeoff_cache.demo.synthetic import render_tile

    buf = io.BytesIO()
    # Another world's pixels at this address: a real content change, same size and format.
    Image.fromarray(render_tile(z, x, y, seed=12345)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def section_incremental(args: argparse.Namespace) -> dict[str, Any]:
    """Cold build, 1% of tiles changed, rebuild — on a private copy of the corpus."""
    from takeoff_cache.demo.synthetic import replace_tile_bytes

    src = make_demo_data(args.data / f"{args.tiles}", tiles=args.tiles)
    with tempfile.TemporaryDirectory(prefix="embed-incr-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "demo"
        shutil.copytree(src.root, root)
        demo = make_demo_data(root, tiles=args.tiles)
        fresh_cache(demo)
        work = tmp / "work"
        log("incremental: cold build ...")
        cold, _ = build(demo, work)
        selection_rows = json.loads(
            next((demo.root / "cache" / "index").glob("*.tiles.json")).read_text()
        )["rows"]
        rng = np.random.default_rng(1)
        count = max(1, len(selection_rows) // 100)
        picks = rng.choice(len(selection_rows), size=count, replace=False)
        for i in picks:
            z, x, y = selection_rows[int(i)]
            replace_tile_bytes(demo.corpus, z, x, y, changed_jpeg(z, x, y))
        log(f"incremental: {count} tiles changed, rebuild ...")
        warm, _ = build(demo, work)
    ratio = warm["phases"]["descriptors"] / cold["phases"]["descriptors"]
    return {
        "tiles": cold["tiles"],
        "changed": count,
        "cold_descriptors_s": cold["phases"]["descriptors"],
        "warm_descriptors_s": warm["phases"]["descriptors"],
        "ratio": round(ratio, 4),
        "generated": warm["descriptors_generated"],
        "reused": warm["descriptors_reused"],
        "exact": warm["descriptors_generated"] == count
        and warm["descriptors_reused"] == cold["tiles"] - count,
        "cold_elapsed_s": cold["elapsed_s"],
        "warm_elapsed_s": warm["elapsed_s"],
        "outcomes": [cold["outcome"], warm["outcome"]],
    }


def section_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of cold whole builds (fresh work folder and cache) at two corpus sizes."""
    out: dict[str, Any] = {}
    for tiles in (args.tiles, args.big_tiles):
        demo = make_demo_data(args.data / f"{tiles}", tiles=tiles)
        with tempfile.TemporaryDirectory(prefix="embed-mem-", dir=args.tmp) as tmp_name:
            fresh_cache(demo)
            log(f"memory: cold build of {demo.tile_count} tiles ...")
            report, peak_kib = build(demo, Path(tmp_name) / "work")
            fresh_cache(demo)
        index_mib = report["tiles"] * 336 * 4 / 2**20  # demo VPR: 336-d float32, flat index
        out[str(tiles)] = {
            "tiles": report["tiles"],
            "peak_rss_mib": round(peak_kib / 1024, 1),
            "index_mib": round(index_mib, 1),
            "net_of_index_mib": round(peak_kib / 1024 - index_mib, 1),
            "descriptors_s": report["phases"]["descriptors"],
            "elapsed_s": report["elapsed_s"],
        }
        log(f"    {out[str(tiles)]}")
    small, big = out[str(args.tiles)], out[str(args.big_tiles)]
    out["ratio_net_of_index"] = round(big["net_of_index_mib"] / small["net_of_index_mib"], 3)
    out["ratio_raw"] = round(big["peak_rss_mib"] / small["peak_rss_mib"], 3)
    return out


def section_index(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """The approximate index on a real store: recall@1, nprobe and build time vs. flat."""
    with tempfile.TemporaryDirectory(prefix="embed-index-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        # Kept beside the corpus: embedding 50 000 tiles once is enough.
        store = descriptors.DescriptorStore(setup.demo.root / "bench-store.sqlite")
        runner = setup.runner()
        log(f"index: embedding {len(setup.selection.tiles)} tiles (reused when stored) ...")
        descriptors.embed_tiles(
            setup.selection,
            setup.request.corpus,
            runner.run,
            setup.backbone.input,
            setup.space,
            store,
        )
        out: dict[str, Any] = {"tiles": len(setup.selection.tiles)}
        for name, exact_max in (("flat", len(setup.selection.tiles)), ("approximate", 0)):
            start = time.perf_counter()
            files = descriptors.write_index(
                setup.selection, store, setup.space, tmp, name, exact_max=exact_max
            )
            out[name] = {
                "index_type": files.index_type,
                "nprobe": files.nprobe,
                "recall_at_1": files.recall_at_1,
                "recall_queries": files.recall_queries,
                "build_s": round(time.perf_counter() - start, 2),
                "bytes": Path(files.index_path).stat().st_size,
            }
            log(f"    {name}: {out[name]}")
        store.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiles", type=int, default=5000)
    p.add_argument("--big-tiles", type=int, default=50000)
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "takeoff-bench")
    p.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: system tmp)")
    p.add_argument("--only", default="pipeline,incremental,memory,index")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch", type=int, default=descriptors.BATCH_SIZE)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--naive-tiles", type=int, default=1000)
    p.add_argument("--sweep", action="store_true", help="also sweep decode workers x batch size")
    args = p.parse_args()
    only = set(args.only.split(","))
    figures: dict[str, Any] = {"benchmark": "embed", "cores": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory(prefix="embed-engine-", dir=args.tmp) as engine_work:
        if "pipeline" in only:
            setup = Setup(args.data / f"{args.tiles}", args.tiles, Path(engine_work))
            figures["pipeline"] = section_pipeline(setup, args)
        if "incremental" in only:
            figures["incremental"] = section_incremental(args)
        if "memory" in only:
            figures["memory"] = section_memory(args)
        if "index" in only:
            big = Setup(args.data / f"{args.big_tiles}", args.big_tiles, Path(engine_work))
            figures["index"] = section_index(big, args)
    if "pipeline" in figures:
        pipe = figures["pipeline"]
        log(
            f"(a) raw engine {pipe['raw']['tiles_per_s']:.0f} tiles/s, (b) descriptor phase"
            f" {pipe['pipelined']['tiles_per_s']:.0f} tiles/s, (c) naive"
            f" {pipe['naive']['tiles_per_s']:.0f} tiles/s: b/a {pipe['b_over_a']},"
            f" b/c {pipe['b_over_c']}"
        )
        log(f"per-tile thread-ms: {pipe['ms_per_tile']}")
    if "incremental" in figures:
        inc = figures["incremental"]
        log(
            f"incremental: {inc['changed']} of {inc['tiles']} changed -> generated"
            f" {inc['generated']}, reused {inc['reused']}; descriptors phase"
            f" {inc['warm_descriptors_s']:.2f} s vs cold {inc['cold_descriptors_s']:.2f} s"
            f" = {100 * inc['ratio']:.1f}%"
        )
    if "memory" in figures:
        log(f"memory: ratio net of index {figures['memory']['ratio_net_of_index']}")
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
