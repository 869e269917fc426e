"""Builds on a companion computer reached over real SSH (an asyncssh server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from filelock import FileLock

from takeoff_cache.build.request import parse_request, read_request_file
from takeoff_cache.companion import inputs
from takeoff_cache.companion.answers import Redactor
from takeoff_cache.companion.bringup import CompanionPaths, bring_up
from takeoff_cache.companion.remote import remote_build
from takeoff_cache.companion.session import build_on_companion
from takeoff_cache.companion.ssh import connect, parse_target
from takeoff_cache.companion.transfer import part_name, send_files
from takeoff_cache.core.layout import LOCK_NAME
from takeoff_cache.errors import (
    EXIT_COMPANION,
    CompanionAuthError,
    CompanionDiskError,
    CompanionPathError,
    CompanionTargetError,
    CompanionToolError,
    HostKeyError,
    RemoteCommandError,
    RemoteOutputError,
)
from takeoff_cache.tiles.corpus import select_tiles
from tests.conftest import Demo
from tests.support.companion import (
    console_script,
    host_key_line,
    make_client_keys,
    make_companion,
    start_server,
    tree_bytes,
)

SECRETS = {
    "TAKEOFF_CACHE_TILES_API_KEY": "tiles-secret-4b1d",
    "TAKEOFF_CACHE_FLIGHTS_TOKEN": "flights-secret-9c2e",
}


class Rig:
    """The companion, its SSH server on a background loop, and the workstation's keys."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.client_dir = root / "workstation"
        self.client_key = make_client_keys(self.client_dir)
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.companion = make_companion(root / "companion", env)
        self.tool_bin = self.companion.bin
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            start_server(self.companion, self.host_key, self.client_key), self.loop
        ).result(30)
        self.trust_host()
        # The workstation's own trust store, holding the companion's public key.
        self.workstation_trust = self.client_dir / "trust"
        self.workstation_trust.mkdir()
        shutil.copy(
            self.companion.root / "operator.key.pub", self.workstation_trust / "companion.pub"
        )

    def trust_host(self) -> None:
        (self.client_dir / "known_hosts").write_text(host_key_line(self.companion, self.host_key))

    def settings(self, **extra: object) -> Any:
        return self.companion.settings(self.client_dir, **extra)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def rig(tmp_path: Path, prefect_server: Any) -> Iterator[Rig]:
    env = prefect_server.env()
    env.update(SECRETS)  # the workstation has them; make_companion keeps them off the companion
    rig = Rig(tmp_path, env)
    try:
        yield rig
    finally:
        rig.close()


def demo_request(demo: Demo) -> tuple[Any, Any]:
    request = parse_request(read_request_file(demo.request))
    selection = select_tiles(
        request.corpus, request.bbox.as_tuple(), request.zoom_levels, request.area
    )
    return request, selection.tiles


def test_parse_target() -> None:
    assert str(parse_target("pilot@jetson.local:2222")) == "pilot@jetson.local:2222"
    assert parse_target("nvidia@[fe80::1]:22").host == "fe80::1"
    with pytest.raises(CompanionTargetError):
        parse_target("jetson.local")


def test_clean_run_then_second_run_sends_nothing(
    rig: Rig, demo: Demo, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    request, tiles = demo_request(demo)
    lines: list[str] = []
    first = asyncio.run(
        build_on_companion(
            rig.settings(),
            request,
            tiles,
            rig.companion.paths,
            backend="onnxruntime",
            on_line=lines.append,
            trust=rig.workstation_trust,
        )
    )
    assert first.build["outcome"] == "success"
    assert first.verify["ok"] is True
    assert first.bring_up.backend == "onnxruntime"
    assert first.bring_up.host_identity["cpu"]["arch"]
    assert first.transfer.bytes_sent > 0 and first.transfer.bytes_skipped == 0
    assert (rig.companion.cache / "Manifest.json").is_file()
    second = asyncio.run(
        build_on_companion(
            rig.settings(),
            request,
            tiles,
            rig.companion.paths,
            backend="onnxruntime",
            trust=rig.workstation_trust,
        )
    )
    assert second.build["outcome"] == "idempotent_no_op"
    assert second.verify["workstation"]["build_identity"] == second.build["build_identity"]
    assert second.transfer.bytes_sent == 0
    assert second.transfer.bytes_skipped == first.transfer.bytes_sent
    with capsys.disabled():
        t = first.transfer
        print(
            f"\ncompanion transfer, demo area ({len(tiles)} tiles): {t.bytes_sent} bytes in"
            f" {t.files_sent} files, {t.elapsed_s:.3f} s; second run sent"
            f" {second.transfer.bytes_sent}, skipped {second.transfer.bytes_skipped}"
        )
    # No secret on any remote command line, in the companion's files or in what came back.
    seen = "\n".join(rig.companion.commands + lines + [str(first.to_json())]).encode()
    everything = seen + tree_bytes(rig.companion.root)
    for value in SECRETS.values():
        assert value.encode() not in everything


def test_unknown_host_key_is_refused_with_its_fingerprint(rig: Rig) -> None:
    (rig.client_dir / "known_hosts").write_text("")

    async def probe(**extra: object) -> None:
        async with connect(rig.settings(**extra)) as conn:
            await conn.run("true")

    with pytest.raises(HostKeyError) as caught:
        asyncio.run(probe())
    fingerprint = rig.host_key.get_fingerprint("sha256")
    assert caught.value.fingerprint == fingerprint
    assert fingerprint in str(caught.value)
    assert caught.value.exit_code == EXIT_COMPANION
    asyncio.run(probe(accept_new_host_key=True))
    assert "[127.0.0.1]:" in (rig.client_dir / "known_hosts").read_text()
    asyncio.run(probe())  # recorded: trusted from now on


def test_changed_host_key_is_refused_even_with_accept_new(rig: Rig) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519")
    (rig.client_dir / "known_hosts").write_text(host_key_line(rig.companion, other))

    async def probe() -> None:
        async with connect(rig.settings(accept_new_host_key=True)):
            pass

    with pytest.raises(HostKeyError, match="changed"):
        asyncio.run(probe())


def test_wrong_client_key_is_refused(rig: Rig, tmp_path: Path) -> None:
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    stranger.write_private_key(str(tmp_path / "stranger"))

    async def probe() -> None:
        async with connect(rig.settings(client_keys=(tmp_path / "stranger",))):
            pass

    with pytest.raises(CompanionAuthError, match="authentication refused"):
        asyncio.run(probe())


def test_unreachable_companion(rig: Rig) -> None:
    from takeoff_cache.companion.ssh import Target

    async def probe() -> None:
        async with connect(rig.settings(target=Target("pilot", "127.0.0.1", 1))):
            pass

    with pytest.raises(Exception) as caught:
        asyncio.run(probe())
    assert getattr(caught.value, "exit_code", None) == EXIT_COMPANION


async def _bring_up(rig: Rig, paths: CompanionPaths | None = None, send: int = 1) -> Any:
    async with connect(rig.settings()) as conn:
        return await bring_up(
            conn,
            paths or rig.companion.paths,
            send_bytes=send,
            build_estimate_bytes=1,
            backend="onnxruntime",
        )


def test_companion_without_the_tool(rig: Rig, tmp_path: Path) -> None:
    rig.companion.bin = tmp_path / "empty-bin"
    rig.companion.bin.mkdir()
    with pytest.raises(CompanionToolError, match="not installed"):
        asyncio.run(_bring_up(rig))


def test_bring_up_refuses_missing_cache_root_and_full_disk(rig: Rig) -> None:
    up = asyncio.run(_bring_up(rig))
    assert up.paths.cache_root == str(rig.companion.cache)
    missing = CompanionPaths("~/no-cache", "~/operator.key", "~/trust", "~/work", "~/inputs")
    with pytest.raises(CompanionPathError, match="no-cache"):
        asyncio.run(_bring_up(rig, missing))
    assert not (rig.companion.root / "no-cache").exists()
    with pytest.raises(CompanionDiskError, match="free"):
        asyncio.run(_bring_up(rig, send=1 << 60))


_KILLER = """
import asyncio, os, signal, sys
from pathlib import Path
from takeoff_cache.companion.ssh import SSHSettings, Target
from takeoff_cache.companion.ssh import connect
from takeoff_cache.companion.transfer import send_files
from takeoff_cache.companion.inputs import Upload
port, client, src = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
settings = SSHSettings(Target("pilot", "127.0.0.1", port), client / "known_hosts",
                       (client / "id_ed25519",), use_agent=False)
def progress(name, done, size):
    if done >= size // 2:
        os.kill(os.getpid(), signal.SIGKILL)
async def main():
    async with connect(settings) as conn:
        await send_files(conn, [Upload(src, "big.bin")], sys.argv[4], python=sys.executable,
                         chunk_bytes=64 * 1024, on_progress=progress)
asyncio.run(main())
"""


def test_transfer_killed_half_way_resumes(rig: Rig, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(2 << 20))
    remote_dir = str(rig.companion.root / "inputs")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLER,
            str(rig.companion.port),
            str(rig.client_dir),
            str(src),
            remote_dir,
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    part = Path(remote_dir) / part_name("big.bin")
    assert not (Path(remote_dir) / "big.bin").exists()  # nothing half-written under its name
    assert 0 < part.stat().st_size < src.stat().st_size

    async def resume() -> Any:
        async with connect(rig.settings()) as conn:
            return await send_files(
                conn, [inputs.Upload(src, "big.bin")], remote_dir, python=sys.executable
            )

    report = asyncio.run(resume())
    assert report.bytes_resumed > 0
    assert report.bytes_sent + report.bytes_resumed == src.stat().st_size
    assert (Path(remote_dir) / "big.bin").read_bytes() == src.read_bytes()
    assert not part.exists()


def test_remote_build_failure_brings_its_line_and_exit_code(rig: Rig, demo: Demo) -> None:
    # A trust store that does not hold the companion's key: the build refuses to sign.
    other = rig.companion.root / "other-trust"
    other.mkdir()
    shutil.copy(demo.trust / "operator.pub", other / "operator.pub")
    paths = CompanionPaths("~/cache", "~/operator.key", "~/other-trust", "~/work", "~/inputs")
    request, tiles = demo_request(demo)
    with pytest.raises(RemoteCommandError) as caught:
        asyncio.run(
            build_on_companion(
                rig.settings(),
                request,
                tiles,
                paths,
                backend="onnxruntime",
                trust=rig.workstation_trust,
            )
        )
    assert caught.value.exit_code == 6
    assert "takeoff-cache: error:" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_companion_lock_held_by_another_build(rig: Rig, demo: Demo) -> None:
    request, tiles = demo_request(demo)
    with (
        FileLock(str(rig.companion.cache / LOCK_NAME)),
        pytest.raises(RemoteCommandError) as caught,
    ):
        asyncio.run(
            build_on_companion(
                rig.settings(),
                request,
                tiles,
                rig.companion.paths,
                backend="onnxruntime",
                trust=rig.workstation_trust,
            )
        )
    assert caught.value.exit_code == 4
    assert "lock" in str(caught.value)


def test_malformed_remote_output_shows_its_last_lines(rig: Rig, tmp_path: Path) -> None:
    broken = console_script(
        tmp_path / "broken-bin",
        "broken-tool",
        'import sys, os\nprint("step 1 of 3")\nprint(os.environ["TAKEOFF_CACHE_KEY_PASSPHRASE"])\n'
        'print(\'{"outcome": "succ\')\n',
    )
    rig.companion.bin = broken.parent

    async def run() -> Any:
        async with connect(rig.settings()) as conn:
            return await remote_build(
                conn,
                rig.companion.paths,
                "~/inputs/request.toml",
                tool="broken-tool",
                passphrase="pass-phrase-77",
                redact=Redactor(["pass-phrase-77"]),
            )

    with pytest.raises(RemoteOutputError) as caught:
        asyncio.run(run())
    message = str(caught.value)
    assert '{"outcome": "succ' in message and "step 1 of 3" in message
    assert "pass-phrase-77" not in message and "***" in message
    assert all("pass-phrase-77" not in c for c in rig.companion.commands)


def test_tile_subset_is_deterministic_and_exact(demo: Demo, tmp_path: Path) -> None:
    _, tiles = demo_request(demo)
    some = tiles[::3]
    a, b = tmp_path / "a.mbtiles", tmp_path / "b.mbtiles"
    assert inputs.write_tile_subset(demo.corpus, some, a) == len(some)
    inputs.write_tile_subset(demo.corpus, list(reversed(some)), b)
    assert a.read_bytes() == b.read_bytes()
    again = select_tiles(a, (-85.0, -180.0, 85.0, 180.0), tuple(sorted({t.z for t in some})))
    assert again.tiles == tuple(sorted(some))
