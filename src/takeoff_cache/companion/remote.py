"""Run the build and ``verify --host-check`` on the companion and read their reports back.

The companion builds with its own work folder, signing key and trust store
(paths there: the key never travels). Secrets never go onto a remote command
line, where ``ps`` and shell history would show them: the key's passphrase,
if the companion's key has one, is read from stdin by the remote shell and
exported to the build alone. Whatever the remote side prints passes through a
:class:`Redactor` before the caller sees it.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from takeoff_cache.build.options import OPTION_FIELDS
from takeoff_cache.companion.answers import (
    Redactor,
    check_fields,
    last_json_line,
    neutralize,
    neutralize_doc,
)
from takeoff_cache.companion.bringup import CompanionPaths, tool_words
from takeoff_cache.companion.ssh import Connection
from takeoff_cache.core.env import KEY_PASSPHRASE
from takeoff_cache.errors import EXIT_COMPANION, RemoteCommandError, RemoteOutputError

# Exit codes the remote takeoff-cache shares with ours (SPEC §9): the build's own, and
# its readiness verdict (12); others are the companion's.
_SHARED_CODES = frozenset(range(1, 9)) | {12}
# Lines of output an error shows when the report cannot be read.
TAIL_LINES = 8
# Build options that stay here; every other one of OPTION_FIELDS reaches the
# companion's build as its flag (the work folder as the companion's own).
LOCAL_OPTIONS = {
    "dask_address": "a Dask cluster's workers need the build's work folder at the same path,"
    " and the companion's is its own",
}


@dataclass(frozen=True)
class RemoteResult:
    """A remote command's parsed JSON report and how it ended."""

    exit_code: int
    report: dict[str, Any]
    elapsed_s: float


# The outcomes of a build that succeeded (SPEC §9: exit 0).
SUCCESS_OUTCOMES = frozenset({"success", "idempotent_no_op"})
_OPTIONAL_STR = (str, type(None))
# The types of the report fields read here; fields a newer companion adds pass unchecked.
REPORT_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    "build": {
        "outcome": (str,),
        "tiles": (int,),
        "engines_built": (int,),
        "engines_reused": (int,),
        "descriptors_generated": (int,),
        "descriptors_reused": (int,),
        "build_identity": _OPTIONAL_STR,
        "manifest_path": _OPTIONAL_STR,
        "failure_reason": _OPTIONAL_STR,
        "elapsed_s": (int, float),
        "phases": (dict,),
        "warnings": (list,),
    },
    "verify": {"ok": (bool,), "version": (int,), "artifacts": (int,), "problems": (list,)},
}


def check_report(what: str, doc: dict[str, Any], target: str) -> None:
    """Raise :class:`RemoteOutputError` naming the first field of the wrong type."""
    check_fields(f"{what} report", doc, REPORT_TYPES[what], target)


def claims_success(what: str, doc: dict[str, Any]) -> bool:
    """Whether a (type-checked) report says its command succeeded."""
    if what == "verify":
        return doc.get("ok") is True
    return doc.get("outcome") in SUCCESS_OUTCOMES


def map_exit_code(remote: int) -> int:
    """The remote exit code where it means the same here, else the companion's code."""
    return remote if remote in _SHARED_CODES else EXIT_COMPANION


def _tail(*texts: str) -> list[str]:
    lines = [line for text in texts for line in text.replace("\r", "\n").splitlines()]
    return [line for line in lines if line.strip()][-TAIL_LINES:]


def _stderr_line(stderr: str) -> str:
    """The remote tool's own one-line reason (``takeoff-cache: error: ...``), if it gave one."""
    lines = _tail(stderr)
    for line in reversed(lines):
        if line.startswith("takeoff-cache:"):
            return line
    return lines[-1] if lines else "no output"


def _secret_stdin(passphrase: str | None) -> tuple[str, str | None]:
    """A shell prefix that reads the passphrase from stdin into the build's environment."""
    if passphrase is None:
        return "", None
    if "\n" in passphrase:
        raise RemoteCommandError(
            "companion: a key passphrase with a newline cannot be sent", EXIT_COMPANION
        )
    return (
        f"IFS= read -r {KEY_PASSPHRASE} && export {KEY_PASSPHRASE} && ",
        passphrase + "\n",
    )


async def _run_json(
    conn: Connection,
    what: str,
    argv: list[str],
    *,
    tool: str,
    redact: Redactor,
    on_line: Callable[[str], None] | None,
    passphrase: str | None,
    timeout_s: float | None,
    report_key: str,
) -> RemoteResult:
    prefix, stdin = _secret_stdin(passphrase)
    command = prefix + "exec " + shlex.join([*tool_words(tool), *argv])
    shown = (lambda line: on_line(neutralize(redact(line)))) if on_line is not None else None
    started = time.perf_counter()
    result = await conn.stream(command, shown, input=stdin, timeout_s=timeout_s)
    elapsed = round(time.perf_counter() - started, 3)
    stdout, stderr = redact(result.stdout), redact(result.stderr)
    doc, why = last_json_line(stdout)
    stdout, stderr = neutralize(stdout, lines=True), neutralize(stderr, lines=True)
    code = result.exit_status
    target = conn.target
    if doc is None or report_key not in doc:
        if code != 0:
            raise RemoteCommandError(
                f"companion: {target}: {what} failed there (exit {code}): {_stderr_line(stderr)}",
                map_exit_code(code),
            )
        if doc is not None:
            why = f"a JSON line without {report_key!r}"
        if result.stdout_dropped:
            why += f" after {_mib(result.stdout_dropped + len(result.stdout))} of output"
        tail = " | ".join(_tail(stdout, stderr)[-3:])[:600] or "nothing"
        raise RemoteOutputError(
            f"companion: {target}: {what} printed no JSON report ({why}); its last lines: {tail}"
        )
    check_report(what, doc, str(target))
    doc = neutralize_doc(doc)
    success = claims_success(what, doc)
    if code != 0 and success:
        raise RemoteCommandError(
            f"companion: {target}: {what} exited {code} but its report says"
            f" {report_key} {doc[report_key]!r}; not trusted",
            EXIT_COMPANION,
            doc,
        )
    if code != 0:
        raise RemoteCommandError(
            f"companion: {target}: {what} failed there (exit {code}): {_stderr_line(stderr)}",
            map_exit_code(code),
            doc,
        )
    if not success:
        raise RemoteCommandError(
            f"companion: {target}: {what} exited 0 but its report says"
            f" {report_key} {doc[report_key]!r}; not trusted",
            EXIT_COMPANION,
            doc,
        )
    return RemoteResult(code, doc, elapsed)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def option_args(options: Mapping[str, Any], work_dir: str) -> list[str]:
    """The build options as the companion's ``build`` flags: each one of
    OPTION_FIELDS that is set, but :data:`LOCAL_OPTIONS`, with ``work_dir`` its work folder."""
    args: list[str] = []
    for field in OPTION_FIELDS:
        value = work_dir if field.name == "work_dir" else options.get(field.name)
        if field.name not in LOCAL_OPTIONS and value is not None:
            args += [field.flag, str(value)]
    return args


async def remote_build(
    conn: Connection,
    paths: CompanionPaths,
    request_path: str,
    *,
    tool: str = "takeoff-cache",
    backend: str = "auto",
    options: Mapping[str, Any] | None = None,
    extra_args: Iterable[str] = (),
    on_line: Callable[[str], None] | None = None,
    passphrase: str | None = None,
    redact: Redactor | None = None,
    timeout_s: float | None = None,
) -> RemoteResult:
    """``takeoff-cache build --request REQUEST --json`` there, with ``options`` (the build
    options, ``backend`` apart) as its flags; stderr lines go to ``on_line``.

    A build that ends ``failure`` or exits non-zero raises :class:`RemoteCommandError`
    carrying its report and the exit code mapped to ours.
    """
    argv = [
        "build",
        "--request",
        request_path,
        *option_args({**(options or {}), "backend": backend}, paths.work_dir),
        *extra_args,
        "--json",
    ]
    return await _run_json(
        conn,
        "build",
        argv,
        tool=tool,
        redact=redact or Redactor.from_env(),
        on_line=on_line,
        passphrase=passphrase,
        timeout_s=timeout_s,
        report_key="outcome",
    )


async def remote_verify(
    conn: Connection,
    paths: CompanionPaths,
    *,
    tool: str = "takeoff-cache",
    state_file: str | None = None,
    redact: Redactor | None = None,
    timeout_s: float | None = None,
) -> RemoteResult:
    """``takeoff-cache verify CACHE_ROOT --trust TRUST --host-check --json`` there."""
    argv = ["verify", paths.cache_root, "--trust", paths.trust, "--host-check", "--json"]
    if state_file:
        argv[-1:-1] = ["--state", state_file]
    return await _run_json(
        conn,
        "verify",
        argv,
        tool=tool,
        redact=redact or Redactor.from_env(),
        on_line=None,
        passphrase=None,
        timeout_s=timeout_s,
        report_key="ok",
    )
