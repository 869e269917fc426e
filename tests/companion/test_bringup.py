"""Bring-up asks the companion's install itself what it is, whatever command line it
is, and checks the answer before believing it (a real SSH server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from takeoff_cache import __version__
from takeoff_cache.companion.bringup import BringUp, CompanionPaths, bring_up
from takeoff_cache.companion.inputs import Upload
from takeoff_cache.companion.ssh import connect
from takeoff_cache.companion.transfer import send_files
from takeoff_cache.errors import (
    EXIT_COMPANION,
    CompanionError,
    CompanionToolError,
    RemoteOutputError,
)
from tests.companion.test_companion import Rig
from tests.support.companion import console_script


async def _bring_up(rig: Rig, tool: str, paths: CompanionPaths | None = None) -> BringUp:
    async with connect(rig.settings()) as conn:
        return await bring_up(
            conn,
            paths or rig.companion.paths,
            send_bytes=1,
            build_estimate_bytes=1,
            backend="onnxruntime",
            tool=tool,
        )


def _refused(rig: Rig, tool: str, error: type[CompanionError] = CompanionError) -> str:
    with pytest.raises(error) as caught:
        asyncio.run(_bring_up(rig, tool))
    message = str(caught.value)
    assert caught.value.exit_code == EXIT_COMPANION
    assert "\n" not in message and "Traceback" not in message and "\x1b" not in message
    return message


def test_a_wrapper_that_activates_an_environment_is_asked_itself(rig: Rig, tmp_path: Path) -> None:
    # As Jetson images often do: the tool is only on PATH once a venv is activated.
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "activate").write_text(f'export PATH="{rig.tool_bin}:$PATH"\nexport ACTIVATED=1\n')
    wrapper_bin = tmp_path / "wrapper-bin"
    wrapper_bin.mkdir()
    wrapper = wrapper_bin / "tc"
    wrapper.write_text(
        f'#!/bin/bash\n. "{venv}/activate"\n[ "$ACTIVATED" = 1 ] || exit 3\n'
        'exec takeoff-cache "$@"\n'
    )
    wrapper.chmod(0o755)
    rig.companion.bin = wrapper_bin  # takeoff-cache itself is not on the PATH
    up = asyncio.run(_bring_up(rig, "tc"))
    assert up.version == __version__ and up.backend == "onnxruntime"
    assert up.paths.cache_root == str(rig.companion.cache)  # ~ expanded there
    assert any("tc companion-probe" in c for c in rig.companion.commands)
    # A wrapper given by its full path, with a space in it, is one quoted word.
    spaced = tmp_path / "my tools"
    spaced.mkdir()
    (spaced / "tc").write_bytes(wrapper.read_bytes())
    (spaced / "tc").chmod(0o755)
    assert asyncio.run(_bring_up(rig, f"'{spaced}/tc'")).version == __version__


def test_a_command_with_arguments_is_asked_itself(rig: Rig, tmp_path: Path) -> None:
    rig.companion.bin = tmp_path / "empty-bin"
    rig.companion.bin.mkdir()
    tool = f"env TAKEOFF_CACHE_PROBE_VIA=env {sys.executable} -m takeoff_cache"
    up = asyncio.run(_bring_up(rig, tool))
    assert up.version == __version__
    assert up.python == sys.executable
    assert up.paths.inputs_dir == str(rig.companion.root / "inputs")


def test_a_tool_that_is_not_takeoff_cache_is_refused(rig: Rig, tmp_path: Path) -> None:
    message = _refused(rig, "echo", RemoteOutputError)
    assert "is not takeoff-cache" in message
    message = _refused(rig, "ls", CompanionToolError)  # exit 2: no such file companion-probe
    assert "companion-probe failed there" in message
    # An older takeoff-cache without the subcommand: argparse's exit 2 and its line.
    console_script(
        rig.tool_bin,
        "old-tc",
        'import sys\nsys.stderr.write("takeoff-cache: error: argument command: invalid'
        " choice: 'companion-probe'\\n\")\nsys.exit(2)\n",
    )
    message = _refused(rig, "old-tc", CompanionToolError)
    assert "invalid choice" in message and __version__ in message


# A takeoff-cache whose companion-probe answers what the real one would, then lies.
_LIAR = """import json, sys
from takeoff_cache.cli.main import build_parser
from takeoff_cache.companion.probe import PROBE_PATHS, probe
args = build_parser().parse_args(sys.argv[1:])
doc = probe(args.backend, {{n: getattr(args, n) for n in PROBE_PATHS}})
{lie}
print(json.dumps(doc))
"""


def _liar(rig: Rig, lie: str) -> str:
    console_script(rig.tool_bin, "liar", _LIAR.format(lie=lie))
    return "liar"


def test_a_truthful_answer_with_new_fields_is_taken(rig: Rig) -> None:
    up = asyncio.run(_bring_up(rig, _liar(rig, 'doc["from_a_newer_release"] = {"x": [1]}')))
    assert up.paths.key == str(rig.companion.root / "operator.key")


def test_a_container_interpreter_leaves_the_transfer_to_the_hosts_python3(
    rig: Rig, tmp_path: Path
) -> None:
    # A docker run answers with the container's interpreter, which the host lacks.
    tool = _liar(rig, 'doc["python"] = "/opt/container-only/bin/python3"')
    up = asyncio.run(_bring_up(rig, tool))
    src = tmp_path / "blob.bin"
    src.write_bytes(b"tiles" * 1000)

    async def send() -> Any:
        async with connect(rig.settings()) as conn:
            return await send_files(
                conn, [Upload(src, "blob.bin")], up.paths.inputs_dir, python=up.python
            )

    assert asyncio.run(send()).files_sent == 1  # with the host's python3 (/usr/bin)
    assert (rig.companion.root / "inputs" / "blob.bin").read_bytes() == src.read_bytes()


@pytest.mark.parametrize(
    ("lie", "error", "words"),
    [
        ('doc["version"] = "0.0.9"', CompanionToolError, "0.0.9"),
        ('doc["manifest_format"] = ["takeoff-cache-manifest", 0]', CompanionToolError, "format"),
        ('doc["version"] = 9', RemoteOutputError, "'version'"),
        ('doc["host_identity"] = "jetson"', RemoteOutputError, "'host_identity'"),
        ('doc["paths"]["cache_root"]["free"] = "lots"', RemoteOutputError, "'free'"),
        ('doc["paths"]["cache_root"]["free"] = 1e300', RemoteOutputError, "'free'"),
        ('doc["paths"]["cache_root"]["is_dir"] = 1', RemoteOutputError, "'is_dir'"),
        ('doc["paths"]["inputs_dir"]["free"] = -5', RemoteOutputError, "-5"),
        ('doc["paths"]["inputs_dir"]["free"] = 2**70', RemoteOutputError, "free"),
        ('doc["paths"]["cache_root"]["path"] = "/etc"', RemoteOutputError, "/etc"),
        ('doc["paths"]["trust"]["path"] += "\\x1b[2J"', RemoteOutputError, "[2J"),
        ('del doc["paths"]["key"]', RemoteOutputError, "'key'"),
        ('del doc["host_tag"]', RemoteOutputError, "'host_tag'"),
        ("doc = [doc]", RemoteOutputError, "not an object"),
        ('doc["home"] = None', RemoteOutputError, "'home'"),
    ],
)
def test_a_lying_answer_is_refused_in_one_line(
    rig: Rig, lie: str, error: type[CompanionError], words: str
) -> None:
    message = _refused(rig, _liar(rig, lie), error)
    assert words in message, message


@pytest.mark.parametrize(
    ("printed", "words"),
    [
        ("print('not json at all')", "not JSON"),
        ("print('[' * 100000 + ']' * 100000)", "nested 100000 deep"),
        ("print('{\"a\": ' * 100000 + '1' + '}' * 100000)", "nested 100000 deep"),
        ("print('{\"version\": ' + '9' * 5000 + '}')", "not JSON"),
        ("print('{\"x\": \"' + 'y' * (5 << 20) + '\"}')", "characters"),
        ("import json; print(json.dumps({'version': '\\x1b]0;x\\x07'}))", "no 'manifest_format'"),
        ("pass", "nothing"),
    ],
)
def test_a_malformed_answer_is_refused_in_one_line(rig: Rig, printed: str, words: str) -> None:
    console_script(rig.tool_bin, "garbled", f"{printed}\n")
    message = _refused(rig, "garbled", RemoteOutputError)
    assert words in message, message


def test_an_answer_of_megabytes_on_stderr_and_stdout_is_refused_quickly(rig: Rig) -> None:
    body = (
        "import sys\nsys.stderr.write('e' * (20 << 20))\n"
        "sys.stdout.write('o' * (20 << 20))\nsys.exit(1)\n"
    )
    console_script(rig.tool_bin, "flood", body)
    message = _refused(rig, "flood", CompanionToolError)
    assert len(message) < 1000 and "exit 1" in message


def test_the_answer_reaches_the_probe_as_json(rig: Rig, tmp_path: Path) -> None:
    # The real subcommand, run here as the companion runs it.
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "takeoff_cache.cli.main", "companion-probe",
         "--backend=onnxruntime", f"--cache-root={tmp_path}", "--key=~/k"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["paths"]["cache_root"] == {
        "path": str(tmp_path),
        "exists": True,
        "is_dir": True,
        "free": doc["paths"]["cache_root"]["free"],
        "device": tmp_path.stat().st_dev,
    }
    assert doc["paths"]["key"]["path"] == str(Path("~/k").expanduser())
    assert set(doc["paths"]) == {"cache_root", "key"}
