"""A real SSH server on 127.0.0.1 standing in for the drone's companion computer.

asyncssh's server runs each requested command with bash in its own "companion"
folder (its HOME, work folder, signing key, trust store and cache root), with
this interpreter's takeoff-cache on its PATH as a console script. Tests switch
``bin`` to a folder without it, or with a broken one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from takeoff_cache.companion.bringup import CompanionPaths
from takeoff_cache.companion.ssh import SSHSettings, Target
from takeoff_cache.trust.keys import generate_keypair

SRC = Path(__file__).resolve().parents[2] / "src"


@dataclass
class Companion:
    root: Path
    env: dict[str, str]
    bin: Path
    port: int = 0
    commands: list[str] = field(default_factory=list)
    captured: list[bytes] = field(default_factory=list)

    @property
    def paths(self) -> CompanionPaths:
        return CompanionPaths(
            cache_root="~/cache",
            key="~/operator.key",
            trust="~/trust",
            work_dir="~/work",
            inputs_dir="~/inputs",
        )

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def settings(self, client_dir: Path, **extra: object) -> SSHSettings:
        base: dict[str, object] = {
            "target": Target("pilot", "127.0.0.1", self.port),
            "known_hosts": client_dir / "known_hosts",
            "client_keys": (client_dir / "id_ed25519",),
            "use_agent": False,
            "connect_timeout_s": 10.0,
            "command_timeout_s": 600.0,
        }
        base.update(extra)
        return SSHSettings(**base)  # type: ignore[arg-type]


def console_script(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


def make_companion(root: Path, extra_env: dict[str, str]) -> Companion:
    home = root / "home"
    for sub in ("cache", "trust", "work"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    generate_keypair(home / "operator.key")
    shutil.copy(home / "operator.key.pub", home / "trust" / "operator.pub")
    tool_bin = console_script(
        root / "bin",
        "takeoff-cache",
        "import sys\nfrom takeoff_cache.cli.main import main\nsys.exit(main())\n",
    ).parent
    env = {
        **extra_env,
        "HOME": str(home),
        "PYTHONPATH": str(SRC),
        "XDG_CACHE_HOME": str(home / ".cache"),
    }
    for name in ("TAKEOFF_CACHE_TILES_API_KEY", "TAKEOFF_CACHE_FLIGHTS_TOKEN"):
        env.pop(name, None)
    return Companion(home, env, tool_bin)


def make_client_keys(client_dir: Path) -> asyncssh.SSHKey:
    client_dir.mkdir(parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(client_dir / "id_ed25519"))
    key.write_public_key(str(client_dir / "id_ed25519.pub"))
    return key


async def start_server(
    companion: Companion, host_key: asyncssh.SSHKey, authorized: asyncssh.SSHKey
) -> asyncssh.SSHAcceptor:
    async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
        command = process.command or ""
        companion.commands.append(command)
        env = {**companion.env, "PATH": f"{companion.bin}:/usr/bin:/bin"}
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            command,
            cwd=companion.root,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        # Pumped by hand, each with the channel's flow control: asyncssh's redirect of
        # asyncio pipes reads one of them twice at once when the client reads slowly.
        await asyncio.gather(
            _pump_in(process, proc),
            _pump_out(proc.stdout, process.stdout),
            _pump_out(proc.stderr, process.stderr),
        )
        code = await proc.wait()
        process.exit(code)
        await process.wait_closed()

    keys = asyncssh.import_authorized_keys(authorized.export_public_key().decode())
    server = await asyncssh.create_server(
        asyncssh.SSHServer,
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        authorized_client_keys=keys,
        process_factory=handle,
        sftp_factory=True,
        encoding=None,
    )
    companion.port = server.sockets[0].getsockname()[1]
    return server


async def _pump_in(
    process: asyncssh.SSHServerProcess[bytes], proc: asyncio.subprocess.Process
) -> None:
    assert proc.stdin is not None
    try:
        while data := await process.stdin.read(65536):
            proc.stdin.write(data)
            await proc.stdin.drain()
    except (asyncssh.Error, ConnectionError):
        pass
    finally:
        proc.stdin.close()


async def _pump_out(source: asyncio.StreamReader | None, sink: asyncssh.SSHWriter[bytes]) -> None:
    assert source is not None
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (asyncssh.Error, ConnectionError):
        # The client went away: drain the pipe so the command is not blocked on it.
        while await source.read(65536):
            pass


def host_key_line(companion: Companion, host_key: asyncssh.SSHKey) -> str:
    return f"[127.0.0.1]:{companion.port} {host_key.export_public_key().decode().strip()}\n"


def tree_bytes(root: Path) -> bytes:
    """Every byte of every file under ``root``, for secret checks."""
    out = bytearray()
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                out += path.read_bytes()
    return bytes(out)
