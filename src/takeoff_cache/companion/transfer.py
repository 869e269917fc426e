"""Send files to the companion: skip what is already there, resume what was cut off.

Each file goes over SFTP in chunks to a temporary name beside its final one.
A run that was cut off leaves that temporary file; the next run asks its size
and SHA-256, and when they match the same prefix of the local file it sends
only the rest. Complete files are hashed there and renamed into place only
when the hash matches, so the build never sees a half-written input.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from takeoff_cache.companion.answers import last_json_line, neutralize, shown
from takeoff_cache.companion.inputs import Upload
from takeoff_cache.companion.ssh import Connection
from takeoff_cache.core.fsutil import sha256_file
from takeoff_cache.errors import RemoteOutputError, TransferError

CHUNK_BYTES = 1 << 20
PART_SUFFIX = ".part"

# Runs there: for each file, the final file's size and hash, the partial one's.
_STATE = r"""
import hashlib, json, os, sys
args = json.loads(sys.argv[1])
def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
out = {}
for name in args["names"]:
    final = os.path.join(args["dir"], name)
    part = os.path.join(os.path.dirname(final), "." + os.path.basename(final) + ".part")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    entry = {}
    if os.path.isfile(final):
        entry["size"], entry["sha256"] = os.path.getsize(final), sha(final)
    if os.path.isfile(part):
        entry["part_size"], entry["part_sha256"] = os.path.getsize(part), sha(part)
    out[name] = entry
print(json.dumps(out))
"""

# Runs there: check each complete partial file's hash, then rename it into place.
_FINISH = r"""
import hashlib, json, os, sys
args = json.loads(sys.argv[1])
bad = []
for name, want in args["files"].items():
    final = os.path.join(args["dir"], name)
    part = os.path.join(os.path.dirname(final), "." + os.path.basename(final) + ".part")
    h = hashlib.sha256()
    with open(part, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
        os.fsync(fh.fileno())
    if h.hexdigest() != want:
        os.unlink(part)
        bad.append(name)
        continue
    os.replace(part, final)
    fd = os.open(os.path.dirname(final), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
print(json.dumps({"bad": bad}))
"""


@dataclass(frozen=True)
class TransferReport:
    bytes_sent: int
    bytes_skipped: int  # files already there with the same SHA-256
    bytes_resumed: int  # prefixes of cut-off files kept rather than sent again
    files_sent: int
    files_skipped: int
    elapsed_s: float


def part_name(name: str) -> str:
    head, tail = posixpath.split(name)
    return posixpath.join(head, f".{tail}{PART_SUFFIX}")


def _prefix_sha256(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    left = size
    with path.open("rb") as fh:
        while left > 0:
            block = fh.read(min(CHUNK_BYTES, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


async def _python(conn: Connection, python: str, script: str, args: object) -> dict[str, object]:
    # The install's interpreter where the host has it; a container's is not on the host,
    # whose own python3 serves (the helpers need its standard library only).
    quoted = shlex.quote(python)
    command = (
        f'p={quoted}; [ -x "$p" ] || p=$(command -v python3) || exit 127; '
        f'exec "$p" - {shlex.quote(json.dumps(args))}'
    )
    result = await conn.run(command, input=script)
    doc, why = last_json_line(result.stdout) if result.exit_status == 0 else (None, "")
    if doc is None:
        lines = (result.stderr[-4096:] or result.stdout[-4096:]).strip().splitlines()
        last = neutralize(lines[-1])[:300] if lines else why or "no output"
        raise RemoteOutputError(
            f"companion: {conn.target}: transfer helper failed (exit {result.exit_status}): {last}"
        )
    return doc


async def send_files(
    conn: Connection,
    uploads: Sequence[Upload],
    remote_dir: str,
    *,
    python: str,
    chunk_bytes: int = CHUNK_BYTES,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> TransferReport:
    """Make ``remote_dir/NAME`` hold each upload's bytes; send only what is missing.

    ``python`` is the companion's interpreter (from bring-up); ``on_progress`` gets
    (name, bytes of it there so far, its size) after every chunk.
    """
    started = time.perf_counter()
    local = {u.name: (u.local, sha256_file(u.local), u.local.stat().st_size) for u in uploads}
    state = await _python(conn, python, _STATE, {"dir": remote_dir, "names": list(local)})
    sent = skipped = resumed = files_sent = files_skipped = 0
    finished: dict[str, str] = {}
    try:
        sftp = await conn.conn.start_sftp_client()
    except (asyncssh.Error, OSError) as exc:
        raise TransferError(f"companion: {conn.target}: no SFTP there: {exc}") from exc
    async with sftp:
        for name, (path, sha, size) in local.items():
            there = state.get(name)
            there = there if isinstance(there, dict) else {}
            if there.get("sha256") == sha:
                skipped += size
                files_skipped += 1
                continue
            offset = there.get("part_size", 0)
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                offset = 0  # a malformed answer: send the whole file
            if offset > size or (
                offset and there.get("part_sha256") != _prefix_sha256(path, offset)
            ):
                offset = 0  # not a prefix of this file: start over
            resumed += offset
            remote = posixpath.join(remote_dir, part_name(name))
            sent += await _send_one(sftp, name, path, remote, offset, chunk_bytes, on_progress)
            finished[name] = sha
            files_sent += 1
    if finished:
        done = await _python(conn, python, _FINISH, {"dir": remote_dir, "files": finished})
        bad = done.get("bad")
        if bad:
            raise TransferError(
                f"companion: {conn.target}: {shown(bad)} arrived with another SHA-256; send again"
            )
    return TransferReport(
        sent, skipped, resumed, files_sent, files_skipped, round(time.perf_counter() - started, 3)
    )


async def _send_one(
    sftp: asyncssh.SFTPClient,
    name: str,
    path: Path,
    remote: str,
    offset: int,
    chunk_bytes: int,
    on_progress: Callable[[str, int, int], None] | None,
) -> int:
    """Write ``path`` from ``offset`` on into ``remote``; return the bytes sent."""
    sent = 0
    size = path.stat().st_size
    try:
        async with sftp.open(remote, "r+b" if offset else "wb") as out:
            if offset:
                await out.truncate(offset)
            with path.open("rb") as fh:
                fh.seek(offset)
                position = offset
                while block := fh.read(chunk_bytes):
                    await out.write(block, position)
                    position += len(block)
                    sent += len(block)
                    if on_progress is not None:
                        on_progress(name, position, size)
    except (asyncssh.Error, OSError) as exc:
        raise TransferError(
            f"companion: sending {path.name} stopped at {offset + sent} of {size} bytes: {exc};"
            " the next run resumes there"
        ) from exc
    return sent
