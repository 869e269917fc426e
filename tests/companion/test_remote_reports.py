"""The companion's reports are checked, not taken at their word."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from takeoff_cache.companion.answers import neutralize
from takeoff_cache.companion.remote import (
    check_report,
    claims_success,
    remote_build,
    remote_verify,
)
from takeoff_cache.companion.ssh import connect
from takeoff_cache.errors import EXIT_COMPANION, RemoteCommandError, RemoteOutputError
from tests.companion.test_companion import Rig
from tests.support.companion import console_script


def test_report_types_are_checked_and_new_fields_tolerated() -> None:
    check_report("build", {"outcome": "success", "tiles": 3, "from_the_future": [1]}, "t")
    with pytest.raises(RemoteOutputError, match="'tiles'"):
        check_report("build", {"outcome": "success", "tiles": "many"}, "t")
    with pytest.raises(RemoteOutputError, match="'outcome'"):
        check_report("build", {"outcome": 1}, "t")
    with pytest.raises(RemoteOutputError, match="'ok'"):
        check_report("verify", {"ok": "yes"}, "t")
    assert claims_success("build", {"outcome": "idempotent_no_op"})
    assert not claims_success("build", {"outcome": "failure"})
    assert not claims_success("verify", {"ok": 1})


def test_terminal_controls_are_made_visible() -> None:
    assert neutralize("a\x1b[31mb\tc\x07\x1b]0;t\x07") == "a^[[31mb\tc^G^[]0;t^G"
    assert neutralize("x\ny\r", lines=True) == "x\ny\r"


def _liar(rig: Rig, tmp_path: Path, report: dict[str, Any], code: int) -> None:
    body = (
        "import sys\nsys.stderr.write('\\x1b]0;owned\\x07progress\\n')\n"
        f"print({json.dumps(json.dumps(report))})\nsys.exit({code})\n"
    )
    rig.companion.bin = console_script(tmp_path / "liar-bin", "liar", body).parent


@pytest.mark.parametrize(
    ("what", "report", "code"),
    [
        ("build", {"outcome": "success"}, 1),
        ("build", {"outcome": "failure"}, 0),
        ("verify", {"ok": False}, 0),
        ("verify", {"ok": True}, 3),
    ],
)
def test_a_forged_report_fails_with_the_companion_code(
    rig: Rig, tmp_path: Path, what: str, report: dict[str, Any], code: int
) -> None:
    _liar(rig, tmp_path, report, code)
    lines: list[str] = []

    async def run() -> Any:
        async with connect(rig.settings()) as conn:
            if what == "build":
                return await remote_build(
                    conn, rig.companion.paths, "r.toml", tool="liar", on_line=lines.append
                )
            return await remote_verify(conn, rig.companion.paths, tool="liar")

    with pytest.raises(RemoteCommandError) as caught:
        asyncio.run(run())
    assert caught.value.exit_code == EXIT_COMPANION
    assert "\n" not in str(caught.value)
    assert all("\x1b" not in line and "\x07" not in line for line in lines)
    if what == "build":
        assert any("^[]0;owned^G" in line for line in lines)


def test_a_report_of_the_wrong_type_names_its_field(rig: Rig, tmp_path: Path) -> None:
    _liar(rig, tmp_path, {"outcome": "success", "tiles": "many", "new": 1}, 0)

    async def run() -> Any:
        async with connect(rig.settings()) as conn:
            return await remote_build(conn, rig.companion.paths, "r.toml", tool="liar")

    with pytest.raises(RemoteOutputError, match="'tiles'") as caught:
        asyncio.run(run())
    assert caught.value.exit_code == EXIT_COMPANION
