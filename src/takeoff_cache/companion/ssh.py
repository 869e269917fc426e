"""SSH to the companion computer: connect with a checked host key, run and stream commands.

The host key is checked against a known_hosts file, as OpenSSH does: an unknown
key is refused with its SHA256 fingerprint so the operator can compare it with
the one the companion prints (``ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub``);
``accept_new_host_key`` trusts an unknown key once and records it. A key that
differs from the recorded one is always refused: that is the attack known_hosts
exists to catch.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from takeoff_cache.errors import (
    CompanionAuthError,
    CompanionError,
    CompanionTargetError,
    CompanionTimeoutError,
    CompanionUnreachableError,
    HostKeyError,
)

_TARGET = re.compile(
    r"^(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:@\[\]]+)"
    r"(?::(?P<port>\d+))?$"
)
DEFAULT_CONNECT_TIMEOUT_S = 15.0
DEFAULT_COMMAND_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Target:
    user: str
    host: str
    port: int = 22

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" + (f":{self.port}" if self.port != 22 else "")

    @property
    def known_hosts_name(self) -> str:
        """The host as a known_hosts line names it (OpenSSH's ``[host]:port`` off port 22)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


def parse_target(text: str) -> Target:
    """``user@host[:port]``; an IPv6 address goes in brackets, ``user@[::1]:2222``."""
    match = _TARGET.match(text.strip())
    if match is None:
        raise CompanionTargetError(f"companion: {text!r} is not user@host[:port]")
    port = int(match["port"]) if match["port"] else 22
    if not 0 < port < 65536:
        raise CompanionTargetError(f"companion: port {port} in {text!r} is not 1-65535")
    return Target(match["user"], match["host"].strip("[]"), port)


@dataclass(frozen=True)
class SSHSettings:
    target: Target
    known_hosts: Path = field(default_factory=lambda: Path.home() / ".ssh" / "known_hosts")
    # Private key files to offer; empty offers the agent's keys and ~/.ssh's defaults.
    client_keys: tuple[Path, ...] = ()
    use_agent: bool = True
    accept_new_host_key: bool = False
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S


@dataclass(frozen=True)
class Result:
    exit_status: int  # negative: killed by that signal
    stdout: str
    stderr: str


class _HostKeyCheck(asyncssh.SSHClient):
    """Sees the key the server offers when known_hosts does not list it."""

    def __init__(self, settings: SSHSettings, host_known: bool) -> None:
        self.settings = settings
        self.host_known = host_known
        self.offered: asyncssh.SSHKey | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.offered = key
        # Never trust a key that replaces a recorded one, even with accept_new_host_key.
        return self.settings.accept_new_host_key and not self.host_known


def _read_known_hosts(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise CompanionError(f"companion: cannot read {path}: {exc.strerror}") from exc


def _record_host_key(path: Path, target: Target, key: asyncssh.SSHKey) -> None:
    line = f"{target.known_hosts_name} {key.export_public_key().decode().strip()}\n"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(line)
    except OSError as exc:
        raise CompanionError(f"companion: cannot record the host key in {path}: {exc}") from exc


class Connection:
    """One open SSH connection to the companion."""

    def __init__(self, conn: asyncssh.SSHClientConnection, settings: SSHSettings) -> None:
        self.conn = conn
        self.settings = settings

    @property
    def target(self) -> Target:
        return self.settings.target

    async def run(
        self, command: str, *, input: str | None = None, timeout_s: float | None = None
    ) -> Result:
        """Run ``command`` in the companion's shell; output collected whole."""
        return await self.stream(command, None, input=input, timeout_s=timeout_s)

    async def stream(
        self,
        command: str,
        on_line: Callable[[str], None] | None,
        *,
        input: str | None = None,
        timeout_s: float | None = None,
    ) -> Result:
        """Run ``command``; each stderr line (``\\r`` ends one too: progress bars) goes to
        ``on_line`` as it arrives; stdout is collected whole."""
        timeout = timeout_s if timeout_s is not None else self.settings.command_timeout_s
        try:
            process = await self.conn.create_process(command, encoding="utf-8", errors="replace")
        except (asyncssh.Error, OSError) as exc:
            raise CompanionUnreachableError(
                f"companion: {self.target}: cannot start a command: {exc}"
            ) from exc
        try:
            return await asyncio.wait_for(self._talk(process, input, on_line), timeout)
        except TimeoutError:
            # OpenSSH forwards the signal; closing alone would leave the command running.
            with suppress(asyncssh.Error, OSError):
                process.send_signal("TERM")
            raise CompanionTimeoutError(
                f"companion: {self.target}: {command.split()[0]} still running after"
                f" {timeout:.0f} s; stopped"
            ) from None
        except (asyncssh.Error, OSError) as exc:
            raise CompanionUnreachableError(
                f"companion: {self.target}: connection lost during a command: {exc}"
            ) from exc
        finally:
            process.close()

    async def _talk(
        self,
        process: asyncssh.SSHClientProcess[str],
        input: str | None,
        on_line: Callable[[str], None] | None,
    ) -> Result:
        if input is not None:
            process.stdin.write(input)
        process.stdin.write_eof()
        stderr: list[str] = []

        async def read_stderr() -> None:
            pending = ""
            while chunk := await process.stderr.read(8192):
                stderr.append(chunk)
                pending += chunk
                *lines, pending = re.split(r"\r\n|\r|\n", pending)
                for line in lines:
                    if on_line is not None and line.strip():
                        on_line(line)
            if on_line is not None and pending.strip():
                on_line(pending)

        stdout, _ = await asyncio.gather(process.stdout.read(), read_stderr())
        completed = await process.wait(check=False)
        status = completed.returncode
        return Result(status if status is not None else -1, stdout, "".join(stderr))

    async def close(self) -> None:
        self.conn.close()
        await self.conn.wait_closed()


@asynccontextmanager
async def connect(settings: SSHSettings) -> AsyncIterator[Connection]:
    """An open, host-key-checked, authenticated connection; closed on leaving."""
    target = settings.target
    known_text = _read_known_hosts(settings.known_hosts)
    known = asyncssh.import_known_hosts(known_text)
    host_known = any(known.match(target.host, "", target.port)[:2])
    check = _HostKeyCheck(settings, host_known)
    options: dict[str, object] = {
        "username": target.user,
        "port": target.port,
        "known_hosts": known,
        "connect_timeout": settings.connect_timeout_s,
    }
    if not settings.use_agent:
        options["agent_path"] = None
    if settings.client_keys:
        options["client_keys"] = [str(p) for p in settings.client_keys]
    try:
        conn = await asyncssh.connect(target.host, client_factory=lambda: check, **options)  # type: ignore[arg-type]
    except asyncssh.HostKeyNotVerifiable as exc:
        fingerprint = check.offered.get_fingerprint("sha256") if check.offered else "unknown"
        what = "changed (it differs from" if host_known else "unknown (not in"
        raise HostKeyError(
            f"companion: {target}: host key {fingerprint} is {what} {settings.known_hosts});"
            + (
                " check it on the companion, then remove the old line"
                if host_known
                else " check it on the companion, then pass --accept-new-host-key"
            ),
            fingerprint,
        ) from exc
    except asyncssh.PermissionDenied as exc:
        raise CompanionAuthError(
            f"companion: {target}: authentication refused (no offered key was accepted)"
        ) from exc
    except TimeoutError as exc:
        raise CompanionTimeoutError(
            f"companion: {target}: no answer within {settings.connect_timeout_s:.0f} s"
        ) from exc
    except socket.gaierror as exc:
        raise CompanionUnreachableError(
            f"companion: {target}: host name does not resolve: {exc.strerror}"
        ) from exc
    except (asyncssh.Error, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CompanionUnreachableError(f"companion: {target}: unreachable: {reason}") from exc
    if check.offered is not None and settings.accept_new_host_key and not host_known:
        _record_host_key(settings.known_hosts, target, check.offered)
    connection = Connection(conn, settings)
    try:
        yield connection
    finally:
        await connection.close()
