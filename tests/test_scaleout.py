"""Descriptor work spread over a real Dask cluster (two worker processes on 127.0.0.1)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from takeoff_cache import scaleout
from takeoff_cache.keys import load_trust_store
from takeoff_cache.verify import verify_cache

from ._cli import run_cli
from .conftest import Demo

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
    from takeoff_cache.backbones import load_backbones, place_recognition
    from takeoff_cache.errors import EngineError
    from takeoff_cache.request import read_request_file

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
