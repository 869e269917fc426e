"""Every input path of a build is checked for its kind by stat, before it is opened: a FIFO
(whose open blocks until a writer comes), a folder for a file or a file for a folder is one
line naming the field and what the path is, with the documented exit code, and promptly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Demo

# field flag -> the exit code its refusal carries (SPEC §9)
FLAGS = {
    "--request": 2,
    "--corpus": 2,
    "--backbones": 2,
    "--calibration": 2,
    "--cache-root": 2,
    "--key": 6,
    "--trust": 6,
}


def build(demo: Demo, *flags: str) -> subprocess.CompletedProcess[str]:
    args = ["--request", str(demo.request), "--work-dir", str(demo.work), *flags]
    return subprocess.run(
        [sys.executable, "-m", "takeoff_cache.cli.main", "build", *args],
        capture_output=True,
        text=True,
        timeout=60,  # a blocked open fails here instead of hanging the suite
        env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"},  # never reached
    )


def assert_one_line(done: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    lines = done.stderr.splitlines()
    assert done.returncode == code, done.stderr
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_a_fifo_for_any_input_path_is_refused_without_blocking(
    demo: Demo, tmp_path: Path, flag: str
) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    if flag == "--request":
        done = subprocess.run(
            [sys.executable, "-m", "takeoff_cache.cli.main", "build", "--request", str(fifo)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    else:
        done = build(demo, flag, str(fifo))
    field = flag.removeprefix("--").replace("-", "_")
    assert_one_line(done, FLAGS[flag], field, "FIFO")


def test_an_onnx_path_that_is_a_fifo_is_refused_without_blocking(demo: Demo) -> None:
    onnx_file = demo.root / "models" / "vpr.onnx"
    onnx_file.unlink()
    os.mkfifo(onnx_file)
    assert_one_line(build(demo), 2, "'vpr'.onnx", "FIFO")


@pytest.mark.parametrize(
    ("flag", "kind", "words"),
    [
        ("--cache-root", "file", ["cache_root", "is a file, not a folder"]),
        ("--backbones", "folder", ["backbones", "is a folder, not a file"]),
        ("--calibration", "folder", ["calibration", "is a folder, not a file"]),
        ("--key", "folder", ["key", "is a folder, not a file"]),
    ],
)
def test_a_path_of_the_wrong_kind_says_what_it_is(
    demo: Demo, tmp_path: Path, flag: str, kind: str, words: list[str]
) -> None:
    target = tmp_path / "target"
    if kind == "file":
        target.write_bytes(b"x")
    else:
        target.mkdir()
    assert_one_line(build(demo, flag, str(target)), FLAGS[flag], *words)
