"""Bring-up: check the companion before anything is sent to it.

The companion's own takeoff-cache is asked what it is: ``TOOL companion-probe``
(:mod:`.probe`), whatever command line TOOL is (a console script, a wrapper, a
``docker run ... takeoff-cache``), every word quoted. Its one JSON line gives its
version and manifest format, the backend it would build with and that
backend's host identity, and for each path the build needs where it is there
(a leading ``~`` is the companion user's home), whether it exists and the free
disk. That answer is checked before it is used: its fields' types, its paths
against the ones asked, its free space a sane number. Nothing is created there:
a missing cache root is the operator's to make, as on the workstation.
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import asdict, dataclass
from typing import Any

from takeoff_cache import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION, __version__
from takeoff_cache.companion.answers import (
    Redactor,
    check_fields,
    last_json_line,
    neutralize,
    shown,
)
from takeoff_cache.companion.probe import PROBE_PATHS
from takeoff_cache.companion.ssh import Connection
from takeoff_cache.errors import (
    CompanionDiskError,
    CompanionPathError,
    CompanionToolError,
    RemoteOutputError,
)

# Bring-up must answer quickly even on a slow Jetson; a build gets its own timeout.
PROBE_TIMEOUT_S = 120.0
# The shell's answer when a command is not found.
_NOT_FOUND = 127
# The tool's subcommand that answers bring-up (cli/companion_probe.py).
PROBE_COMMAND = "companion-probe"


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


def probe_command(tool: str, backend: str, wanted: dict[str, str]) -> str:
    """The shell command that runs the tool's ``companion-probe`` there."""
    flags = [f"--{name.replace('_', '-')}={path}" for name, path in wanted.items()]
    return "exec " + shlex.join([*tool_words(tool), PROBE_COMMAND, f"--backend={backend}", *flags])


# The types of the answer's fields; fields a newer companion adds pass unread.
_ANSWER_TYPES: dict[str, tuple[type, ...]] = {
    "version": (str,),
    "manifest_format": (list,),
    "python": (str,),
    "home": (str,),
    "cwd": (str,),
    "backend": (str,),
    "backend_version": (str,),
    "host_identity": (dict,),
    "host_tag": (str,),
    "paths": (dict,),
    "backend_error": (str,),
}
_NEEDED = ("version", "manifest_format", "python", "home", "cwd", "paths")
_WITH_BACKEND = ("backend", "backend_version", "host_identity", "host_tag")
_PATH_TYPES: dict[str, tuple[type, ...]] = {
    "path": (str,),
    "exists": (bool,),
    "is_dir": (bool,),
    "free": (int,),
    "device": (int,),
}
# More free space than this on one file system is a forged answer (1 EiB).
FREE_LIMIT = 2**60


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
    wanted = {name: getattr(paths, name) for name in PROBE_PATHS}
    result = await conn.run(probe_command(tool, backend, wanted), timeout_s=PROBE_TIMEOUT_S)
    words = tool_words(tool)
    if result.exit_status == _NOT_FOUND:
        raise CompanionToolError(
            f"companion: {target}: {shown(words[0])} is not installed there (not on the"
            " PATH of a non-interactive shell); install takeoff-cache or give its full path"
            " or a wrapper with --companion-tool"
        )
    redact = Redactor.from_env()
    if result.exit_status != 0:
        last = _last_line(redact(result.stderr)) or _last_line(redact(result.stdout))
        raise CompanionToolError(
            f"companion: {target}: {shown(tool, 120)} {PROBE_COMMAND} failed there"
            f" (exit {result.exit_status}): {last or 'no output'}; is it takeoff-cache"
            f" {__version__}?"
        )
    doc, why = last_json_line(result.stdout)
    if doc is None:
        raise RemoteOutputError(
            f"companion: {target}: {shown(tool, 120)} is not takeoff-cache: its"
            f" {PROBE_COMMAND} printed {why}"
        )
    return _checked(target, doc, wanted, backend, send_bytes, build_estimate_bytes)


def _checked(
    target: str,
    doc: dict[str, Any],
    wanted: dict[str, str],
    backend: str,
    send_bytes: int,
    build_estimate_bytes: int,
) -> BringUp:
    what = "bring-up answer"
    check_fields(what, doc, _ANSWER_TYPES, target, required=_NEEDED)
    theirs = doc["manifest_format"]
    ours = [MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION]
    if theirs != ours or doc["version"] != __version__:
        raise CompanionToolError(
            f"companion: {target}: takeoff-cache {shown(doc['version'], 40)} there writes"
            f" manifest format {shown(theirs, 60)}, this one is {__version__} writing {ours};"
            " install the same release on both"
        )
    if "backend_error" in doc:
        raise CompanionToolError(
            f"companion: {target}: backend {backend} unusable there:"
            f" {neutralize(doc['backend_error'])[:200]}"
        )
    check_fields(what, doc, _ANSWER_TYPES, target, required=_WITH_BACKEND)
    found = doc["paths"]
    for name, asked in wanted.items():
        entry = found.get(name)
        if not isinstance(entry, dict):
            raise RemoteOutputError(f"companion: {target}: {what} says nothing of {name!r}")
        check_fields(f"{what}'s {name}", entry, _PATH_TYPES, target, required=tuple(_PATH_TYPES))
        expected = _there(asked, doc["home"], doc["cwd"])
        if entry["path"] != expected:
            raise RemoteOutputError(
                f"companion: {target}: {what} puts {name} {shown(asked, 300)} at"
                f" {shown(entry['path'], 300)}, not {shown(expected, 300)}"
            )
        if not 0 <= entry["free"] <= FREE_LIMIT:
            raise RemoteOutputError(
                f"companion: {target}: {what} gives {name} {shown(entry['free'])} bytes free"
            )
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
        version=doc["version"],
        manifest_format=(MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION),
        python=doc["python"],
        backend=doc["backend"],
        backend_version=doc["backend_version"],
        host_identity=dict(doc["host_identity"]),
        host_tag=doc["host_tag"],
        paths=CompanionPaths(**{name: found[name]["path"] for name in wanted}),
        free_bytes=inputs["free"],
        needed_bytes=send_bytes + build_estimate_bytes,
    )


def _there(asked: str, home: str, cwd: str) -> str:
    """Where ``asked`` is on the companion: a leading ``~`` its user's home, a relative
    path under its working folder (as the probe resolves it there)."""
    if asked == "~" or asked.startswith("~/"):
        return posixpath.normpath(home + asked[1:])
    return posixpath.normpath(posixpath.join(cwd, asked))


def _last_line(text: str) -> str:
    lines = [line for line in text[-4096:].replace("\r", "\n").split("\n") if line.strip()]
    return neutralize(lines[-1])[:300] if lines else ""


def _shown(path: str) -> str:
    """A path for a one-line message: quoted where it holds a newline or another control."""
    return path if path.isprintable() else repr(path)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
