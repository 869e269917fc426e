"""The descriptors phase: the store, the embedding pipeline, the index, and bad tiles end to end."""

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

from takeoff_cache import descriptors
from takeoff_cache.backbones import Backbone, InputSpec, load_backbones, place_recognition
from takeoff_cache.corpus import TileSelection, open_corpus, select_tiles
from takeoff_cache.demo.synthetic import render_tile, replace_tile_bytes
from takeoff_cache.engines import get_backend
from takeoff_cache.engines.store import EngineRecord, ensure_engine
from takeoff_cache.errors import DescriptorError
from takeoff_cache.keys import load_trust_store
from takeoff_cache.preprocess import Normalizer, decode_tile
from takeoff_cache.request import BuildRequest, parse_request, read_request_file
from takeoff_cache.verify import verify_cache
from tasks.build import artifact_key

from ._cli import run_cli
from .conftest import Demo


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
        return descriptors.descriptor_space(self.record.key, self.backbone.input)

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


def embed(
    vpr: Vpr, corpus: Path, store: descriptors.DescriptorStore, **kw: Any
) -> descriptors.EmbedResult:
    return descriptors.embed_tiles(
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
    from takeoff_cache.preprocess import _decode_with_pillow, decode_into

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


def test_descriptor_space_changes_with_the_input_spec_not_only_the_model(vpr: Vpr) -> None:
    spec = vpr.backbone.input
    moved = InputSpec(spec.name, spec.size, spec.channels, spec.mean, (0.5, 0.5, 0.5))
    assert descriptors.descriptor_space("k", spec) != descriptors.descriptor_space("k", moved)
    assert descriptors.descriptor_space("k", spec) != descriptors.descriptor_space("k2", spec)


# --------------------------------------------------------------------------- embedding


def test_progress_is_reported_per_batch_with_increasing_counts(
    vpr: Vpr, corpus: Path, tmp_path: Path
) -> None:
    calls: list[tuple[int, int]] = []
    store = descriptors.DescriptorStore(tmp_path / "store.sqlite")
    result = embed(vpr, corpus, store, batch_size=8, progress=lambda d, t: calls.append((d, t)))
    store.close()
    assert result.generated == 80 and result.reused == 0 and not result.bad_tiles
    done = [d for d, _ in calls]
    assert {t for _, t in calls} == {80}
    assert done == sorted(done) and done[0] == 0 and done[-1] == 80
    # Updated while embedding, not only at the start and the end.
    assert len(set(done)) >= 80 // 8


def test_changing_tiles_reembeds_exactly_those(vpr: Vpr, corpus: Path, tmp_path: Path) -> None:
    store = descriptors.DescriptorStore(tmp_path / "store.sqlite")
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
    one = descriptors.DescriptorStore(tmp_path / "one.sqlite")
    many = descriptors.DescriptorStore(tmp_path / "many.sqlite")
    embed(vpr, corpus, one, batch_size=8, streams=1)
    result = embed(vpr, corpus, many, batch_size=8, streams=max(2, vpr.streams), workers=3)
    assert (result.generated, result.reused) == (80, 0)
    shas = [t.sha256 for t in vpr.select(corpus).tiles]
    a, b = one.get(vpr.space, shas, 336), many.get(vpr.space, shas, 336)
    assert set(a) == set(b) == set(shas)
    for sha in shas:
        np.testing.assert_allclose(a[sha], b[sha], atol=1e-6)
    one.close()
    many.close()


class _StoreThatWaitsForTheEngine(descriptors.DescriptorStore):
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
    result = descriptors.embed_tiles(
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

    from takeoff_cache.corpus import Tile

    tiles = [Tile(16, i, 0, hashlib.sha256(str(i).encode()).hexdigest()) for i in range(5000)]
    store = descriptors.DescriptorStore(tmp_path / "store.sqlite")

    def sizes() -> list[int]:
        batches = descriptors.todo_batches(tiles, store, "space", 32, lambda n: None)
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
    assert min(rebuild[:-1]) >= descriptors.MIN_BATCH


class _CountingStore(descriptors.DescriptorStore):
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
    vpr: Vpr, corpus: Path, store: descriptors.DescriptorStore, out: Path, stem: str
) -> np.ndarray:
    files, _ = descriptors.embed_and_index(
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
    cold = descriptors.DescriptorStore(fresh)
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
    store = descriptors.DescriptorStore(tmp_path / "store.sqlite")
    result = embed(vpr, corpus, store)
    assert (result.generated, result.reused) == (77, 3)
    files = descriptors.write_index(vpr.select(corpus), store, vpr.space, tmp_path, "dup")
    store.close()
    index = faiss.read_index(files.index_path)
    vectors = index.reconstruct_n(0, 4)
    np.testing.assert_array_equal(vectors[1:], np.repeat(vectors[:1], 3, axis=0))


def test_the_store_copies_its_log_into_its_file_while_it_is_still_read(tmp_path: Path) -> None:
    import time

    path = tmp_path / "store.sqlite"
    store = descriptors.DescriptorStore(path)
    digests = _digests("log", 300)
    vectors = np.eye(336, dtype=np.float32)[:300]
    store.put("space", digests, vectors)
    before = path.stat().st_size  # the new rows are in the write-ahead log
    store.checkpoint_behind()
    deadline = time.monotonic() + 10
    while path.stat().st_size < before + vectors.nbytes and time.monotonic() < deadline:
        assert len(store.get("space", digests[:5], 336)) == 5  # reads go on meanwhile
        time.sleep(0.01)
    assert path.stat().st_size >= before + vectors.nbytes
    got = store.get("space", digests, 336)
    store.close()
    assert len(got) == 300 and np.array_equal(got[digests[7]], vectors[7])


def test_store_lookup_returns_exactly_the_absent_digests(tmp_path: Path) -> None:
    import hashlib

    store = descriptors.DescriptorStore(tmp_path / "store.sqlite")
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(9000)]
    vectors = np.eye(8, dtype=np.float32)[np.arange(3000) % 8]
    store.put("space-a", digests[:3000], vectors)
    store.put("space-b", digests[3000:6000], vectors)
    # More digests than one query takes, duplicates, and another space's rows.
    asked = digests + digests[:10]
    assert store.missing("space-a", asked) == set(digests[3000:])
    assert store.missing("space-b", asked) == set(digests[:3000] + digests[6000:])
    assert store.missing("space-c", digests[:5]) == set(digests[:5])
    assert store.missing("space-a", []) == set()
    assert store.have("space-a", digests[2990:3010]) == set(digests[2990:3000])
    store.close()


def test_a_batch_is_stored_by_one_statement_row_for_row(tmp_path: Path) -> None:
    store = descriptors.DescriptorStore(tmp_path / "store.sqlite")
    digests = _digests("put", 6)
    rows = np.eye(6, dtype=np.float32)
    store.put("other", digests, rows[::-1])
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    store.put("space", digests[:5], rows[:5])
    assert sum("INTO vectors" in sql for sql in statements) == 1
    store._db.set_trace_callback(None)
    # Stored again: the new rows replace the old, the others stay.
    store.put("space", digests[1:3], rows[[4, 5]])
    store.put("space", [], rows[:0])
    matrix, ok = store.vectors("space", digests, 6)
    assert ok.tolist() == [True] * 5 + [False]
    np.testing.assert_array_equal(matrix[:5], rows[[0, 4, 5, 3, 4]])
    other, _ = store.vectors("other", digests, 6)
    np.testing.assert_array_equal(other, rows[::-1])
    with pytest.raises(ValueError, match="3 digests for 2 vectors"):
        store.put("space", digests[:3], rows[:2])
    store.close()


@pytest.mark.parametrize(
    ("cores", "cpu_engine", "gpu_engine"),
    [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 4, 6), (16, 4, 12), (64, 4, 12)],
)
def test_decoding_threads_leave_the_cores_to_a_cpu_engine_and_take_them_beside_a_gpu(
    monkeypatch: pytest.MonkeyPatch, cores: int, cpu_engine: int, gpu_engine: int
) -> None:
    monkeypatch.setattr(descriptors.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert descriptors.decode_workers() == descriptors.decode_workers(False) == cpu_engine
    assert descriptors.decode_workers(on_accelerator=True) == gpu_engine


def test_a_batch_the_corpus_cannot_read_at_once_is_read_tile_by_tile(
    vpr: Vpr, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from takeoff_cache.errors import CorpusError

    tiles = vpr.select(corpus).tiles[:5]
    with open_corpus(corpus) as source:
        expected = [source.read(t.z, t.x, t.y) for t in tiles]
        assert descriptors.read_tiles(source, tiles) == expected

        # The joined statement fails (as on a damaged file), one tile is gone.
        monkeypatch.setattr(
            "takeoff_cache.corpus._read_many_sql", lambda n: "SELECT no_such_column FROM tiles"
        )
        read_one = source.read

        def read(z: int, x: int, y: int) -> bytes:
            if (z, x, y) == (tiles[2].z, tiles[2].x, tiles[2].y):
                raise CorpusError("corpus: tile gone")
            return read_one(z, x, y)

        source.read = read  # type: ignore[method-assign]
        assert descriptors.read_tiles(source, tiles) == [*expected[:2], None, *expected[3:]]


def test_stored_vectors_are_read_straight_into_the_rows_given(tmp_path: Path) -> None:
    store = descriptors.DescriptorStore(tmp_path / "store.sqlite")
    digests = _digests("row", 5)
    store.put("space", digests[:4], np.eye(4, dtype=np.float32))
    db = sqlite3.connect(tmp_path / "store.sqlite")
    with db:  # a row of another size: damaged
        db.execute(
            "UPDATE vectors SET vector = ? WHERE tile = ?", (b"\0" * 12, bytes.fromhex(digests[3]))
        )
    db.close()
    storage = np.zeros((7, 4), dtype=np.float32)
    asked: list[int] = []

    def rows(dim: int) -> np.ndarray:
        asked.append(dim)
        return storage[2:7]

    matrix, ok = store.vectors("space", digests[::-1], None, rows)
    assert asked == [4] and np.shares_memory(matrix, storage)
    assert ok.tolist() == [False, False, True, True, True]
    np.testing.assert_array_equal(storage[2:4], 0.0)  # absent, damaged
    np.testing.assert_array_equal(storage[4:7], np.eye(4, dtype=np.float32)[2::-1])
    np.testing.assert_array_equal(storage[:2], 0.0)  # outside the rows given
    # Nothing whole to read: no rows are asked for.
    _, ok = store.vectors("space", digests[3:], 4, rows)
    assert asked == [4] and not ok.any()
    store.close()


@pytest.mark.parametrize("dim", [None, 4])
def test_rows_of_one_size_read_at_once_are_still_checked_one_by_one(
    tmp_path: Path, dim: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.sqlite"
    store = descriptors.DescriptorStore(path)
    digests = _digests("row", 7)
    unit = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1]]
    store.put("space", digests[:6], unit)
    db = sqlite3.connect(path)
    with db:  # every row still a blob of 16 bytes: the statement's one blob is used
        for i, value in ((1, np.nan), (2, 3.0)):  # not finite; finite, not unit length
            vector = np.full(4, value, np.float32).tobytes()
            db.execute(
                "UPDATE vectors SET vector = ? WHERE tile = ?", (vector, bytes.fromhex(digests[i]))
            )
    db.close()
    storage = np.full((9, 4), 7.0, dtype=np.float32)

    def rows(size: int) -> np.ndarray:
        storage[1:8] = 0.0  # zeroed, as ExactRows' storage is
        return storage[1:8]

    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    order = [6, 5, 0, 2, 4, 1, 3]  # scattered; digests[6] was never stored
    matrix, ok = store.vectors("space", [digests[i] for i in order], dim, rows)
    assert not any("SELECT k.i / 32, v.vector" in sql for sql in statements)
    assert np.shares_memory(matrix, storage)
    assert ok.tolist() == [False, True, True, False, True, False, True]
    np.testing.assert_array_equal(storage[1:8][ok], unit[[5, 0, 4, 3]])
    np.testing.assert_array_equal(storage[1:8][~ok], 0.0)
    np.testing.assert_array_equal(storage[[0, 8]], 7.0)  # outside the rows given
    # A row that is text of a vector's length is not a vector: read one row at a time.
    db = sqlite3.connect(path)
    with db:
        db.execute(
            "UPDATE vectors SET vector = ? WHERE tile = ?", ("x" * 16, bytes.fromhex(digests[0]))
        )
    db.close()
    matrix, ok = store.vectors("space", digests[:6], dim)
    assert any("SELECT k.i / 32, v.vector" in sql for sql in statements)
    assert ok.tolist() == [False, False, False, True, True, True]
    np.testing.assert_array_equal(matrix[3:], unit[3:])
    # Rows too wide to join within the budget: one at a time too, with the same result.
    monkeypatch.setattr(descriptors, "_GATHER_MAX_BYTES", 16 * 2)
    statements.clear()
    matrix, ok = store.vectors("space", digests[3:6], dim)
    assert ok.all() and not any("group_concat" in sql for sql in statements)
    np.testing.assert_array_equal(matrix, unit[3:])
    store.close()


def _digests(prefix: str, n: int) -> list[str]:
    import hashlib

    return [hashlib.sha256(f"{prefix}{i}".encode()).hexdigest() for i in range(n)]


def test_store_prunes_spaces_neither_recent_nor_among_the_last_used(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    day = 24 * 3600.0
    store = descriptors.DescriptorStore(tmp_path / "store.sqlite")
    vectors = np.eye(8, dtype=np.float32)[np.arange(20) % 8]
    # Used 1, 2, ... 6 days ago and 10, 20 days ago.
    ages = {"d1": 1, "d2": 2, "d3": 3, "d4": 4, "d5": 5, "d6": 6, "d10": 10, "d20": 20}
    for space, age in ages.items():
        store.put(space, _digests(space, 20), vectors)
        store.mark_used(space, now - age * day)
    # The four most recent stay however old; the rest only while used within the week.
    assert store.prune_spaces(keep=4, idle_s=7 * day, now=now) == ["d10", "d20"]
    for space in ages:
        kept = space not in ("d10", "d20")
        assert store.missing(space, _digests(space, 20)) == (
            set() if kept else set(_digests(space, 20))
        )
    assert store.prune_spaces(keep=4, idle_s=7 * day, now=now) == []
    # A week on, only the four most recent remain; a space used now is one of them.
    store.mark_used("d6", now + 7 * day)
    assert store.prune_spaces(keep=4, idle_s=7 * day, now=now + 7 * day) == ["d4", "d5"]
    left = dict(
        store._db.execute(
            "SELECT key, COUNT(*) FROM spaces JOIN vectors ON space = id GROUP BY key"
        )
    )
    assert left == {"d6": 20, "d1": 20, "d2": 20, "d3": 20}
    # A pruned space starts afresh.
    store.put("d20", _digests("d20", 3), vectors[:3])
    assert store.missing("d20", _digests("d20", 20)) == set(_digests("d20", 20)[3:])
    store.close()


def test_a_store_written_before_spaces_were_dated_counts_them_as_used_now(tmp_path: Path) -> None:
    import time

    path = tmp_path / "store.sqlite"
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE spaces (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE)")
        db.execute(
            "CREATE TABLE vectors (space INTEGER NOT NULL, tile BLOB NOT NULL,"
            " vector BLOB NOT NULL, UNIQUE (space, tile))"
        )
        db.execute("INSERT INTO spaces (key) VALUES ('old')")
        unit = np.eye(8, dtype=np.float32)[0].tobytes()
        db.executemany(
            "INSERT INTO vectors VALUES (1, ?, ?)",
            [(bytes.fromhex(d), unit) for d in _digests("old", 5)],
        )
    db.close()
    before = time.time()
    store = descriptors.DescriptorStore(path)
    assert store.missing("old", _digests("old", 5)) == set()
    # Dated at the upgrade: nothing goes until it has been unused for the idle time.
    assert store.prune_spaces(keep=0, idle_s=3600.0, now=before + 60) == []
    assert store.prune_spaces(keep=0, idle_s=3600.0, now=before + 7200) == ["old"]
    store.close()
    descriptors.DescriptorStore(path).close()  # opening a dated store changes nothing


def test_embedding_dates_the_space(vpr: Vpr, corpus: Path, tmp_path: Path) -> None:
    store = descriptors.DescriptorStore(tmp_path / "store.sqlite")
    embed(vpr, corpus, store)
    store.mark_used(vpr.space, 1.0)  # as if last used long ago
    assert embed(vpr, corpus, store).generated == 0  # nothing to embed, still a use
    assert store.prune_spaces(keep=0, idle_s=3600.0) == []
    store.close()


def test_store_never_serves_a_damaged_vector(vpr: Vpr, corpus: Path, tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = descriptors.DescriptorStore(path)
    embed(vpr, corpus, store)
    store.close()
    shas = [t.sha256 for t in vpr.select(corpus).tiles[:4]]
    db = sqlite3.connect(path)
    damage = [
        np.full(336, np.nan, np.float32).tobytes(),
        b"abc",
        np.full(336, 3.0, np.float32).tobytes(),  # finite, not unit length
        "x" * 4 * 336,  # text of a vector's length, not a vector
    ]
    with db:
        for sha, blob in zip(shas, damage, strict=True):
            db.execute("UPDATE vectors SET vector = ? WHERE tile = ?", (blob, bytes.fromhex(sha)))
    db.close()
    store = descriptors.DescriptorStore(path)
    assert store.get(vpr.space, shas, 336) == {}
    # A rebuild looks rows up by key only: the damage is found when the index reads
    # the vectors, and those tiles are embedded again.
    assert store.missing(vpr.space, shas) == set()
    files, result = descriptors.embed_and_index(
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
    assert set(store.get(vpr.space, shas, 336)) == set(shas)
    index = faiss.read_index(files.index_path)
    vectors = index.reconstruct_n(0, index.ntotal)
    assert np.all(np.isfinite(vectors))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    store.close()


_KILLED_CHILD = """
import sys, time
from pathlib import Path
from takeoff_cache import descriptors
from takeoff_cache.backbones import load_backbones, place_recognition
from takeoff_cache.corpus import select_tiles
from takeoff_cache.engines import get_backend
from takeoff_cache.request import parse_request, read_request_file

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

store = descriptors.DescriptorStore(store_path)
descriptors.embed_tiles(selection, corpus, run, backbone.input, space, store,
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

    store = descriptors.DescriptorStore(store_path)
    assert store.integrity_problems() == []
    rows = sqlite3.connect(store_path).execute("SELECT tile, vector FROM vectors")
    stored = {tile.hex(): np.frombuffer(blob, dtype=np.float32) for tile, blob in rows}
    assert 0 < len(stored) < 80, "the kill must land mid-embedding"
    # Every stored vector is whole, unit length, and the engine's own answer for its tile.
    selection = vpr.select(corpus)
    by_sha = {t.sha256: t for t in selection.tiles}
    with open_corpus(corpus) as c:
        tiles = [by_sha[sha] for sha in stored]
        pixels = np.stack([decode_tile(c.read(t.z, t.x, t.y), vpr.backbone.input) for t in tiles])
    fresh = descriptors.l2_normalize(vpr.run(Normalizer.for_spec(vpr.backbone.input)(pixels)))
    got = np.stack(list(stored.values()))
    assert got.shape == fresh.shape == (len(stored), 336)
    np.testing.assert_allclose(got, fresh, atol=1e-5)
    # The next run picks up where the killed one stopped.
    result = embed(vpr, corpus, store)
    assert (result.generated, result.reused) == (80 - len(stored), len(stored))
    descriptors.write_index(selection, store, vpr.space, tmp_path, "resumed")
    store.close()


# --------------------------------------------------------------------------- index


@pytest.fixture(scope="module")
def filled(vpr: Vpr, tmp_path_factory: pytest.TempPathFactory) -> descriptors.DescriptorStore:
    store = descriptors.DescriptorStore(tmp_path_factory.mktemp("filled") / "store.sqlite")
    embed(vpr, vpr.request.corpus, store)
    return store


def test_index_is_exact_below_the_threshold(
    vpr: Vpr, filled: descriptors.DescriptorStore, tmp_path: Path
) -> None:
    selection = vpr.select(vpr.request.corpus)
    assert len(selection.tiles) <= descriptors.EXACT_INDEX_MAX
    files = descriptors.write_index(selection, filled, vpr.space, tmp_path, "exact")
    assert (files.index_type, files.nprobe, files.recall_at_1) == ("Flat", None, 1.0)
    index = faiss.read_index(files.index_path)
    assert isinstance(index, faiss.IndexFlatIP) and index.ntotal == 80
    rows = json.loads(Path(files.map_path).read_text())["rows"]
    assert rows == [[t.z, t.x, t.y] for t in selection.tiles]
    _, found = index.search(index.reconstruct_n(0, 80), 1)
    assert (found[:, 0] == np.arange(80)).all()


def test_index_is_approximate_above_the_threshold_with_measured_recall(
    vpr: Vpr, filled: descriptors.DescriptorStore, tmp_path: Path
) -> None:
    selection = vpr.select(vpr.request.corpus)
    files = descriptors.write_index(
        selection, filled, vpr.space, tmp_path, "approx", exact_max=len(selection.tiles) - 1
    )
    assert files.index_type.startswith("IVF") and files.nprobe is not None
    assert files.recall_at_1 >= descriptors.RECALL_TARGET and files.recall_queries == 80
    index = faiss.read_index(files.index_path)
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nprobe == files.nprobe  # stored in the file: a reader searches as measured
    exact = descriptors.write_index(selection, filled, vpr.space, tmp_path, "exact")
    vectors = faiss.read_index(exact.index_path).reconstruct_n(0, 80)
    _, found = index.search(vectors, 1)
    assert (found[:, 0] == np.arange(80)).all()


def test_large_index_uses_scalar_codes_and_still_meets_the_recall_target(
    vpr: Vpr,
    filled: descriptors.DescriptorStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(descriptors, "FLAT_CODES_MAX_BYTES", 0)  # as if beyond memory
    selection = vpr.select(vpr.request.corpus)
    files = descriptors.write_index(selection, filled, vpr.space, tmp_path, "sq8", exact_max=0)
    # SQ8 when it meets the target on its own; full vectors otherwise, never less recall.
    assert files.index_type.endswith((",SQ8", ",Flat")) and files.index_type.startswith("IVF")
    assert files.recall_at_1 >= descriptors.RECALL_TARGET


def test_index_refuses_tiles_without_a_descriptor(vpr: Vpr, corpus: Path, tmp_path: Path) -> None:
    store = descriptors.DescriptorStore(tmp_path / "store.sqlite")
    tiles = vpr.select(corpus).tiles
    embed(vpr, corpus, store)
    gone = tiles[7]
    replace_tile_bytes(corpus, gone.z, gone.x, gone.y, other_jpeg(gone.z, gone.x, gone.y))
    with pytest.raises(DescriptorError, match=gone.zxy):
        descriptors.write_index(vpr.select(corpus), store, vpr.space, tmp_path, "gap")
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
