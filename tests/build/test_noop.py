"""The no-op check refuses every cache ``verify`` refuses: a re-run never vouches for a
cache that fails verification, and the build goes on instead.

One demo cache is built for the module; every test damages its own copy. Both
no-op checks are exercised: the one the command line runs before Prefect starts
(``front.prechecked``) and the flow's own (a build through the CLI, here always a
flow run: the test harness configures a Prefect API).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from takeoff_cache.build.front import prechecked
from takeoff_cache.build.options import build_options
from takeoff_cache.build.report import BuildReport
from takeoff_cache.build.request import read_request_file
from takeoff_cache.cli.main import main
from takeoff_cache.core.layout import LOCK_NAME, MANIFEST_NAME
from tests.support.cli import CliResult, run_cli
from tests.support.procs import copy_sandbox

pytestmark = pytest.mark.usefixtures("prefect_harness")

COVERAGE_VIOLATION = 5
VERIFY_FAILED = 7


@pytest.fixture(scope="module")
def built(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_sandbox(demo_source, tmp_path_factory.mktemp("noop") / "built")
    assert main(build_argv(root)) == 0
    return root


@pytest.fixture
def root(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built demo: inputs, cache and work folder."""
    return copy_sandbox(built, tmp_path / "copy")


def build_argv(root: Path) -> list[str]:
    request, work = str(root / "request.toml"), str(root / "work")
    return ["build", "--request", request, "--work-dir", work, "--json"]


def verify(capsys: pytest.CaptureFixture[str], root: Path) -> CliResult:
    return run_cli(capsys, "verify", str(root / "cache"), "--trust", str(root / "trust"))


def precheck_noop(root: Path) -> BuildReport | None:
    """The no-op report of the check the command line runs before Prefect, if any."""
    raw = read_request_file(root / "request.toml")
    with prechecked(raw, build_options(work_dir=str(root / "work"))) as pre:
        return pre.noop_report


def artifact_paths(root: Path) -> list[str]:
    signed = json.loads((root / "cache" / MANIFEST_NAME).read_text())["signed"]
    return sorted(a["path"] for a in signed["artifacts"])


def test_a_stray_file_refuses_the_no_op_and_the_build_names_it(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    (root / "cache" / "stray.txt").write_text("not listed in the manifest\n")
    assert verify(capsys, root).code == VERIFY_FAILED
    assert precheck_noop(root) is None
    result = run_cli(capsys, *build_argv(root))
    # No no-op: the build ran, and its coverage phase refused the file it does not list.
    assert result.code == COVERAGE_VIOLATION, (result.out, result.err)
    assert "stray.txt" in result.err
    assert verify(capsys, root).code == VERIFY_FAILED
    (root / "cache" / "stray.txt").unlink()
    result = run_cli(capsys, *build_argv(root))
    assert result.code == 0, result.err
    assert result.json()["outcome"] == "idempotent_no_op"
    assert verify(capsys, root).code == 0


def _symlink_to_a_copy(cache: Path, rel: str) -> None:
    """Replace ``rel`` (a file or folder in the cache) with a symlink to an identical
    copy outside the cache."""
    path, outside = cache / rel, cache.parent / "outside" / rel
    outside.parent.mkdir(parents=True)
    if path.is_dir():
        shutil.copytree(path, outside)
        shutil.rmtree(path)
    else:
        shutil.copyfile(path, outside)
        path.unlink()
    path.symlink_to(outside)


def _stray_symlink(cache: Path) -> None:
    (cache / "index" / "link.faiss").symlink_to(cache / artifact_paths(cache.parent)[-1])


def _artifact_symlink(cache: Path) -> None:
    _symlink_to_a_copy(cache, artifact_paths(cache.parent)[0])


def _folder_symlink(cache: Path) -> None:
    _symlink_to_a_copy(cache, Path(artifact_paths(cache.parent)[0]).parent.as_posix())


def _manifest_symlink(cache: Path) -> None:
    _symlink_to_a_copy(cache, MANIFEST_NAME)


def _flipped_byte(cache: Path) -> None:
    path = cache / artifact_paths(cache.parent)[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.unlink()  # its copy may be read-only
    path.write_bytes(bytes(data))


def _deleted(cache: Path) -> None:
    (cache / artifact_paths(cache.parent)[-1]).unlink()


def _lock_with_bytes(cache: Path) -> None:
    (cache / LOCK_NAME).write_bytes(b"hidden")


DAMAGES: dict[str, Callable[[Path], None]] = {
    "stray symlink": _stray_symlink,
    "artifact replaced by a symlink to an identical copy": _artifact_symlink,
    "artifact folder replaced by a symlink to an identical copy": _folder_symlink,
    "manifest replaced by a symlink to an identical copy": _manifest_symlink,
    "flipped byte in an artifact": _flipped_byte,
    "deleted artifact": _deleted,
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_no_no_op_for_a_cache_verify_refuses(
    capsys: pytest.CaptureFixture[str], root: Path, damage: str
) -> None:
    assert verify(capsys, root).code == 0
    assert precheck_noop(root) is not None
    DAMAGES[damage](root / "cache")
    assert verify(capsys, root).code == VERIFY_FAILED
    assert precheck_noop(root) is None


def test_a_lock_file_holding_bytes_is_emptied_by_the_next_build(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    _lock_with_bytes(root / "cache")
    assert verify(capsys, root).code == VERIFY_FAILED
    # Taking the lock empties its file, so the build that follows is a no-op that
    # leaves a cache verify accepts.
    result = run_cli(capsys, *build_argv(root), "--json")
    assert result.code == 0, (result.out, result.err)
    assert result.json()["outcome"] == "idempotent_no_op"
    assert (root / "cache" / LOCK_NAME).stat().st_size == 0
    assert verify(capsys, root).code == 0
