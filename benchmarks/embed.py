"""Descriptor phase benchmark: throughput, incremental rebuilds, peak memory, index recall.

    python benchmarks/embed.py [--tiles 5000] [--data DIR] [--only pipeline,incremental,...]
        [--backbones FILE]

Sections (all by default):

- pipeline: tiles/s of (a) the raw engine on pre-decoded, pre-normalized
  batches — the limit; (b) the descriptor phase (``embed_tiles`` into a fresh
  store: corpus reads, decoding, inference, store writes) and ``write_index``;
  (c) a naive loop that reads, decodes, normalizes and infers one tile at a
  time. Prints where the time goes, per stage, and the sweeps over decode
  workers and batch size.
- incremental: a real build (the Prefect flow, through the CLI and in this
  process), then rounds of 1% of the tiles changed and a rebuild, then a
  second cold build: descriptors generated == tiles changed, and the median
  rebuild's descriptor phase as a share of the median cold one.
- memory: peak RSS of whole cold builds in a child process, for ``--tiles``
  and ``--big-tiles`` tiles, and their ratio net of the index.
- index: the approximate index on the big corpus: recall@1 against exact
  search on held-out queries, nprobe, build time.

Demo corpora are generated once into ``--data`` and reused. Ends with one
JSON line holding every figure.

``--backbones FILE`` measures FILE's place-recognition network in place of the
demo's analytic one in the pipeline and index sections (the builds of the
incremental and memory sections keep the demo's), e.g. the EfficientNet-Lite0
that ``scripts/export_efficientnet.py`` writes.

On an NVIDIA host without TensorRT, ``--ort-cuda 2`` runs the pipeline section
with the engine on ONNX Runtime's CUDA provider (install ``onnxruntime-gpu`` in
place of ``onnxruntime``): (b)/(a) as on a GPU host, where decoding has the
cores to itself.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # flows/ and tasks/ sit beside src/
# Before anything imports Prefect (the in-process builds do).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")

from takeoff_cache.backbones.file import Backbone, load_backbones, place_recognition  # noqa: E402
from takeoff_cache.backbones.preprocess import (  # noqa: E402
    Normalizer,
    _decode_with_pillow,
    decode_into,
    decode_tile,
)
from takeoff_cache.build.request import parse_request, read_request_file  # noqa: E402
from takeoff_cache.demo import DemoInputs, make_demo_data  # noqa: E402
from takeoff_cache.demo.models import VPR_DIM  # noqa: E402
from takeoff_cache.descriptors import decode, pipeline  # noqa: E402
from takeoff_cache.descriptors.index import write_index  # noqa: E402
from takeoff_cache.descriptors.store import DescriptorStore, descriptor_space  # noqa: E402
from takeoff_cache.engines import Runner, get_backend  # noqa: E402
from takeoff_cache.engines.store import ensure_engine  # noqa: E402
from takeoff_cache.tiles import corpus as corpus_mod  # noqa: E402


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def load_avg() -> float:
    return os.getloadavg()[0]


def cpu_s() -> float:
    """CPU seconds this process has used, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Setup:
    """A demo corpus, its selection and the compiled demo VPR engine."""

    def __init__(
        self,
        data: Path,
        tiles: int,
        work: Path,
        backend: str = "auto",
        cuda_streams: int = 0,
        backbones: Path | None = None,
    ) -> None:
        started = time.perf_counter()
        self.demo: DemoInputs = make_demo_data(data, tiles=tiles)
        took = time.perf_counter() - started
        log(f"demo data {data}: {self.demo.tile_count} tiles ({took:.1f} s)")
        raw = read_request_file(self.demo.request)
        self.request = parse_request(raw)
        self.selection = corpus_mod.select_tiles(
            self.request.corpus, self.request.bbox.as_tuple(), self.request.zoom_levels
        )
        self.backbone: Backbone = place_recognition(
            load_backbones(backbones or self.request.backbones)
        )
        # auto: TensorRT on an NVIDIA host (the engine on the GPU, decoding on the
        # cores), ONNX Runtime elsewhere; the figures name the one measured.
        self.backend = get_backend(backend)
        self.record = ensure_engine(self.backbone, self.backend, "fp32", None, None, work)
        self.space = descriptor_space(self.record.key, self.backbone.input)
        # Loaded before anything is timed, or the first index write counts its import.
        import faiss  # noqa: F401

        self.cuda_streams = cuda_streams
        self._cuda: Runner | None = None

    def runner(self) -> Runner:
        if self.cuda_streams:
            return self.cuda_runner()
        return self.backend.load(
            Path(self.record.store_path), self.backbone, self.backbone.output or ""
        )

    def cuda_runner(self) -> Runner:
        """The backbone on ONNX Runtime's CUDA execution provider (``--ort-cuda``).

        An engine on the GPU for an NVIDIA host where TensorRT cannot be installed:
        the pipeline's side of (b)/(a) is then measured as it is on a GPU host, the
        cores left to decoding. Not a backend of the build: the figures name it.
        One session, made and warmed once: a session's first run of each batch
        shape picks its cuDNN algorithms, which is set-up, not throughput.
        """
        if self._cuda is None:
            import onnxruntime as ort

            from takeoff_cache.engines.onnxruntime import OnnxRuntimeRunner

            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # CUDA and cuDNN from their pip packages
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(
                str(self.backbone.onnx),
                options,
                providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
            )
            if session.get_providers()[0] != "CUDAExecutionProvider":
                raise SystemExit("--ort-cuda: ONNX Runtime has no CUDA execution provider here")
            runner = OnnxRuntimeRunner(
                session, self.backbone.input.name, self.backbone.output or "", self.cuda_streams
            )
            runner.on_accelerator = True
            spec = self.backbone.input
            for size in sorted({1, 8, 16, 32, 64, 128, 256, len(self.selection.tiles) % 256}):
                if size:
                    runner.run(np.zeros((size, spec.channels, spec.size, spec.size), np.float32))
            self._cuda = runner
        return self._cuda


# --------------------------------------------------------------------------- pipeline


class Raw:
    """(a): the engine alone on batches already decoded and normalized, loaded as the build
    loads it and driven as the build drives it (``runner.streams`` calls in flight)."""

    def __init__(self, setup: Setup, batch_size: int) -> None:
        spec = setup.backbone.input
        sample = setup.selection.tiles[: 8 * batch_size]
        with corpus_mod.open_corpus(setup.request.corpus) as corpus:
            pixels = np.stack([decode_tile(corpus.read(t.z, t.x, t.y), spec) for t in sample])
        normalize = Normalizer.for_spec(spec)
        self.batches = [
            normalize(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)
        ]
        self.runner = setup.runner()
        self.runner.run(self.batches[0])  # the first run allocates
        self.pool = ThreadPoolExecutor(max_workers=self.runner.streams)
        self.n = len(setup.selection.tiles) // batch_size * batch_size

    def __call__(self, streams: int | None = None) -> tuple[float, float]:
        """Tiles per second, and tiles per CPU-second."""
        streams = streams or self.runner.streams
        jobs = [self.batches[i % len(self.batches)] for i in range(self.n // len(self.batches[0]))]
        cpu = cpu_s()
        start = time.perf_counter()
        if streams == 1:
            for batch in jobs:
                self.runner.run(batch)
        else:
            list(self.pool.map(self.runner.run, jobs))
        return self.n / (time.perf_counter() - start), self.n / (cpu_s() - cpu)


def pipelined(
    setup: Setup, tmp: Path, batch_size: int, workers: int | None, streams: int | None = None
) -> dict[str, Any]:
    """(b): embed_tiles into a fresh store (reads, decoding, inference, store), then write_index.

    ``streams``: engine calls in flight; the runner's own number unless given. ``workers``:
    decoding threads; as many as the build runs unless given."""
    runner = setup.runner()
    workers = workers or decode.decode_workers(runner.on_accelerator)
    store_path = tmp / "store.sqlite"
    store = DescriptorStore(store_path)
    stats = pipeline.EmbedStats()
    cpu0 = cpu_s()
    start = time.perf_counter()
    result = pipeline.embed_tiles(
        setup.selection,
        setup.request.corpus,
        runner.run,
        setup.backbone.input,
        setup.space,
        store,
        batch_size=batch_size,
        workers=workers,
        stats=stats,
        streams=streams or runner.streams,
    )
    embed_s = time.perf_counter() - start
    cpu = cpu_s() - cpu0
    files = write_index(setup.selection, store, setup.space, tmp, "bench")
    index_s = time.perf_counter() - start - embed_s
    store.close()
    for path in tmp.glob("store.sqlite*"):
        path.unlink()
    n = len(setup.selection.tiles)
    if result.generated != n:
        raise SystemExit(f"embedded {result.generated} of {n} tiles")
    return {
        "tiles_per_s": n / embed_s,
        "tiles_per_cpu_s": n / cpu,
        "tiles_per_s_with_index": n / (embed_s + index_s),
        "embed_s": round(embed_s, 3),
        "index_s": round(index_s, 3),
        "index_type": files.index_type,
        "cpu_cores_busy": round(cpu / embed_s, 2),
        "decode_workers": workers,
        "stats": stats.as_dict(),
    }


def naive(setup: Setup, limit: int) -> tuple[float, float]:
    """(c): read, decode, normalize and infer one tile at a time, the obvious way.

    Tiles per second, and tiles per CPU-second."""
    from PIL import Image

    spec = setup.backbone.input
    runner = setup.runner()
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    tiles = setup.selection.tiles[:limit]
    cpu = cpu_s()
    start = time.perf_counter()
    with corpus_mod.open_corpus(setup.request.corpus) as corpus:
        for t in tiles:
            data = corpus.read(t.z, t.x, t.y)
            image = Image.open(io.BytesIO(data)).convert("RGB").resize((spec.size, spec.size))
            x = (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std
            runner.run(x.transpose(2, 0, 1)[None].copy())
    return len(tiles) / (time.perf_counter() - start), len(tiles) / (cpu_s() - cpu)


def work_per_tile(setup: Setup, count: int = 1024) -> dict[str, float]:
    """CPU-ms per tile of each stage on one thread (thread CPU time: robust to other load)."""
    spec = setup.backbone.input
    runner = setup.runner()
    normalize = Normalizer.for_spec(spec)
    tiles = setup.selection.tiles[:count]
    pixels = np.empty((32, spec.size, spec.size, spec.channels), dtype=np.uint8)
    batch = np.empty((32, spec.channels, spec.size, spec.size), dtype=np.float32)
    spent = dict.fromkeys(("read", "decode", "decode_pillow", "preprocess", "inference"), 0.0)
    with corpus_mod.open_corpus(setup.request.corpus) as corpus:
        for start in range(0, len(tiles) - 31, 32):
            for k, t in enumerate(tiles[start : start + 32]):
                t0 = time.thread_time()
                data = corpus.read(t.z, t.x, t.y)
                t1 = time.thread_time()
                decode_into(data, spec, pixels[k])
                t2 = time.thread_time()
                # The same tile through Pillow alone, for the fast path's saving.
                _decode_with_pillow(data, spec, pixels[k])
                spent["decode_pillow"] += time.thread_time() - t2
                spent["read"] += t1 - t0
                spent["decode"] += t2 - t1
            t3 = time.thread_time()
            normalize(pixels, batch)
            t4 = time.thread_time()
            runner.run(batch)  # one call: one thread
            spent["inference"] += time.thread_time() - t4
            spent["preprocess"] += t4 - t3
    n = len(tiles) // 32 * 32
    return {k: round(1000 * v / n, 3) for k, v in spent.items()}


def section_pipeline(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Paired rounds of (a), (b) and (c), so each ratio compares runs under the same load."""
    n = len(setup.selection.tiles)
    out: dict[str, Any] = {"tiles": n, "load_before": round(load_avg(), 2)}
    raw = Raw(setup, args.batch)
    cores = len(os.sched_getaffinity(0))
    # The engine with one core to itself and decoding on the others: how a host
    # whose engine runs on an accelerator uses its cores. Only where the engine
    # otherwise shares every core with decoding.
    dedicated = cores >= 2 and raw.runner.streams > 1
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="embed-bench-", dir=args.tmp) as tmp_name:
        for i in range(args.rounds):
            a, a_cpu = raw()
            b = pipelined(setup, Path(tmp_name), args.batch, args.workers)
            c, c_cpu = naive(setup, min(args.naive_tiles, n))
            rounds.append(
                {"a": a, "b": b, "c": c, "a_cpu": a_cpu, "c_cpu": c_cpu, "load": load_avg()}
            )
            log(
                f"round {i + 1}: (a) raw {a:.0f}, (b) descriptor phase {b['tiles_per_s']:.0f},"
                f" (c) naive {c:.0f} tiles/s; b/a {b['tiles_per_s'] / a:.2f}"
                f" (load {load_avg():.1f})"
            )
            if dedicated:
                a1 = raw(1)[0]
                b1 = pipelined(setup, Path(tmp_name), args.batch, cores - 1, streams=1)
                rounds[-1]["dedicated"] = {"a": a1, "b": b1["tiles_per_s"]}
                log(
                    f"    engine on a core of its own: (a) {a1:.0f}, (b) {b1['tiles_per_s']:.0f}"
                    f" tiles/s; b/a {b1['tiles_per_s'] / a1:.2f}"
                )
        if args.sweep:
            sweep: dict[str, float] = {}
            for workers in (int(w) for w in args.sweep_workers.split(",")):
                for batch in (int(b) for b in args.sweep_batches.split(",")):
                    r = pipelined(setup, Path(tmp_name), batch, workers)
                    sweep[f"workers={workers},batch={batch}"] = round(r["tiles_per_s"], 1)
                    log(f"    sweep workers={workers} batch={batch}: {r['tiles_per_s']:.0f}")
            out["sweep"] = sweep
    best_b = max(rounds, key=lambda r: r["b"]["tiles_per_s"])["b"]
    out["raw_tiles_per_s"] = round(max(r["a"] for r in rounds), 1)
    out["raw_one_stream_tiles_per_s"] = round(raw(1)[0], 1)
    if dedicated:
        pairs = [r["dedicated"] for r in rounds]
        out["dedicated_engine_core"] = {
            "decode_workers": cores - 1,
            "raw_tiles_per_s": round(max(p["a"] for p in pairs), 1),
            "pipelined_tiles_per_s": round(max(p["b"] for p in pairs), 1),
            "b_over_a_paired_median": round(statistics.median(p["b"] / p["a"] for p in pairs), 3),
            "rounds": [{k: round(v, 1) for k, v in p.items()} for p in pairs],
        }
    # Tiles per CPU-second: what each way costs, whatever share of the cores it got.
    out["tiles_per_cpu_s"] = {
        "raw": round(statistics.median(r["a_cpu"] for r in rounds), 1),
        "pipelined": round(statistics.median(r["b"]["tiles_per_cpu_s"] for r in rounds), 1),
        "naive": round(statistics.median(r["c_cpu"] for r in rounds), 1),
    }
    out["cores_busy_pipelined"] = [r["b"]["cpu_cores_busy"] for r in rounds]
    out["pipelined_tiles_per_s"] = round(best_b["tiles_per_s"], 1)
    out["pipelined_with_index_tiles_per_s"] = round(best_b["tiles_per_s_with_index"], 1)
    out["naive_tiles_per_s"] = round(max(r["c"] for r in rounds), 1)
    out["b_over_a_best"] = round(out["pipelined_tiles_per_s"] / out["raw_tiles_per_s"], 3)
    out["b_over_c_best"] = round(out["pipelined_tiles_per_s"] / out["naive_tiles_per_s"], 2)
    out["b_over_a_paired_median"] = round(
        statistics.median(r["b"]["tiles_per_s"] / r["a"] for r in rounds), 3
    )
    out["b_over_c_paired_median"] = round(
        statistics.median(r["b"]["tiles_per_s"] / r["c"] for r in rounds), 2
    )
    out["rounds"] = [
        {
            "a": round(r["a"], 1),
            "b": round(r["b"]["tiles_per_s"], 1),
            "c": round(r["c"], 1),
            "load": round(r["load"], 2),
        }
        for r in rounds
    ]
    stats = best_b["stats"]
    # Where the time goes in the best (b): thread-seconds per stage, summed over threads.
    out["time_per_tile_ms"] = {
        stage: round(1000 * stats[f"{stage}_s"] / n, 3)
        for stage in ("read", "decode", "preprocess", "inference", "store", "lookup", "wait")
    }
    out["time_per_tile_ms"]["index_write"] = round(1000 * best_b["index_s"] / n, 3)
    out["cpu_cores_busy"] = best_b["cpu_cores_busy"]
    out["decode_workers"] = best_b["decode_workers"]
    # The same stages as pure CPU work on one thread: what two cores must share.
    work = work_per_tile(setup)
    out["work_cpu_ms_per_tile"] = work
    # decode_pillow is a comparison, not a stage of the pipeline.
    total = sum(v for k, v in work.items() if k != "decode_pillow")
    # If the engine alone scales to every core and the pipeline wastes nothing,
    # (b)/(a) can reach inference work / all work at best.
    out["b_over_a_bound"] = round(work["inference"] / total, 3)
    out["bound_tiles_per_s"] = {
        "raw": round(1000 * cores / work["inference"], 1),
        "pipelined": round(1000 * cores / total, 1),
    }
    out["load_after"] = round(load_avg(), 2)
    return out


# --------------------------------------------------------------------------- builds


# Runs the CLI and, at exit, writes the process's own peak RSS (KiB) to argv[1]: VmHWM,
# the high-water mark of the memory the process has had since its exec. Neither
# wait4's figure nor getrusage(RUSAGE_SELF) is the build's own on Linux: both carry
# the peak of the process that forked it (the kernel keeps the largest RSS seen
# across exec, and a vfork child execs from its parent's memory), so after this
# benchmark's own 50 000-tile builds both printed ~800 MiB at every corpus size.
_OWN_PEAK = """
import atexit, re, resource, runpy, sys
out = sys.argv.pop(1)


def peak_kib():
    try:
        with open("/proc/self/status") as status:
            return int(re.search(r"^VmHWM:\\s*(\\d+) kB", status.read(), re.M).group(1))
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


atexit.register(lambda: open(out, "w").write(str(peak_kib())))
runpy.run_module("takeoff_cache.cli.main", run_name="__main__", alter_sys=True)
"""


def build(demo: DemoInputs, work: Path, *extra: str) -> tuple[dict[str, Any], int]:
    """One whole build in a child process; returns its report and its own peak RSS in KiB."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryDirectory() as scratch,
    ):
        peak_file = Path(scratch) / "peak-kib"
        cmd = [
            sys.executable,
            "-c",
            _OWN_PEAK,
            str(peak_file),
            "build",
            "--request",
            str(demo.request),
            "--work-dir",
            str(work),
            "--json",
            *extra,
        ]
        proc = subprocess.run(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, check=False)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
        if proc.returncode not in (0, 3):
            raise SystemExit(f"build failed ({proc.returncode}): {stderr.strip()}")
        peak_kib = int(peak_file.read_text())
    return json.loads(stdout), peak_kib


def fresh_cache(demo: DemoInputs) -> None:
    for entry in (demo.root / "cache").iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def changed_jpeg(z: int, x: int, y: int, seed: int = 12345) -> bytes:
    from PIL import Image

    from takeoff_cache.demo.synthetic import render_tile

    buf = io.BytesIO()
    # Another world's pixels at this address: a real content change, same size and format.
    Image.fromarray(render_tile(z, x, y, seed=seed)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def build_in_process(demo: DemoInputs, work: Path) -> dict[str, Any]:
    """One build in this process, as a long-running Prefect worker would run it."""
    from takeoff_cache_prefect.flows.build import build_cache

    raw = read_request_file(demo.request)
    params: dict[str, Any] = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in raw.items() if v is not None
    }
    report: dict[str, Any] = build_cache(**params, work_dir=str(work))
    return report


def incremental(args: argparse.Namespace, tiles: int, in_process: bool) -> dict[str, Any]:
    """Cold build, then ``--rebuilds`` rounds of 1% of the tiles changed and a rebuild,
    then a second cold build in a fresh work folder — on a private copy of the corpus.

    The ratio is the median rebuild phase over the median cold phase: this host's
    speed drifts by up to 2x over minutes, and one pair of builds says little.
    """
    from takeoff_cache.demo.synthetic import replace_tile_bytes

    def run(demo: DemoInputs, work: Path) -> dict[str, Any]:
        return build_in_process(demo, work) if in_process else build(demo, work)[0]

    src = make_demo_data(args.data / f"{tiles}", tiles=tiles)
    how = "in this process" if in_process else "as a CLI process"
    colds: list[dict[str, Any]] = []
    warms: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="embed-incr-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "demo"
        shutil.copytree(src.root, root, ignore=shutil.ignore_patterns("bench-store.sqlite*"))
        demo = make_demo_data(root, tiles=tiles)
        fresh_cache(demo)
        log(f"incremental: cold build of {src.tile_count} tiles, {how} ...")
        colds.append(run(demo, tmp / "work"))
        selection_rows = json.loads(
            next((demo.root / "cache" / "index").glob("*.tiles.json")).read_text()
        )["rows"]
        count = max(1, len(selection_rows) // 100)
        # Each round changes tiles no earlier round changed.
        picks = np.random.default_rng(1).permutation(len(selection_rows))
        for round_ in range(args.rebuilds):
            for i in picks[round_ * count : (round_ + 1) * count]:
                z, x, y = selection_rows[int(i)]
                replace_tile_bytes(demo.corpus, z, x, y, changed_jpeg(z, x, y, 12345 + round_))
            warm = run(demo, tmp / "work")
            warms.append(warm)
            log(
                f"    rebuild {round_ + 1}: {count} tiles changed -> generated"
                f" {warm['descriptors_generated']}, reused {warm['descriptors_reused']};"
                f" descriptors phase {warm['phases']['descriptors']:.3f} s"
            )
        log(f"incremental: second cold build, fresh work folder, {how} ...")
        fresh_cache(demo)
        colds.append(run(demo, tmp / "work-2"))
    cold_s = [c["phases"]["descriptors"] for c in colds]
    warm_s = [w["phases"]["descriptors"] for w in warms]
    ratio = statistics.median(warm_s) / statistics.median(cold_s)
    out = {
        "tiles": colds[0]["tiles"],
        "how": how,
        "changed": count,
        "cold_descriptors_s": cold_s,
        "warm_descriptors_s": warm_s,
        "ratio": round(ratio, 4),
        "ratio_each": [round(w / statistics.median(cold_s), 4) for w in warm_s],
        "generated": [w["descriptors_generated"] for w in warms],
        "reused": [w["descriptors_reused"] for w in warms],
        "exact": all(
            w["descriptors_generated"] == count and w["descriptors_reused"] == w["tiles"] - count
            for w in warms
        ),
        "cold_elapsed_s": [c["elapsed_s"] for c in colds],
        "warm_elapsed_s": [w["elapsed_s"] for w in warms],
        "outcomes": [r["outcome"] for r in colds + warms],
    }
    log(
        f"    {how}: {count} of {out['tiles']} changed per rebuild, exact {out['exact']};"
        f" descriptors phase median {statistics.median(warm_s):.3f} s"
        f" ({', '.join(f'{w:.3f}' for w in warm_s)}) vs cold median"
        f" {statistics.median(cold_s):.2f} s ({', '.join(f'{c:.2f}' for c in cold_s)})"
        f" = {100 * ratio:.1f}%"
    )
    return out


def section_incremental(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = [incremental(args, args.tiles, False), incremental(args, args.tiles, True)]
    if args.big_incremental:
        runs += [incremental(args, args.big_tiles, False), incremental(args, args.big_tiles, True)]
    return runs


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
        index_mib = report["tiles"] * VPR_DIM * 4 / 2**20  # demo VPR: float32, flat index
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
        store = DescriptorStore(setup.demo.root / "bench-store.sqlite")
        runner = setup.runner()
        log(f"index: embedding {len(setup.selection.tiles)} tiles (reused when stored) ...")
        pipeline.embed_tiles(
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
            files = write_index(setup.selection, store, setup.space, tmp, name, exact_max=exact_max)
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
    p.add_argument("--rounds", type=int, default=5, help="paired rounds of (a), (b), (c)")
    p.add_argument("--batch", type=int, default=pipeline.BATCH_SIZE)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--backend", default="auto", help="auto | onnxruntime | tensorrt")
    p.add_argument(
        "--backbones",
        type=Path,
        default=None,
        help="pipeline, index: the place-recognition network of this backbones file"
        " in place of the demo's",
    )
    p.add_argument("--naive-tiles", type=int, default=1000)
    p.add_argument(
        "--ort-cuda",
        type=int,
        default=0,
        metavar="STREAMS",
        help="pipeline: the engine on ONNX Runtime's CUDA provider (onnxruntime-gpu), with"
        " STREAMS calls in flight, in place of the backend's engine",
    )
    p.add_argument("--sweep", action="store_true", help="also sweep decode workers x batch size")
    p.add_argument("--sweep-workers", default="1,2,3", help="decode worker counts the sweep tries")
    p.add_argument("--sweep-batches", default="16,32,64", help="batch sizes the sweep tries")
    p.add_argument(
        "--big-incremental", action="store_true", help="also the incremental run on --big-tiles"
    )
    p.add_argument("--rebuilds", type=int, default=3, help="incremental: rebuilds per run")
    args = p.parse_args()
    only = set(args.only.split(","))
    figures: dict[str, Any] = {"benchmark": "embed", "cores": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory(prefix="embed-engine-", dir=args.tmp) as engine_work:
        if "pipeline" in only:
            setup = Setup(
                args.data / f"{args.tiles}",
                args.tiles,
                Path(engine_work),
                args.backend,
                args.ort_cuda,
                args.backbones,
            )
            figures["backbone"] = setup.backbone.name
            figures["backend"] = "onnxruntime-cuda" if args.ort_cuda else setup.backend.name
            figures["pipeline"] = section_pipeline(setup, args)
        if "incremental" in only:
            figures["incremental"] = section_incremental(args)
        if "memory" in only:
            figures["memory"] = section_memory(args)
        if "index" in only:
            big = Setup(
                args.data / f"{args.big_tiles}",
                args.big_tiles,
                Path(engine_work),
                args.backend,
                backbones=args.backbones,
            )
            figures["index"] = section_index(big, args)
    if "pipeline" in figures:
        pipe = figures["pipeline"]
        log(
            f"(a) raw engine {pipe['raw_tiles_per_s']:.0f} tiles/s, (b) descriptor phase"
            f" {pipe['pipelined_tiles_per_s']:.0f} tiles/s, (c) naive"
            f" {pipe['naive_tiles_per_s']:.0f} tiles/s: b/a {pipe['b_over_a_best']}"
            f" (paired median {pipe['b_over_a_paired_median']}, bound {pipe['b_over_a_bound']}),"
            f" b/c {pipe['b_over_c_best']} (paired median {pipe['b_over_c_paired_median']})"
        )
        log(f"time per tile (ms, summed over threads): {pipe['time_per_tile_ms']}")
        log(f"CPU work per tile (ms, one thread): {pipe['work_cpu_ms_per_tile']}")
        if "dedicated_engine_core" in pipe:
            own = pipe["dedicated_engine_core"]
            log(
                f"engine on a core of its own, decoding on {own['decode_workers']}:"
                f" (a) {own['raw_tiles_per_s']:.0f}, (b) {own['pipelined_tiles_per_s']:.0f}"
                f" tiles/s; b/a paired median {own['b_over_a_paired_median']}"
            )
    if "memory" in figures:
        log(f"memory: ratio net of index {figures['memory']['ratio_net_of_index']}")
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
