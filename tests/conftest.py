"""Shared fixtures: one Prefect test harness per session, demo inputs copied per test.

Prefect settings are set before anything imports Prefect: results and the
harness database go to a temporary PREFECT_HOME (the harness does not
isolate cached results), and analytics are off.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.support.procs import PrefectServer

_PREFECT_HOME = tempfile.mkdtemp(prefix="takeoff-cache-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"
os.environ["PREFECT_SERVER_LOGGING_LEVEL"] = "WARNING"
os.environ.pop("PREFECT_API_URL", None)
# A command's Prefect API ends with it: no warm one outlives a test (the tests of the
# warm one turn it on for themselves, and stop it).
os.environ["TAKEOFF_CACHE_PREFECT_IDLE_MIN"] = "0"  # core/env.py: PREFECT_IDLE_MIN

DEMO_TILES = 60  # 4x4 tiles at z16 plus 8x8 at z17: 80 tiles


def cuda_available() -> bool:
    try:
        from takeoff_cache.engines import tensorrt_available

        return tensorrt_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The one place the gpu mark is honoured.
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA and TensorRT")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[PrefectServer]:
    """One real ``prefect server start`` for every test that runs builds as subprocesses."""
    from tests.support.procs import PrefectServer

    server = PrefectServer()
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from takeoff_cache.demo import make_demo_data

    root = tmp_path_factory.mktemp("demo-source")
    make_demo_data(root, tiles=DEMO_TILES, seed=7)
    return root


@dataclass
class Demo:
    root: Path
    work: Path

    @property
    def request(self) -> Path:
        return self.root / "request.toml"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def corpus(self) -> Path:
        return self.root / "corpus.mbtiles"

    @property
    def trust(self) -> Path:
        return self.root / "trust"

    def build_args(self, *extra: str) -> list[str]:
        return ["build", "--request", str(self.request), "--work-dir", str(self.work), *extra]


@pytest.fixture
def demo(demo_source: Path, tmp_path: Path) -> Demo:
    """A private copy of the demo inputs with an empty cache root and work folder."""
    root = tmp_path / "demo"
    shutil.copytree(demo_source, root)
    return Demo(root, tmp_path / "work")
