"""Disk full and I/O errors under a build: one clear line, a documented exit code, no
traceback; the cache that was there still verifies and the next build succeeds.

The faults are raised where the real call would fail (TAKEOFF_CACHE_FAIL_AT, see
takeoff_cache/core/faults.py): the build is an update of a cache holding version 1,
with one tile and one model changed, so it writes an engine, an index and a manifest.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from takeoff_cache.cli.main import main
from takeoff_cache.core import env, faults
from tests.support.cli import CliResult, run_cli
from tests.support.procs import assert_clean, change_model, change_one_tile, copy_sandbox

pytestmark = pytest.mark.usefixtures("prefect_harness")

ENOSPC = os.strerror(errno.ENOSPC)
EIO = os.strerror(errno.EIO)


def build(capsys: pytest.CaptureFixture[str], root: Path) -> CliResult:
    return run_cli(
        capsys,
        "build",
        "--request",
        str(root / "request.toml"),
        "--work-dir",
        str(root / "work"),
        "--json",
    )


@pytest.fixture(scope="module")
def base(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_sandbox(demo_source, tmp_path_factory.mktemp("io") / "base")
    argv = ["build", "--request", str(root / "request.toml"), "--work-dir", str(root / "work")]
    assert main(argv) == 0
    assert assert_clean(root).version == 1
    return root


@pytest.fixture
def update(base: Path, tmp_path: Path) -> Path:
    root = copy_sandbox(base, tmp_path / "cache-copy")
    change_one_tile(root)
    change_model(root)
    return root


@pytest.fixture
def fail_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    def arm(spec: str) -> None:
        monkeypatch.setenv(env.FAIL_AT, spec)
        faults.reset()

    yield arm
    monkeypatch.delenv(env.FAIL_AT, raising=False)
    faults.reset()


@pytest.mark.parametrize(
    ("spec", "code", "words", "committed"),
    [
        # Write, fsync and rename of the new engine's record, then of the new manifest.
        ("store.record.write:ENOSPC", 1, ["engines:", ".json", ENOSPC], False),
        ("store.record.fsync:EIO", 1, ["engines:", ".json", EIO], False),
        ("store.record.rename:EIO", 1, ["engines:", ".json", EIO], False),
        ("commit.pending.write:EIO", 1, ["commit: cannot write", "Manifest.pending", EIO], False),
        (
            "commit.pending.fsync:ENOSPC",
            1,
            ["commit: cannot write", "Manifest.pending", ENOSPC],
            False,
        ),
        (
            "commit.pending.rename:ENOSPC",
            1,
            ["commit: cannot write", "Manifest.pending", ENOSPC],
            False,
        ),
        ("fsutil.copy:1:ENOSPC", 1, ["commit: cannot copy", ".staging", ENOSPC], False),
        ("commit.move:2:EIO", 1, ["commit: cannot move", EIO], False),
        ("commit.switch:ENOSPC", 1, ["commit: cannot rename", "Manifest.json", ENOSPC], False),
        ("commit.delete:1:EIO", 1, ["commit: cannot delete", EIO], True),
        ("store.compile:ENOSPC", 8, ["backbone 'keypoints'", "writing engine", ENOSPC], False),
        ("descriptors.index_write:EIO", 8, ["descriptors: cannot write index", EIO], False),
    ],
)
def test_an_io_fault_gives_one_line_and_an_exit_code_and_keeps_a_cache_that_verifies(
    capsys: pytest.CaptureFixture[str],
    update: Path,
    fail_at: object,
    spec: str,
    code: int,
    words: list[str],
    committed: bool,
) -> None:
    fail_at(spec)  # type: ignore[operator]
    result = build(capsys, update)
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err + result.out
    assert len(result.err_lines) == 1, result.err
    for word in words:
        assert word in result.err_lines[0], result.err_lines[0]
    assert result.err_lines[0].startswith("takeoff-cache: error: ")
    assert result.json()["failure_reason"]  # --json still prints a report
    # A fault after the commit point leaves the new cache in force, else the old one.
    assert assert_clean(update).version == (2 if committed else 1)

    fail_at("")  # type: ignore[operator]
    again = build(capsys, update)
    assert again.code == 0, again.err
    assert again.json()["outcome"] == ("idempotent_no_op" if committed else "success")
    assert assert_clean(update).version == 2
