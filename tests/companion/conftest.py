"""The companion tests' rig: a real SSH server on 127.0.0.1 standing in for the companion."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.companion.test_companion import Rig


@pytest.fixture
def rig(tmp_path: Path, prefect_server: Any) -> Iterator[Rig]:
    rig = Rig(tmp_path, prefect_server.env())
    try:
        yield rig
    finally:
        rig.close()
