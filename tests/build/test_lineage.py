"""Rollback protection keyed by a cache's signed lineage, through real builds and ``verify``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import Demo
from tests.support.cli import CliResult, run_cli
from tests.support.procs import change_one_tile

pytestmark = pytest.mark.usefixtures("prefect_harness")

VERIFY_FAILED = 7


def build(capsys: pytest.CaptureFixture[str], demo: Demo, cache: Path) -> dict:
    result = run_cli(capsys, *demo.build_args("--cache-root", str(cache), "--json"))
    assert result.code == 0, result.err
    report: dict = result.json()
    return report


def signed(cache: Path) -> dict:
    data: dict = json.loads((cache / "Manifest.json").read_text())["signed"]
    return data


def verify(capsys: pytest.CaptureFixture[str], demo: Demo, cache: Path, state: Path) -> CliResult:
    return run_cli(capsys, "verify", str(cache), "--trust", str(demo.trust), "--state", str(state))


def refused(result: CliResult, *expected: str) -> None:
    assert result.code == VERIFY_FAILED, (result.code, result.out, result.err)
    assert "Traceback" not in result.err
    assert len(result.err_lines) == 1 and all(e in result.err for e in expected), result.err


def test_rebuilds_keep_the_lineage_and_an_older_copy_elsewhere_is_refused(
    capsys: pytest.CaptureFixture[str], demo: Demo, tmp_path: Path
) -> None:
    build(capsys, demo, demo.cache)
    first = signed(demo.cache)
    older = tmp_path / "usb-stick" / "cache"
    shutil.copytree(demo.cache, older)
    state = tmp_path / "seen.json"
    assert verify(capsys, demo, older, state).code == 0  # version 1, seen first

    change_one_tile(demo.root)
    assert build(capsys, demo, demo.cache)["outcome"] == "success"
    second = signed(demo.cache)
    assert second["version"] == 2 and second["lineage"] == first["lineage"]
    assert second["build_identity"] != first["build_identity"]
    assert verify(capsys, demo, demo.cache, state).code == 0

    refused(verify(capsys, demo, older, state), "rollback", first["lineage"])

    other = demo.root / "other-cache"
    other.mkdir()
    build(capsys, demo, other)
    assert signed(other)["lineage"] != first["lineage"]
    assert verify(capsys, demo, other, state).code == 0
    assert set(json.loads(state.read_text())["lineages"]) == {
        first["lineage"],
        signed(other)["lineage"],
    }


def test_the_lineage_is_not_part_of_the_build_identity(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    other = demo.root / "other-cache"
    other.mkdir()
    build(capsys, demo, demo.cache)
    build(capsys, demo, other)
    a, b = signed(demo.cache), signed(other)
    # The same inputs (the cache root is not one): one identity, two lineages.
    assert a["build_identity"] == b["build_identity"]
    assert a["lineage"] != b["lineage"]
    assert build(capsys, demo, demo.cache)["outcome"] == "idempotent_no_op"


def test_a_damaged_state_file_fails_verify_and_is_left_as_it_was(
    capsys: pytest.CaptureFixture[str], demo: Demo, tmp_path: Path
) -> None:
    build(capsys, demo, demo.cache)
    state = tmp_path / "seen.json"
    assert verify(capsys, demo, demo.cache, state).code == 0
    damaged = state.read_bytes()[:-3]
    state.write_bytes(damaged)
    refused(verify(capsys, demo, demo.cache, state), "state:", "cannot be parsed")
    assert state.read_bytes() == damaged

    folder = tmp_path / "state-folder"
    folder.mkdir()
    refused(verify(capsys, demo, demo.cache, folder), "is a folder")
