"""The descriptors phase: the embedding pipeline, what a rebuild reuses, bad tiles end to end."""

from __future__ import annotations

import io
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import pytest
from PIL import Image
from prefect.artifacts import Artifact

from takeoff_cache.backbones.file import Backbone, load_backbones, place_recognition
from takeoff_cache.backbones.preprocess import Normalizer, decode_tile
from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.build.request import BuildRequest, parse_request, read_request_file
from takeoff_cache.demo.models import VPR_DIM
from takeoff_cache.demo.synthetic import render_tile, replace_tile_bytes
from takeoff_cache.descriptors import decode, pipeline
from takeoff_cache.descriptors.index import write_index
from takeoff_cache.descriptors.store import DescriptorStore, descriptor_space, l2_normalize
from takeoff_cache.engines import get_backend
from takeoff_cache.engines.store import EngineRecord, ensure_engine
from takeoff_cache.tiles.corpus import TileSelection, open_corpus, select_tiles
from takeoff_cache.trust.keys import load_trust_store
from takeoff_cache.trust.verify import verify_cache
from takeoff_cache_prefect.artifacts import artifact_key
from tests.conftest import Demo
from tests.support.cli import run_cli


@dataclass
class Vpr:
    """The demo place-recognition engine, compiled once for this module."""

    request: BuildRequest
    backbone: Backbone
    record: EngineRecord
    run: Callable[[np.ndarray], np.ndarray]
    streams: int

    @property
    def space(self) -> str:
        return descriptor_space(self.record.key, self.backbone.input)

    def select(self, corpus: Path) -> TileSelection:
        return select_tiles(corpus, self.request.bbox.as_tuple(), self.request.zoom_levels)


@pytest.fixture(scope="module")
def vpr(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Vpr:
    request = parse_request(read_request_file(demo_source / "request.toml"))
    backbone = place_recognition(load_backbones(request.backbones))
    backend = get_backend("onnxruntime")
    work = tmp_path_factory.mktemp("descriptor-engines")
    record = ensure_engine(backbone, backend, "fp32", None, None, work)
    runner = backend.load(Path(record.store_path), backbone, backbone.output or "")
    return Vpr(request, backbone, record, runner.run, runner.streams)


@pytest.fixture
def corpus(vpr: Vpr, tmp_path: Path) -> Path:
    """A private copy of the demo corpus, free to damage."""
    path = tmp_path / "corpus.mbtiles"
    shutil.copyfile(vpr.request.corpus, path)
    return path


def other_jpeg(z: int, x: int, y: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(render_tile(z, x, y, seed=4242)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def embed(vpr: Vpr, corpus: Path, store: DescriptorStore, **kw: Any) -> pipeline.EmbedResult:
    return pipeline.embed_tiles(
        vpr.select(corpus), corpus, vpr.run, vpr.backbone.input, vpr.space, store, **kw
    )


# --------------------------------------------------------------------------- preprocessing


def test_scaled_decode_matches_libjpeg_and_stays_close_to_a_full_decode(vpr: Vpr) -> None:
    spec = vpr.backbone.input
    with open_corpus(vpr.request.corpus) as c:
        for tile in vpr.select(vpr.request.corpus).tiles[::10]:
            data = c.read(tile.z, tile.x, tile.y)
            scaled = decode_tile(data, spec).astype(np.int16)
            assert scaled.shape == (spec.size, spec.size, 3)
            reference = Image.open(io.BytesIO(data))
            reference.draft("RGB", (spec.size, spec.size))
            np.testing.assert_array_equal(scaled, np.asarray(reference, dtype=np.int16))
            # A full-size decode then a resize: another resampling, still close.
            full = Image.open(io.BytesIO(data)).convert("RGB").resize((spec.size, spec.size))
            assert np.abs(scaled - np.asarray(full, dtype=np.int16)).mean() < 3.0


@pytest.mark.parametrize(("size", "channels"), [(128, 3), (128, 1), (64, 3), (224, 3), (256, 1)])
def test_fast_jpeg_path_gives_pillows_pixels_and_pillows_errors(
    vpr: Vpr, size: int, channels: int
) -> None:
    """simplejpeg where Pillow's draft scale applies, Pillow elsewhere: the same pixels."""
    from takeoff_cache.backbones.preprocess import _decode_with_pillow, decode_into

    spec = InputSpec("image", size, channels, (0.5,) * channels, (0.5,) * channels)
    fast = np.empty((size, size, channels), np.uint8)
    slow = np.empty_like(fast)
    with open_corpus(vpr.request.corpus) as c:
        tiles = vpr.select(vpr.request.corpus).tiles
        for tile in tiles:
            data = c.read(tile.z, tile.x, tile.y)
            decode_into(data, spec, fast)
            _decode_with_pillow(data, spec, slow)
            np.testing.assert_array_equal(fast, slow)
        data = c.read(tiles[0].z, tiles[0].x, tiles[0].y)
    with pytest.raises(OSError, match="truncated"):
        decode_into(data[: len(data) // 2], spec, fast)


def test_normalizer_matches_the_textbook_formula() -> None:
    spec = InputSpec("image", 8, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    expected = ((pixels / 255.0 - np.array(spec.mean)) / np.array(spec.std)).transpose(0, 3, 1, 2)
    out = np.full((2, 3, 8, 8), np.nan, dtype=np.float32)
    got = Normalizer.for_spec(spec)(pixels, out)
    assert got is out and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- embedding


def test_progress_is_reported_per_batch_with_increasing_counts(
    vpr: Vpr, corpus: Path, tmp_path: Path
) -> None:
    calls: list[tuple[int, int]] = []
    store = DescriptorStore(tmp_path / "store.sqlite")
    result = embed(vpr, corpus, store, batch_size=8, progress=lambda d, t: calls.append((d, t)))
    store.close()
    assert result.generated == 80 and result.reused == 0 and not result.bad_tiles
    done = [d for d, _ in calls]
    assert {t for _, t in calls} == {80}
    assert done == sorted(done) and done[0] == 0 and done[-1] == 80
    # Updated while embedding, not only at the start and the end.
    assert len(set(done)) >= 80 // 8


def test_changing_tiles_reembeds_exactly_those(vpr: Vpr, corpus: Path, tmp_path: Path) -> None:
    store = DescriptorStore(tmp_path / "store.sqlite")
    assert embed(vpr, corpus, store).generated == 80
    tiles = vpr.select(corpus).tiles
    for tile in tiles[10:13]:
        replace_tile_bytes(corpus, tile.z, tile.x, tile.y, other_jpeg(tile.z, tile.x, tile.y))
    result = embed(vpr, corpus, store)
    assert (result.generated, result.reused) == (3, 77)
    assert (embed(vpr, corpus, store).generated, embed(vpr, corpus, store).reused) == (0, 80)
    store.close()


def test_parallel_inference_streams_store_what_one_stream_stores(
    vpr: Vpr, corpus: Path, tmp_path: Path
) -> None:
    one = DescriptorStore(tmp_path / "one.sqlite")
    many = DescriptorStore(tmp_path / "many.sqlite")
    embed(vpr, corpus, one, batch_size=8, streams=1)
    result = embed(vpr, corpus, many, batch_size=8, streams=max(2, vpr.streams), workers=3)
    assert (result.generated, result.reused) == (80, 0)
    shas = [t.sha256 for t in vpr.select(corpus).tiles]
    a, b = one.get(vpr.space, shas, VPR_DIM), many.get(vpr.space, shas, VPR_DIM)
    assert set(a) == set(b) == set(shas)
    for sha in shas:
        np.testing.assert_allclose(a[sha], b[sha], atol=1e-6)
    one.close()
    many.close()


class _StoreThatWaitsForTheEngine(DescriptorStore):
    """Stores each batch only once the engine has started on a later batch."""

    def __init__(self, path: Path, started: list[threading.Event]) -> None:
        super().__init__(path)
        self.started = started
        self.puts = 0

    def put(self, space: str, shas: Sequence[str], vectors: np.ndarray) -> None:
        self.puts += 1
        if self.puts < len(self.started):
            assert self.started[self.puts].wait(10), "the engine idled while a batch was stored"
        super().put(space, shas, vectors)


def test_the_engine_runs_the_next_batch_while_the_last_one_is_stored(
    vpr: Vpr, corpus: Path, tmp_path: Path
) -> None:
    # One stream, as on a host with one accelerator: storing must not hold it up.
    started = [threading.Event() for _ in range(80 // 8)]
    calls = iter(started)

    def run(batch: np.ndarray) -> np.ndarray:
        next(calls).set()
        return vpr.run(batch)

    store = _StoreThatWaitsForTheEngine(tmp_path / "store.sqlite", started)
    result = pipeline.embed_tiles(
        vpr.select(corpus),
        corpus,
        run,
        vpr.backbone.input,
        vpr.space,
        store,
        batch_size=8,
        streams=1,
    )
    store.close()
    assert (result.generated, store.puts) == (80, 10)


def test_a_few_tiles_to_embed_come_in_smaller_batches_and_a_cold_build_in_full_ones(
    tmp_path: Path,
) -> None:
    import hashlib

    from takeoff_cache.tiles.corpus import Tile

    tiles = [Tile(16, i, 0, hashlib.sha256(str(i).encode()).hexdigest()) for i in range(5000)]
    store = DescriptorStore(tmp_path / "store.sqlite")

    def sizes() -> list[int]:
        batches = pipeline.todo_batches(tiles, store, "space", 32, lambda n: None)
        return [len(batch) for batch in batches]

    cold = sizes()
    assert cold == [32] * (5000 // 32) + [5000 % 32]
    # All but 51 stored, as after a 1% change: at least four batches, none under eight.
    changed = set(range(0, 5000, 98))
    kept = [t.sha256 for i, t in enumerate(tiles) if i not in changed]
    store.put("space", kept, np.eye(4, dtype=np.float32)[np.arange(len(kept)) % 4])
    rebuild = sizes()
    store.close()
    assert sum(rebuild) == len(changed) == 52
    assert len(rebuild) >= 4 and max(rebuild) < 32
    assert min(rebuild[:-1]) >= pipeline.MIN_BATCH


class _CountingStore(DescriptorStore):
    """Counts the stored vectors asked for and the lookups that read none."""

    rows_read = 0
    lookups = 0

    def vectors(
        self,
        space: str,
        shas: Sequence[str],
        dim: int | None,
        out: Callable[[int], np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        self.rows_read += len(shas)
        return super().vectors(space, shas, dim, out)

    def missing(self, space: str, shas: Sequence[str]) -> set[str]:
        self.lookups += 1
        return super().missing(space, shas)


def _index_and_vectors(
    vpr: Vpr, corpus: Path, store: DescriptorStore, out: Path, stem: str
) -> np.ndarray:
    files, _ = pipeline.embed_and_index(
        vpr.select(corpus), corpus, vpr.run, vpr.backbone.input, vpr.space, store, out, stem
    )
    assert files is not None
    index = faiss.read_index(files.index_path)
    return cast(np.ndarray, index.reconstruct_n(0, index.ntotal))


def test_a_rebuild_reads_each_stored_vector_once_and_writes_the_index_a_cold_build_would(
    vpr: Vpr, corpus: Path, tmp_path: Path
) -> None:
    tiles = vpr.select(corpus).tiles
    store = _CountingStore(tmp_path / "store.sqlite")
    _index_and_vectors(vpr, corpus, store, tmp_path, "cold")
    for tile in tiles[10:13]:
        replace_tile_bytes(corpus, tile.z, tile.x, tile.y, other_jpeg(tile.z, tile.x, tile.y))
    # Two more tiles take the bytes of a changed one: embedded once, indexed thrice.
    with open_corpus(corpus) as c:
        data = c.read(tiles[10].z, tiles[10].x, tiles[10].y)
    for tile in tiles[40:42]:
        replace_tile_bytes(corpus, tile.z, tile.x, tile.y, data)
    store.rows_read = store.lookups = 0
    rebuilt = _index_and_vectors(vpr, corpus, store, tmp_path, "rebuild")
    # The lookup reads the 80 stored rows; the index reads back only the 5 embedded.
    assert (store.rows_read, store.lookups) == (80 + 5, 0)
    fresh = tmp_path / "fresh.sqlite"
    cold = DescriptorStore(fresh)
    expected = _index_and_vectors(vpr, corpus, cold, tmp_path, "fresh")
    cold.close()
    store.close()
    np.testing.assert_array_equal(rebuilt, expected)
    np.testing.assert_array_equal(rebuilt[40:42], np.repeat(rebuilt[10:11], 2, axis=0))


def test_tiles_with_equal_bytes_are_embedded_once(vpr: Vpr, corpus: Path, tmp_path: Path) -> None:
    tiles = vpr.select(corpus).tiles
    with open_corpus(corpus) as c:
        data = c.read(tiles[0].z, tiles[0].x, tiles[0].y)
    for tile in tiles[1:4]:
        replace_tile_bytes(corpus, tile.z, tile.x, tile.y, data)
    store = DescriptorStore(tmp_path / "store.sqlite")
    result = embed(vpr, corpus, store)
    assert (result.generated, result.reused) == (77, 3)
    files = write_index(vpr.select(corpus), store, vpr.space, tmp_path, "dup")
    store.close()
    index = faiss.read_index(files.index_path)
    vectors = index.reconstruct_n(0, 4)
    np.testing.assert_array_equal(vectors[1:], np.repeat(vectors[:1], 3, axis=0))


@pytest.mark.parametrize(
    ("cores", "cpu_engine", "gpu_engine"),
    [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 4, 6), (16, 4, 12), (64, 4, 12)],
)
def test_decoding_threads_leave_the_cores_to_a_cpu_engine_and_take_them_beside_a_gpu(
    monkeypatch: pytest.MonkeyPatch, cores: int, cpu_engine: int, gpu_engine: int
) -> None:
    monkeypatch.setattr(decode.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert decode.decode_workers() == decode.decode_workers(False) == cpu_engine
    assert decode.decode_workers(on_accelerator=True) == gpu_engine


def test_a_batch_the_corpus_cannot_read_at_once_is_read_tile_by_tile(
    vpr: Vpr, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from takeoff_cache.errors import CorpusError

    tiles = vpr.select(corpus).tiles[:5]
    with open_corpus(corpus) as source:
        expected = [source.read(t.z, t.x, t.y) for t in tiles]
        assert decode.read_tiles(source, tiles) == expected

        # The joined statement fails (as on a damaged file), one tile is gone.
        monkeypatch.setattr(
            "takeoff_cache.tiles.corpus._read_many_sql",
            lambda n: "SELECT no_such_column FROM tiles",
        )
        read_one = source.read

        def read(z: int, x: int, y: int) -> bytes:
            if (z, x, y) == (tiles[2].z, tiles[2].x, tiles[2].y):
                raise CorpusError("corpus: tile gone")
            return read_one(z, x, y)

        source.read = read  # type: ignore[method-assign]
        assert decode.read_tiles(source, tiles) == [*expected[:2], None, *expected[3:]]


def test_embedding_dates_the_space(vpr: Vpr, corpus: Path, tmp_path: Path) -> None:
    store = DescriptorStore(tmp_path / "store.sqlite")
    embed(vpr, corpus, store)
    store.mark_used(vpr.space, 1.0)  # as if last used long ago
    assert embed(vpr, corpus, store).generated == 0  # nothing to embed, still a use
    assert store.prune_spaces(keep=0, idle_s=3600.0) == []
    store.close()


def test_store_never_serves_a_damaged_vector(vpr: Vpr, corpus: Path, tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = DescriptorStore(path)
    embed(vpr, corpus, store)
    store.close()
    shas = [t.sha256 for t in vpr.select(corpus).tiles[:4]]
    db = sqlite3.connect(path)
    damage = [
        np.full(VPR_DIM, np.nan, np.float32).tobytes(),
        b"abc",
        np.full(VPR_DIM, 3.0, np.float32).tobytes(),  # finite, not unit length
        "x" * 4 * VPR_DIM,  # text of a vector's length, not a vector
    ]
    with db:
        for sha, blob in zip(shas, damage, strict=True):
            db.execute("UPDATE vectors SET vector = ? WHERE tile = ?", (blob, bytes.fromhex(sha)))
    db.close()
    store = DescriptorStore(path)
    assert store.get(vpr.space, shas, VPR_DIM) == {}
    # A rebuild looks rows up by key only: the damage is found when the index reads
    # the vectors, and those tiles are embedded again.
    assert store.missing(vpr.space, shas) == set()
    files, result = pipeline.embed_and_index(
        vpr.select(corpus),
        corpus,
        vpr.run,
        vpr.backbone.input,
        vpr.space,
        store,
        tmp_path / "indexes",
        "healed",
    )
    assert files is not None
    assert (result.generated, result.reused) == (4, 76)
    assert set(store.get(vpr.space, shas, VPR_DIM)) == set(shas)
    index = faiss.read_index(files.index_path)
    vectors = index.reconstruct_n(0, index.ntotal)
    assert np.all(np.isfinite(vectors))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    store.close()


_KILLED_CHILD = """
import sys, time
from pathlib import Path
from takeoff_cache.descriptors import pipeline
from takeoff_cache.descriptors.store import DescriptorStore
from takeoff_cache.backbones.file import load_backbones, place_recognition
from takeoff_cache.tiles.corpus import select_tiles
from takeoff_cache.engines import get_backend
from takeoff_cache.build.request import parse_request, read_request_file

corpus, store_path, engine, request = (Path(a) for a in sys.argv[1:5])
req = parse_request(read_request_file(request))
backbone = place_recognition(load_backbones(req.backbones))
runner = get_backend("onnxruntime").load(engine, backbone, backbone.output)
space = sys.argv[5]
selection = select_tiles(corpus, req.bbox.as_tuple(), req.zoom_levels)

def run(batch):
    time.sleep(0.03)  # widen the window in which the parent kills us
    return runner.run(batch)

def progress(done, total):
    print(done, flush=True)

store = DescriptorStore(store_path)
pipeline.embed_tiles(selection, corpus, run, backbone.input, space, store,
                        batch_size=2, workers=1, progress=progress)
print("finished", flush=True)
"""


def test_store_survives_a_killed_embedding_run(vpr: Vpr, corpus: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "store.sqlite"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_KILLED_CHILD),
            str(corpus),
            str(store_path),
            vpr.record.store_path,
            str(vpr.request.corpus.parent / "request.toml"),
            vpr.space,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    try:
        for line in child.stdout:
            if line.strip() != "finished" and int(line) >= 30:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    store = DescriptorStore(store_path)
    assert sqlite3.connect(store_path).execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    rows = sqlite3.connect(store_path).execute("SELECT tile, vector FROM vectors")
    stored = {tile.hex(): np.frombuffer(blob, dtype=np.float32) for tile, blob in rows}
    assert 0 < len(stored) < 80, "the kill must land mid-embedding"
    # Every stored vector is whole, unit length, and the engine's own answer for its tile.
    selection = vpr.select(corpus)
    by_sha = {t.sha256: t for t in selection.tiles}
    with open_corpus(corpus) as c:
        tiles = [by_sha[sha] for sha in stored]
        pixels = np.stack([decode_tile(c.read(t.z, t.x, t.y), vpr.backbone.input) for t in tiles])
    fresh = l2_normalize(vpr.run(Normalizer.for_spec(vpr.backbone.input)(pixels)))
    got = np.stack(list(stored.values()))
    assert got.shape == fresh.shape == (len(stored), VPR_DIM)
    np.testing.assert_allclose(got, fresh, atol=1e-5)
    # The next run picks up where the killed one stopped.
    result = embed(vpr, corpus, store)
    assert (result.generated, result.reused) == (80 - len(stored), len(stored))
    write_index(selection, store, vpr.space, tmp_path, "resumed")
    store.close()


# --------------------------------------------------------------------------- bad tiles, end to end


def _tiles(demo: Demo) -> list[tuple[int, int, int]]:
    with sqlite3.connect(demo.corpus) as db:
        rows = db.execute("SELECT zoom_level, tile_column, tile_row FROM tiles").fetchall()
    # MBTiles rows are TMS; replace_tile_bytes takes XYZ rows.
    return sorted((z, x, (1 << z) - 1 - row) for z, x, row in rows)


@pytest.mark.usefixtures("prefect_harness")
def test_undecodable_tiles_fail_the_build_and_keep_the_previous_cache(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    assert run_cli(capsys, *demo.build_args()).code == 0
    manifest = (demo.cache / "Manifest.json").read_bytes()
    index = next(
        a for a in json.loads(manifest)["signed"]["artifacts"] if a["kind"] == "faiss_index"
    )
    assert (index["index_type"], index["recall_at_1"], index["count"]) == ("Flat", 1.0, 80)
    # Called outside any async context, Artifact.get returns the artifact itself.
    progress = cast(Any, Artifact.get(artifact_key("descriptors", demo.cache.resolve())))
    assert progress is not None and progress.data == 100.0  # the UI's bar reached the end
    # Sent from a background thread, still filed under the build's run.
    assert progress.flow_run_id is not None and progress.task_run_id is not None
    (z1, x1, y1), (z2, x2, y2) = _tiles(demo)[3], _tiles(demo)[50]
    with sqlite3.connect(demo.corpus) as db:
        good = db.execute("SELECT tile_data FROM tiles LIMIT 1").fetchone()[0]
    replace_tile_bytes(demo.corpus, z1, x1, y1, bytes(good[: len(good) // 2]))  # truncated JPEG
    replace_tile_bytes(demo.corpus, z2, x2, y2, b"<html>not found</html>")  # garbage
    result = run_cli(capsys, *demo.build_args())
    assert result.code == 3
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert f"{z1}/{x1}/{y1}: truncated" in line and f"{z2}/{x2}/{y2}: not an image" in line
    assert "Traceback" not in result.err
    assert (demo.cache / "Manifest.json").read_bytes() == manifest
    verify_cache(demo.cache, load_trust_store(demo.trust))


@pytest.mark.usefixtures("prefect_harness")
def test_many_bad_tiles_list_twenty_and_count_the_rest(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    bad = _tiles(demo)[:25]
    for z, x, y in bad:
        replace_tile_bytes(demo.corpus, z, x, y, b"\xff\xd8\xff")  # the same broken bytes
    result = run_cli(capsys, *demo.build_args("--json"))
    assert result.code == 3
    report = result.json()
    assert report["outcome"] == "failure"
    listed = [f"{z}/{x}/{y}" for z, x, y in bad]
    reason = report["failure_reason"]
    assert reason.startswith("25 tile(s) cannot be decoded")
    assert all(f"{zxy}:" in reason for zxy in listed[:20])
    assert not any(f"{zxy}:" in reason for zxy in listed[20:])
    assert "and 5 more" in reason
    assert len(result.err_lines) == 1 and "and 5 more" in result.err_lines[0]
    assert not (demo.cache / "Manifest.json").exists()
    # One set of broken bytes among 80 tiles: the 55 good ones are embedded and stored.
    assert (report["descriptors_generated"], report["descriptors_reused"]) == (55, 0)
