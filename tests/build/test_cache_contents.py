"""Nothing unlisted rides along in a real cache, and a listed path taken over is repaired."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from takeoff_cache.core.layout import LOCK_NAME, STAGING_NAME
from takeoff_cache.trust.keys import load_trust_store
from takeoff_cache.trust.verify import verify_cache
from tests.conftest import Demo
from tests.support.cli import CliResult, run_cli
from tests.support.procs import change_one_tile

pytestmark = pytest.mark.usefixtures("prefect_harness")


def build(capsys: pytest.CaptureFixture[str], demo: Demo, *extra: str) -> CliResult:
    return run_cli(capsys, *demo.build_args("--json", *extra))


def verify(capsys: pytest.CaptureFixture[str], demo: Demo) -> CliResult:
    return run_cli(capsys, "verify", str(demo.cache), "--trust", str(demo.trust))


def engine_path(demo: Demo) -> Path:
    signed = json.loads((demo.cache / "Manifest.json").read_text())["signed"]
    return demo.cache / next(a["path"] for a in signed["artifacts"] if a["kind"] == "engine")


def test_an_engine_replaced_by_a_symlink_is_repaired_by_the_next_strict_build(
    capsys: pytest.CaptureFixture[str], demo: Demo, tmp_path: Path
) -> None:
    assert build(capsys, demo).code == 0
    engine = engine_path(demo)
    copy = tmp_path / "engine-copy.onnx"
    shutil.copyfile(engine, copy)
    engine.unlink()
    engine.symlink_to(copy)
    assert verify(capsys, demo).code == 7

    change_one_tile(demo.root)
    result = build(capsys, demo)  # strict coverage, the default
    assert result.code == 0, result.err
    assert result.json()["outcome"] == "success"
    assert not engine.is_symlink() and engine.is_file()
    assert copy.read_bytes() == engine.read_bytes()  # replaced, not written through
    verify_cache(demo.cache, load_trust_store(demo.trust))
    assert verify(capsys, demo).code == 0


def test_a_stray_file_in_staging_or_the_lock_file_fails_verify(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    assert build(capsys, demo).code == 0
    assert verify(capsys, demo).code == 0
    stray = demo.cache / STAGING_NAME / "engines" / "cargo.onnx"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"rides along")
    result = verify(capsys, demo)
    assert result.code == 7 and f"{STAGING_NAME}/engines/cargo.onnx" in result.err
    shutil.rmtree(demo.cache / STAGING_NAME)

    (demo.cache / LOCK_NAME).write_bytes(b"cargo")
    result = verify(capsys, demo)
    assert result.code == 7 and LOCK_NAME in result.err
    (demo.cache / LOCK_NAME).write_bytes(b"")
    assert verify(capsys, demo).code == 0
    # A build leaves only what the manifest lists beside Manifest.json and the empty lock.
    assert build(capsys, demo).code == 0
    assert (demo.cache / LOCK_NAME).stat().st_size == 0
    assert not (demo.cache / STAGING_NAME).exists()
