"""No value given for the companion reaches its shell unquoted: the tool, the paths."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from takeoff_cache.companion.bringup import CompanionPaths, bring_up, probe_command, tool_words
from takeoff_cache.companion.remote import remote_build, remote_verify
from takeoff_cache.companion.ssh import connect
from takeoff_cache.errors import CompanionError, CompanionToolError
from tests.companion.test_companion import Rig

MARK = "MARK"
# Each would create MARK in the companion's folder if pasted into its shell as it is.
ATTACKS = [
    f"$(touch {MARK})",
    f"`touch {MARK}`",
    f"takeoff-cache; touch {MARK}",
    f"takeoff-cache && touch {MARK}",
    f"takeoff-cache\ntouch {MARK}",
]


async def _bring_up_and_build(rig: Rig, paths: CompanionPaths, tool: str) -> None:
    async with connect(rig.settings()) as conn:
        await bring_up(
            conn, paths, send_bytes=1, build_estimate_bytes=1, backend="onnxruntime", tool=tool
        )
        await remote_build(conn, paths, f"{paths.inputs_dir}/request.toml", tool=tool)


def _assert_refused_without_mark(rig: Rig, caught: pytest.ExceptionInfo[CompanionError]) -> None:
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)
    assert not (rig.companion.root / MARK).exists()
    assert rig.companion.commands  # something did run there


def test_tool_words_split_a_command_with_arguments() -> None:
    assert tool_words("docker run --rm img takeoff-cache") == [
        "docker", "run", "--rm", "img", "takeoff-cache",
    ]  # fmt: skip
    assert tool_words("'/opt/my venv/bin/python' -m takeoff_cache.cli.main")[0] == (
        "/opt/my venv/bin/python"
    )
    for bad in ("", "  ", "'unclosed"):
        with pytest.raises(CompanionToolError):
            tool_words(bad)
    assert probe_command("$(touch x) y", "auto", {"cache_root": "~/c;d"}) == (
        "exec '$(touch' 'x)' y companion-probe --backend=auto '--cache-root=~/c;d'"
    )


@pytest.mark.parametrize("tool", ATTACKS)
def test_a_tool_that_is_shell_code_is_not_run(rig: Rig, tool: str) -> None:
    with pytest.raises(CompanionError) as caught:
        asyncio.run(_bring_up_and_build(rig, rig.companion.paths, tool))
    _assert_refused_without_mark(rig, caught)
    if tool.startswith(("$", "`", "takeoff-cache;")):
        assert caught.type is CompanionToolError


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_path_that_is_shell_code_is_not_run(rig: Rig, attack: str) -> None:
    bad = CompanionPaths(
        cache_root=f"~/cache{attack}", key="~/operator.key", trust=f"~/trust/{attack}",
        work_dir=f"~/work{attack}", inputs_dir=f"~/inputs{attack}",
    )  # fmt: skip
    with pytest.raises(CompanionError) as caught:
        asyncio.run(_bring_up_and_build(rig, bad, "takeoff-cache"))
    _assert_refused_without_mark(rig, caught)

    async def build_and_verify() -> None:
        # Past bring-up, as if the companion had said these paths exist.
        async with connect(rig.settings()) as conn:
            with contextlib.suppress(CompanionError):
                await remote_build(conn, bad, f"{bad.inputs_dir}/request.toml")
            await remote_verify(conn, bad, state_file=f"~/state{attack}")

    with pytest.raises(CompanionError) as caught:
        asyncio.run(build_and_verify())
    _assert_refused_without_mark(rig, caught)
