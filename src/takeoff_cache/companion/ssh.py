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
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from takeoff_cache.companion.answers import neutralize
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
# What a remote command's output may cost here, however much it prints: a line
# shown as it arrives is cut at LINE_LIMIT characters; of stdout (whose last line
# is the report) the last STDOUT_LIMIT characters are kept, of stderr (read for
# its last lines) the last STDERR_LIMIT.
LINE_LIMIT = 4096
STDOUT_LIMIT = 8 * 2**20
STDERR_LIMIT = 64 * 2**10
READ_CHARS = 65536
_BREAK = re.compile(r"\r\n|\r|\n")


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
    stdout: str  # its last STDOUT_LIMIT characters
    stderr: str  # its last STDERR_LIMIT characters
    stdout_dropped: int = 0  # characters before those, read and let go
    stderr_dropped: int = 0


class _Tail:
    """The last ``limit`` characters of a stream, kept in blocks: memory stays bounded
    and each character is handled a fixed number of times."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.blocks: deque[str] = deque()
        self.size = 0
        self.dropped = 0

    def add(self, chunk: str) -> None:
        self.blocks.append(chunk)
        self.size += len(chunk)
        while self.size - len(self.blocks[0]) >= self.limit:
            self._drop(len(self.blocks.popleft()))
        if self.size > 2 * self.limit:  # one huge block: cut it
            head = self.blocks.popleft()
            cut = self.size - self.limit
            self.blocks.appendleft(head[cut:])
            self._drop(cut)

    def _drop(self, n: int) -> None:
        self.size -= n
        self.dropped += n

    def text(self) -> str:
        text = "".join(self.blocks)
        if len(text) > self.limit:
            self.dropped += len(text) - self.limit
            text = text[-self.limit :]
        return text


class _Lines:
    """Splits a stream into lines as it arrives (``\\r`` ends one too) and hands each
    non-blank one on, cut to LINE_LIMIT characters: a line is never held longer."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self.on_line = on_line
        self.parts: list[str] = []
        self.size = 0
        self.cut = 0  # characters of the current line past LINE_LIMIT

    def feed(self, chunk: str) -> None:
        pieces = _BREAK.split(chunk)
        for piece in pieces[:-1]:
            self._add(piece)
            self._flush()
        self._add(pieces[-1])

    def end(self) -> None:
        self._flush()

    def _add(self, piece: str) -> None:
        room = LINE_LIMIT - self.size
        if len(piece) > room:
            self.cut += len(piece) - max(room, 0)
            piece = piece[: max(room, 0)]
        if piece:
            self.parts.append(piece)
            self.size += len(piece)

    def _flush(self) -> None:
        line = "".join(self.parts)
        if self.cut:
            line += f" [{self.cut} more characters not shown]"
        if line.strip():
            self.on_line(line)
        self.parts, self.size, self.cut = [], 0, 0


def _label(command: str) -> str:
    """A remote command as a message names it: its program, past ``exec`` and the
    shell's set-up (a passphrase read, variables), its controls made visible."""
    words = command.replace("&&", " ").replace(";", " ").split()
    for i, word in enumerate(words):
        if word == "exec" and i + 1 < len(words):
            return neutralize(" ".join(words[i + 1 : i + 3]))[:120]
    return neutralize(" ".join(words[:2]))[:120]


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
                f"companion: {self.target}: {_label(command)} still running after"
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
        stdout = _Tail(STDOUT_LIMIT)
        stderr = _Tail(STDERR_LIMIT)
        lines = _Lines(on_line) if on_line is not None else None

        async def read(stream: asyncssh.SSHReader[str], tail: _Tail, split: bool) -> None:
            while chunk := await stream.read(READ_CHARS):
                tail.add(chunk)
                if split and lines is not None:
                    lines.feed(chunk)
            if split and lines is not None:
                lines.end()

        await asyncio.gather(
            read(process.stdout, stdout, False), read(process.stderr, stderr, True)
        )
        completed = await process.wait(check=False)
        status = completed.returncode
        return Result(
            status if status is not None else -1,
            stdout.text(),
            stderr.text(),
            stdout_dropped=stdout.dropped,
            stderr_dropped=stderr.dropped,
        )

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
