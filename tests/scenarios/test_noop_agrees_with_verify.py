"""Whatever happens to a cache between builds, a build that exits 0 leaves a cache that
``verify`` passes: a no-op never vouches for a cache that verification refuses.

One demo cache is built for the module. Each example copies it and runs a few
rounds of out-of-band changes (stray files, deleted or altered artifacts,
symlinks in place of files and folders, changed manifest bytes), each round
ended by a real build through the command line. After every build that exits 0,
``verify`` exits 0. Before each build, the no-op check the command line runs
before Prefect (``front.prechecked``) is asked too: when it offers a no-op, the
cache verifies. Builds skip the self-test (``--self-test 0``) to keep examples quick.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from takeoff_cache.build.front import prechecked
from takeoff_cache.build.options import build_options
from takeoff_cache.build.request import read_request_file
from takeoff_cache.cli.main import main
from takeoff_cache.core.layout import LOCK_NAME, MANIFEST_NAME
from tests.support.cli import run_cli
from tests.support.procs import copy_sandbox

pytestmark = pytest.mark.usefixtures("prefect_harness")

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
STRAY_PLACES = ("stray.txt", "engines/extra.onnx", "index/notes/a.json", ".hidden")


@dataclass(frozen=True)
class Change:
    """One out-of-band change; ``target`` picks an artifact of the first build's manifest."""

    kind: str
    target: int = 0
    how: str = ""

    def __str__(self) -> str:
        return f"{self.kind}[{self.target}]{':' + self.how if self.how else ''}"


CHANGES = st.one_of(
    st.builds(Change, st.just("stray"), st.integers(0, len(STRAY_PLACES) - 1)),
    st.builds(Change, st.just("delete"), st.integers(0, 9)),
    st.builds(
        Change, st.just("alter"), st.integers(0, 9), st.sampled_from(["flip", "append", "cut"])
    ),
    st.builds(Change, st.just("symlink"), st.integers(0, 9), st.sampled_from(["file", "folder"])),
    st.builds(Change, st.just("lock"), st.just(0)),
    st.builds(
        Change,
        st.just("manifest"),
        st.just(0),
        st.sampled_from(["flip", "reindent", "cut", "delete", "symlink"]),
    ),
)
# Rounds of changes, each ended by a build.
ROUNDS = st.lists(st.lists(CHANGES, min_size=1, max_size=3), min_size=1, max_size=2)


@pytest.fixture(scope="module")
def built(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_sandbox(demo_source, tmp_path_factory.mktemp("noop-verify") / "built")
    assert main(build_argv(root)) == 0
    return root


def build_argv(root: Path) -> list[str]:
    request, work = str(root / "request.toml"), str(root / "work")
    return ["build", "--request", request, "--work-dir", work, "--self-test", "0", "--json"]


def artifacts_of(root: Path) -> list[str]:
    signed = json.loads((root / "cache" / MANIFEST_NAME).read_text())["signed"]
    return sorted(a["path"] for a in signed["artifacts"])


def _rewrite(path: Path, data: bytes) -> None:
    path.unlink()  # a cache's copy may be read-only
    path.write_bytes(data)


def _to_symlink(path: Path, cache: Path) -> None:
    """Replace ``path`` with a symlink to an identical copy outside the cache."""
    outside = cache.parent / "outside" / path.relative_to(cache)
    if outside.exists() or outside.is_symlink():
        return
    outside.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        shutil.copytree(path, outside, symlinks=True)
        shutil.rmtree(path)
    else:
        shutil.copyfile(path, outside, follow_symlinks=False)
        path.unlink()
    path.symlink_to(outside)


def apply(change: Change, cache: Path, artifacts: list[str]) -> None:
    if change.kind == "lock":
        (cache / LOCK_NAME).write_bytes(b"hidden")
        return
    if change.kind == "stray":
        path = cache / STRAY_PLACES[change.target]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not listed\n")
        return
    if change.kind == "manifest":
        path = cache / MANIFEST_NAME
        if not path.is_file() or path.is_symlink():
            return
        data = path.read_bytes()
        if change.how == "flip":
            _rewrite(path, data[:100] + bytes([data[100] ^ 0x01]) + data[101:])
        elif change.how == "reindent":  # the signature covers the canonical form: still valid
            _rewrite(path, json.dumps(json.loads(data), indent=1).encode())
        elif change.how == "cut":
            _rewrite(path, data[: len(data) // 2])
        elif change.how == "delete":
            path.unlink()
        else:
            _to_symlink(path, cache)
        return
    path = cache / artifacts[change.target % len(artifacts)]
    if not path.is_file() or path.is_symlink():
        return  # gone or replaced by an earlier change
    if change.kind == "delete":
        path.unlink()
    elif change.kind == "alter":
        data = path.read_bytes()
        changed = {
            "flip": data[:-1] + bytes([data[-1] ^ 0x01]),
            "append": data + b"\0",
            "cut": data[:-1],
        }[change.how]
        _rewrite(path, changed)
    elif change.how == "file":
        _to_symlink(path, cache)
    else:
        _to_symlink(path.parent, cache)


def verifies(capsys: pytest.CaptureFixture[str], root: Path) -> bool:
    result = run_cli(capsys, "verify", str(root / "cache"), "--trust", str(root / "trust"))
    assert result.code in (0, 7), result.err
    return result.code == 0


def precheck_offers_noop(root: Path) -> bool:
    raw = read_request_file(root / "request.toml")
    options = build_options(work_dir=str(root / "work"), self_test=0)
    with prechecked(raw, options) as pre:
        return pre.noop_report is not None


@SETTINGS
@given(rounds=ROUNDS)
def test_a_build_that_exits_0_leaves_a_cache_that_verifies(
    capsys: pytest.CaptureFixture[str],
    tmp_path_factory: pytest.TempPathFactory,
    built: Path,
    rounds: list[list[Change]],
) -> None:
    root = copy_sandbox(built, tmp_path_factory.mktemp("example") / "root")
    artifacts = artifacts_of(root)
    for changes in rounds:
        for change in changes:
            apply(change, root / "cache", artifacts)
        if precheck_offers_noop(root):
            assert verifies(capsys, root), f"a no-op was offered after {list(map(str, changes))}"
        result = run_cli(capsys, *build_argv(root))
        assert "Traceback" not in result.err
        if result.code == 0:
            outcome = result.json()["outcome"]
            assert verifies(capsys, root), f"{outcome} after {list(map(str, changes))}"
    shutil.rmtree(root.parent, ignore_errors=True)
