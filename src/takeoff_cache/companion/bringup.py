"""Bring-up: check the companion before anything is sent to it.

One small Python program (``probe.py`` beside this module) runs there under
the interpreter of its takeoff-cache (read from the script's ``#!`` line, so a
pipx or venv install is found). It imports takeoff_cache and prints, as one
JSON line, its version and manifest format, the backend it would build with and
that backend's host identity, the free disk and whether the paths the build
needs exist. Nothing is created there: a missing cache root is the operator's
to make, as on the workstation.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass
from importlib.resources import files
from typing import Any

from takeoff_cache import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION, __version__
from takeoff_cache.companion.ssh import Connection
from takeoff_cache.errors import (
    CompanionDiskError,
    CompanionError,
    CompanionPathError,
    CompanionToolError,
    RemoteOutputError,
)

# Bring-up must answer quickly even on a slow Jetson; a build gets its own timeout.
PROBE_TIMEOUT_S = 120.0
# The shell's answer when a command is not found.
_NOT_FOUND = 127


@dataclass(frozen=True)
class CompanionPaths:
    """Paths on the companion; ``~`` is its user's home. The key never leaves it."""

    cache_root: str
    key: str
    trust: str
    work_dir: str = "~/.cache/takeoff-cache"
    # Where the inputs are sent: one folder, reused, so a second run sends nothing.
    inputs_dir: str = "~/.cache/takeoff-cache/companion-inputs"


@dataclass(frozen=True)
class BringUp:
    """What the companion said about itself, its paths made absolute there."""

    target: str
    version: str
    manifest_format: tuple[str, int]
    python: str
    backend: str
    backend_version: str
    host_identity: dict[str, Any]
    host_tag: str
    paths: CompanionPaths
    free_bytes: int  # where the inputs go
    needed_bytes: int

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["manifest_format"] = list(self.manifest_format)
        return out


def tool_words(tool: str) -> list[str]:
    """The companion's program as its words (``docker run --rm img takeoff-cache`` is
    several), each one to be quoted: never pasted into a remote shell as it is."""
    try:
        words = shlex.split(tool)
    except ValueError as exc:
        raise CompanionToolError(f"companion: tool {tool!r} is not a command: {exc}") from exc
    if not words:
        raise CompanionToolError("companion: the companion's tool is empty")
    return words


def probe_command(tool: str, args: dict[str, Any]) -> str:
    """The shell command that runs the probe with the tool's own interpreter."""
    exe = tool_words(tool)[0]
    return (
        f"t=$(command -v {shlex.quote(exe)}) || "
        f"{{ echo {shlex.quote(f'{exe}: command not found')} >&2; exit {_NOT_FOUND}; }}; "
        # A console script's first line names its interpreter, e.g. #!/opt/venv/bin/python.
        'py=$(sed -n "1s/^#! *//p" "$t"); case "$py" in *python*) ;; *) py=python3;; esac; '
        # $py is split on purpose: a "#!/usr/bin/env python3" line is two words.
        f"exec $py - {shlex.quote(json.dumps(args))}"
    )


def _parse_probe(target: str, stdout: str) -> dict[str, Any]:
    lines = stdout.strip().splitlines()
    try:
        doc = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        shown = " | ".join(lines[-3:]) or "nothing"
        raise RemoteOutputError(f"companion: {target}: bring-up probe printed {shown!r:.300}")
    return doc


async def bring_up(
    conn: Connection,
    paths: CompanionPaths,
    *,
    send_bytes: int,
    build_estimate_bytes: int,
    backend: str = "auto",
    tool: str = "takeoff-cache",
) -> BringUp:
    """Check the companion; raise the first problem found as one line, else describe it."""
    target = str(conn.target)
    wanted = {
        "cache_root": paths.cache_root,
        "key": paths.key,
        "trust": paths.trust,
        "work_dir": paths.work_dir,
        "inputs_dir": paths.inputs_dir,
    }
    command = probe_command(tool, {"backend": backend, "paths": wanted})
    program = files("takeoff_cache.companion").joinpath("probe.py").read_text()
    result = await conn.run(command, input=program, timeout_s=PROBE_TIMEOUT_S)
    if result.exit_status == _NOT_FOUND:
        raise CompanionToolError(
            f"companion: {target}: {tool_words(tool)[0]!r} is not installed there (not on the"
            " PATH of a non-interactive shell); install takeoff-cache or give its full path"
        )
    if result.exit_status != 0:
        last = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise CompanionError(
            f"companion: {target}: bring-up probe failed (exit {result.exit_status}): {last[0]}"
        )
    doc = _parse_probe(target, result.stdout)
    if "import_error" in doc:
        raise CompanionToolError(
            f"companion: {target}: takeoff-cache's Python there cannot import it:"
            f" {doc['import_error']}"
        )
    theirs = doc.get("manifest_format")
    ours = [MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION]
    if theirs != ours:
        raise CompanionToolError(
            f"companion: {target}: takeoff-cache {doc.get('version')} there writes manifest"
            f" format {theirs}, this one ({__version__}) {ours}; install the same release"
        )
    if "backend_error" in doc:
        raise CompanionToolError(
            f"companion: {target}: backend {backend} unusable there: {doc['backend_error']}"
        )
    found = doc["paths"]
    if not found["cache_root"]["is_dir"]:
        raise CompanionPathError(
            f"companion: {target}: cache_root {_shown(found['cache_root']['path'])} does not exist"
            " there (create it first; it is never created for you)"
        )
    for name in ("key", "trust"):
        if not found[name]["exists"]:
            raise CompanionPathError(
                f"companion: {target}: {name} {_shown(found[name]['path'])} does not exist there"
            )
    inputs, cache = found["inputs_dir"], found["cache_root"]
    # The inputs and the cache may share a disk: then it must hold both.
    shared = inputs["device"] == cache["device"]
    checks = (
        [(inputs, send_bytes + build_estimate_bytes)]
        if shared
        else [(inputs, send_bytes), (cache, build_estimate_bytes)]
    )
    for where, need in checks:
        if where["free"] < need:
            raise CompanionDiskError(
                f"companion: {target}: {_shown(where['path'])} has {_mib(where['free'])} free;"
                f" the inputs and the build need {_mib(need)}"
            )
    return BringUp(
        target=target,
        version=str(doc["version"]),
        manifest_format=(str(theirs[0]), int(theirs[1])),
        python=str(doc["python"]),
        backend=str(doc["backend"]),
        backend_version=str(doc["backend_version"]),
        host_identity=dict(doc["host_identity"]),
        host_tag=str(doc["host_tag"]),
        paths=CompanionPaths(**{name: found[name]["path"] for name in wanted}),
        free_bytes=int(inputs["free"]),
        needed_bytes=send_bytes + build_estimate_bytes,
    )


def _shown(path: str) -> str:
    """A path for a one-line message: quoted where it holds a newline or another control."""
    return path if path.isprintable() else repr(path)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
