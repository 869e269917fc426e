"""A flow run records its parameters as they are, without FastAPI's encoder for JSON."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prefect import flow

from takeoff_cache_prefect.results import json_parameters


@json_parameters
@flow(name="parameters-probe", validate_parameters=False)
def probe(**kwargs: object) -> None:
    """Never run: only its parameters are serialized."""


def test_json_parameters_are_recorded_as_they_are() -> None:
    given = {
        "s": "x",
        "n": 3,
        "f": -33.9,
        "b": True,
        "none": None,
        "l": [1, [2.5]],
        "d": {"k": [None]},
    }
    assert probe.serialize_parameters(given) == given


def test_anything_else_still_goes_through_the_encoder() -> None:
    given = {"path": Path("/srv/corpus.mbtiles"), "pair": (1, 2), "keys": {1: "one"}, "s": "x"}
    assert probe.serialize_parameters(given) == {
        "path": "/srv/corpus.mbtiles",
        "pair": [1, 2],
        "keys": {1: "one"},
        "s": "x",
    }


def test_a_build_flow_run_records_its_parameters_without_loading_fastapi() -> None:
    program = (
        "import sys\n"
        "from takeoff_cache_prefect.flows.build import build_cache\n"
        "given = {'bbox': [-33.9, 18.4, -33.8, 18.5], 'area': None}\n"
        "assert build_cache.serialize_parameters(given) == given\n"
        "print('fastapi' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
