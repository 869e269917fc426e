"""``takeoff-cache inspect``: a manifest read through the parser ``verify`` uses, any bad
cache one ``inspect:`` line per problem, never an internal error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from takeoff_cache.core.layout import MANIFEST_NAME
from takeoff_cache.trust.keys import Signer
from takeoff_cache.trust.manifest import sign_manifest
from tests.support.cli import CliResult, run_cli
from tests.support.factories import make_cache, new_signer

FILES = {"engines/vpr.onnxruntime.fp32.abc123.onnx": b"engine " * 10, "index/vpr.faiss": b"ix"}


@pytest.fixture
def signer() -> Signer:
    return new_signer()


@pytest.fixture
def cache(tmp_path: Path, signer: Signer) -> Path:
    root = tmp_path / "cache"
    make_cache(root, signer, FILES)
    return root


def assert_inspect_refused(result: CliResult, code: int, *words: str) -> None:
    assert result.code == code, (result.code, result.err)
    assert result.out == ""
    assert result.err_lines, "no problem reported"
    for line in result.err_lines:
        assert line.startswith("takeoff-cache: inspect: "), line
    assert "internal error" not in result.err and "verify:" not in result.err
    for word in words:
        assert any(word in line for line in result.err_lines), (word, result.err)


def test_inspect_summarizes_a_manifest(
    capsys: pytest.CaptureFixture[str], cache: Path, signer: Signer
) -> None:
    result = run_cli(capsys, "inspect", str(cache))
    assert result.code == 0, result.err
    assert "version:        1" in result.out
    for rel in FILES:
        assert rel in result.out
    assert signer.keyid[:16] in result.out
    assert result.err == ""


def test_a_manifest_that_is_a_folder_is_one_line(
    capsys: pytest.CaptureFixture[str], cache: Path
) -> None:
    (cache / MANIFEST_NAME).unlink()
    (cache / MANIFEST_NAME).mkdir()
    result = run_cli(capsys, "inspect", str(cache))
    assert_inspect_refused(result, 7, "is a folder, not a file")
    assert len(result.err_lines) == 1


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"signed": [], "signatures": []},
        {"signed": {"artifacts": 3}, "signatures": [{"keyid": 1, "sig": None}]},
        {"signed": {}, "signatures": [{"keyid": "a", "sig": "AAAA"}]},
    ],
)
def test_json_of_the_wrong_shape_is_an_inspect_problem(
    capsys: pytest.CaptureFixture[str], cache: Path, doc: object
) -> None:
    (cache / MANIFEST_NAME).write_text(json.dumps(doc))
    assert_inspect_refused(run_cli(capsys, "inspect", str(cache)), 7)


def test_every_structural_problem_is_its_own_line(
    capsys: pytest.CaptureFixture[str], cache: Path, signer: Signer
) -> None:
    signed = json.loads((cache / MANIFEST_NAME).read_bytes())["signed"]
    signed["version"] = 0
    signed["created_at"] = "yesterday"
    signed["artifacts"][0]["path"] = "../escape"
    signed["request"] = "not an object"  # shown as nothing, never a crash
    (cache / MANIFEST_NAME).write_bytes(sign_manifest(signed, signer))
    result = run_cli(capsys, "inspect", str(cache))
    assert_inspect_refused(result, 7, "signed.version", "signed.created_at", "../escape")
    assert len(result.err_lines) == 3


def test_text_from_the_manifest_cannot_drive_the_terminal(
    capsys: pytest.CaptureFixture[str], cache: Path
) -> None:
    # Unsigned (inspect does not verify): a lone surrogate could not be signed anyway.
    doc = json.loads((cache / MANIFEST_NAME).read_bytes())
    doc["signed"]["request"] = {"sector_class": "\x1b[2J\udc80", "bbox": [1, 2, 3, 4]}
    (cache / MANIFEST_NAME).write_text(json.dumps(doc))
    result = run_cli(capsys, "inspect", str(cache))
    assert result.code == 0, result.err
    assert "\x1b" not in result.out and "\\x1b[2J\\udc80" in result.out


@pytest.mark.parametrize("what", ["missing", "file", "no manifest"])
def test_a_cache_root_that_is_not_a_cache_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, what: str
) -> None:
    target = tmp_path / "target"
    if what == "file":
        target.write_bytes(b"x")
    elif what == "no manifest":
        target.mkdir()
    result = run_cli(capsys, "inspect", str(target))
    code, word = {
        "missing": (2, "does not exist"),
        "file": (2, "is a file, not a folder"),
        "no manifest": (7, "missing"),
    }[what]
    assert_inspect_refused(result, code, word)
    assert len(result.err_lines) == 1


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_a_manifest_that_is_a_fifo_is_refused_without_blocking(
    tmp_path: Path, cache: Path, signer: Signer, command: str
) -> None:
    (cache / MANIFEST_NAME).unlink()
    os.mkfifo(cache / MANIFEST_NAME)
    trust = tmp_path / "trust.pub"
    trust.write_bytes(
        signer.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    args = [str(cache)] + (["--trust", str(trust)] if command == "verify" else [])
    done = subprocess.run(
        [sys.executable, "-m", "takeoff_cache.cli.main", command, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 7, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_png_of_a_cache_without_a_tile_map_is_one_line(
    capsys: pytest.CaptureFixture[str], cache: Path, tmp_path: Path
) -> None:
    result = run_cli(capsys, "inspect", str(cache), "--png", str(tmp_path / "map.png"))
    assert_inspect_refused(result, 7, "tile maps")
    assert not (tmp_path / "map.png").exists()


def test_png_into_a_missing_folder_is_refused(
    capsys: pytest.CaptureFixture[str], cache: Path, tmp_path: Path
) -> None:
    result = run_cli(capsys, "inspect", str(cache), "--png", str(tmp_path / "no" / "map.png"))
    assert_inspect_refused(result, 2, "does not exist")
