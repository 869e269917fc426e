"""Descriptor work spread over a real Dask cluster (two worker processes on 127.0.0.1)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

from takeoff_cache.descriptors import scaleout
from takeoff_cache.trust.keys import load_trust_store
from takeoff_cache.trust.verify import verify_cache
from tests.conftest import Demo
from tests.support.cli import run_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    ) as local:
        yield local


def cache_files(cache: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(cache)): p.read_bytes()
        for p in sorted(cache.rglob("*"))
        if p.is_file() and p.parent.name == "index"
    }


def test_dask_build_writes_the_index_a_single_process_build_writes(
    capsys: pytest.CaptureFixture[str],
    demo: Demo,
    demo_source: Path,
    tmp_path: Path,
    cluster: LocalCluster,
) -> None:
    local = run_cli(capsys, *demo.build_args("--json"))
    assert local.code == 0, local.err

    spread = Demo(tmp_path / "spread", tmp_path / "spread-work")
    shutil.copytree(demo_source, spread.root)
    result = run_cli(
        capsys, *spread.build_args("--json", "--dask-address", cluster.scheduler_address)
    )
    assert result.code == 0, result.err
    report = result.json()
    assert report["outcome"] == "success"
    assert report["descriptors_generated"] == report["tiles"] == local.json()["tiles"]
    verify_cache(spread.cache, load_trust_store(spread.trust))

    # Both worker processes loaded the engine and embedded chunks.
    with Client(cluster) as client:
        loaded = client.run(lambda: len(scaleout._runners))
    assert sorted(loaded.values()) == [1, 1], loaded

    ours, theirs = cache_files(demo.cache), cache_files(spread.cache)
    assert ours and set(ours) == set(theirs)
    for name in ours:
        assert ours[name] == theirs[name], f"{name} differs from the single-process build"

    # A second spread build reuses every stored descriptor: nothing is sent to the cluster.
    again = run_cli(
        capsys,
        *spread.build_args("--json", "--zoom", "16", "--dask-address", cluster.scheduler_address),
    )
    assert again.code == 0, again.err
    assert again.json()["descriptors_generated"] == 0


def test_unreachable_scheduler_is_one_line_and_exit_8(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    result = run_cli(capsys, *demo.build_args("--dask-address", "tcp://127.0.0.1:9"))
    assert result.code == 8, result.err
    assert len(result.err_lines) == 1 and "Dask scheduler" in result.err_lines[0], result.err
    assert "Traceback" not in result.err
    assert not (demo.cache / "Manifest.json").exists()


def test_chunks_never_exceed_the_cap_and_cover_the_window() -> None:
    assert scaleout.chunk_batches(80, window=4, batch_size=32) == 1
    assert scaleout.chunk_batches(0, window=4, batch_size=32) == 1
    assert scaleout.chunk_batches(1_000_000, window=4, batch_size=32) == 16
    # Enough chunks for every slot of the window to get work twice.
    per = scaleout.chunk_batches(5_000, window=4, batch_size=32)
    assert -(-5_000 // (per * 32)) >= 8


def test_a_changed_engine_file_is_refused_by_the_worker(tmp_path: Path, demo: Demo) -> None:
    from takeoff_cache.backbones.file import load_backbones, place_recognition
    from takeoff_cache.build.request import read_request_file
    from takeoff_cache.errors import EngineError

    backbone = place_recognition(load_backbones(Path(read_request_file(demo.request)["backbones"])))
    engine = tmp_path / "engine.onnx"
    engine.write_bytes(b"not the compiled engine")
    ref = scaleout.EngineRef(str(engine), "0" * 64, "onnxruntime", backbone)
    chunk = scaleout.Chunk(0, (), ())
    with pytest.raises(EngineError, match="differs"):
        scaleout.embed_chunk(ref, chunk)
    missing = scaleout.EngineRef(str(tmp_path / "gone.onnx"), "0" * 64, "onnxruntime", backbone)
    with pytest.raises(EngineError, match="same path"):
        scaleout.embed_chunk(missing, chunk)


def test_chunks_run_as_plain_dask_tasks_without_a_prefect_server(
    demo_source: Path, tmp_path: Path, cluster: LocalCluster
) -> None:
    """Prefect's temporary local API is out of the workers' reach: chunks skip task runs."""
    from takeoff_cache_prefect.tasks.scaleout import embed_on_dask

    from takeoff_cache.backbones.file import load_backbones, place_recognition
    from takeoff_cache.build.request import parse_request, read_request_file
    from takeoff_cache.descriptors import pipeline
    from takeoff_cache.descriptors.store import DescriptorStore, descriptor_space
    from takeoff_cache.engines import get_backend
    from takeoff_cache.engines.store import ensure_engine
    from takeoff_cache.tiles.corpus import select_tiles

    request = parse_request(read_request_file(demo_source / "request.toml"))
    backbone = place_recognition(load_backbones(request.backbones))
    backend = get_backend("onnxruntime")
    record = ensure_engine(backbone, backend, "fp32", None, None, tmp_path / "work")
    space = descriptor_space(record.key, backbone.input)
    selection = select_tiles(request.corpus, request.bbox.as_tuple(), request.zoom_levels)
    engine = scaleout.EngineRef(record.store_path, record.sha256, backend.name, backbone)

    spread = DescriptorStore(tmp_path / "spread.sqlite")
    stats = scaleout.SpreadStats()
    result = embed_on_dask(
        cluster.scheduler_address,
        selection,
        request.corpus,
        engine,
        space,
        spread,
        stats=stats,
        task_runs=False,
    )
    assert (result.generated, result.bad_tiles) == (len(selection.tiles), ())
    assert len(stats.workers) == 2 and stats.chunks >= 2

    local = DescriptorStore(tmp_path / "local.sqlite")
    runner = backend.load(Path(record.store_path), backbone, backbone.output or "")
    pipeline.embed_tiles(
        selection, request.corpus, runner.run, backbone.input, space, local, streams=2
    )
    shas = [t.sha256 for t in selection.tiles]
    ours, ok = spread.vectors(space, shas, None)
    theirs, ok2 = local.vectors(space, shas, None)
    assert ok.all() and ok2.all()
    np.testing.assert_array_equal(ours, theirs)
    spread.close()
    local.close()


def test_bad_tiles_found_on_workers_fail_the_build_and_keep_the_previous_cache(
    capsys: pytest.CaptureFixture[str], demo: Demo, cluster: LocalCluster
) -> None:
    import sqlite3

    from takeoff_cache.demo.synthetic import replace_tile_bytes

    first = run_cli(capsys, *demo.build_args())
    assert first.code == 0, first.err
    manifest = (demo.cache / "Manifest.json").read_bytes()
    with sqlite3.connect(demo.corpus) as db:
        z, x, row = db.execute(
            "SELECT zoom_level, tile_column, tile_row FROM tiles ORDER BY 1, 2, 3 LIMIT 1"
        ).fetchone()
    y = (1 << z) - 1 - row  # MBTiles rows are TMS
    replace_tile_bytes(demo.corpus, z, x, y, b"<html>not found</html>")
    result = run_cli(capsys, *demo.build_args("--dask-address", cluster.scheduler_address))
    assert result.code == 3, result.err
    assert len(result.err_lines) == 1 and f"{z}/{x}/{y}: not an image" in result.err_lines[0]
    assert (demo.cache / "Manifest.json").read_bytes() == manifest
    verify_cache(demo.cache, load_trust_store(demo.trust))
