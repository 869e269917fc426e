"""What a companion prints costs bounded memory and time linear in its size: lines are
cut as they arrive, only the tails of its streams are kept (a real SSH server on
127.0.0.1)."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from typing import Any

import pytest

from takeoff_cache.companion.remote import remote_build
from takeoff_cache.companion.ssh import LINE_LIMIT, STDERR_LIMIT, STDOUT_LIMIT, connect
from takeoff_cache.errors import CompanionTimeoutError, RemoteOutputError
from tests.companion.test_companion import Rig
from tests.support.companion import console_script

MB = 1 << 20


def _run(rig: Rig, tool: str, lines: list[str]) -> Any:
    async def run() -> Any:
        async with connect(rig.settings()) as conn:
            return await remote_build(
                conn, rig.companion.paths, "r.toml", tool=tool, on_line=lines.append
            )

    return asyncio.run(run())


def test_megabytes_of_stderr_without_a_newline_cost_little(rig: Rig) -> None:
    size = 16 * MB  # splitting that was quadratic took 16 s for 4 MB, forever for 8
    body = (
        "import sys\nblock = '\\x1b[2J' + 'x' * (1 << 20)\n"
        f"for _ in range({size // MB}):\n    sys.stderr.write(block)\n"
        "sys.stderr.write('\\nlast line\\n')\n"
        'print(\'{"outcome": "success", "tiles": 1}\')\n'
    )
    console_script(rig.tool_bin, "noisy", body)
    lines: list[str] = []
    tracemalloc.start()
    started = time.monotonic()
    try:
        result = _run(rig, "noisy", lines)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 120  # against a hang, not a timing
    assert result.report["outcome"] == "success"
    assert peak < size // 2, f"peak {peak / MB:.1f} MiB for {size // MB} MiB of output"
    assert len(lines) == 2 and lines[-1] == "last line"
    assert len(lines[0]) < LINE_LIMIT + 100 and "more characters not shown" in lines[0]
    assert "\x1b" not in lines[0] and lines[0].startswith("^[[2J")


def test_endless_stdout_keeps_its_tail_and_says_why_no_report(rig: Rig) -> None:
    body = (
        "import sys\nfor _ in range(10):\n    sys.stdout.write('y' * (1 << 20) + '\\n')\n"
        "sys.stdout.write('{\"outcome\": ' * 100000)\n"
    )
    console_script(rig.tool_bin, "flood", body)
    with pytest.raises(RemoteOutputError) as caught:
        _run(rig, "flood", [])
    message = str(caught.value)
    assert "\n" not in message and len(message) < 1000
    assert "nested" in message or "characters" in message
    assert "MiB of output" in message
    assert STDOUT_LIMIT < 10 * MB and STDERR_LIMIT < MB


def test_a_command_past_its_timeout_is_stopped_and_named(rig: Rig) -> None:
    console_script(rig.tool_bin, "stuck", "import time\ntime.sleep(60)\n")

    async def run() -> Any:
        async with connect(rig.settings()) as conn:
            return await remote_build(
                conn, rig.companion.paths, "r.toml", tool="stuck", timeout_s=1.0
            )

    with pytest.raises(CompanionTimeoutError) as caught:
        asyncio.run(run())
    assert str(caught.value).endswith("stuck build still running after 1 s; stopped")
