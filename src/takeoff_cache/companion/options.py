"""Where and how to reach the companion: ``prepare``'s ``--companion`` flags and the
request file's ``[companion]`` table, as one value a flow parameter can carry.

Flags override the table. Nothing here is a secret: the companion's key stays
there (only its path is named), its passphrase comes from the environment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from takeoff_cache.companion.bringup import CompanionPaths
from takeoff_cache.companion.ssh import (
    DEFAULT_COMMAND_TIMEOUT_S,
    DEFAULT_CONNECT_TIMEOUT_S,
    SSHSettings,
    parse_target,
)
from takeoff_cache.errors import InvalidRequestError


@dataclass(frozen=True)
class CompanionOptions:
    target: str
    cache_root: str
    key: str
    trust: str
    work_dir: str = CompanionPaths.work_dir
    inputs_dir: str = CompanionPaths.inputs_dir
    tool: str = "takeoff-cache"
    known_hosts: str = "~/.ssh/known_hosts"
    identity: tuple[str, ...] = ()
    use_agent: bool = True
    accept_new_host_key: bool = False
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S

    @property
    def paths(self) -> CompanionPaths:
        return CompanionPaths(self.cache_root, self.key, self.trust, self.work_dir, self.inputs_dir)

    def ssh_settings(self) -> SSHSettings:
        return SSHSettings(
            target=parse_target(self.target),
            known_hosts=Path(self.known_hosts).expanduser(),
            client_keys=tuple(Path(p).expanduser() for p in self.identity),
            use_agent=self.use_agent,
            accept_new_host_key=self.accept_new_host_key,
            connect_timeout_s=self.connect_timeout_s,
            command_timeout_s=self.command_timeout_s,
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "identity": list(self.identity)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CompanionOptions:
        return companion_options(data, {})


_NAMES = tuple(f.name for f in fields(CompanionOptions))
_NUMBERS = ("connect_timeout_s", "command_timeout_s")
_FLAGS = ("use_agent", "accept_new_host_key")


def companion_options(table: dict[str, Any], flags: dict[str, Any]) -> CompanionOptions:
    """The companion's options from the ``[companion]`` table, then the flags given."""
    unknown = sorted(set(table) - set(_NAMES))
    if unknown:
        raise InvalidRequestError(f"companion: unknown field {unknown[0]!r}")
    merged = {**table, **{k: v for k, v in flags.items() if v is not None}}
    for name in ("target", "cache_root", "key", "trust"):
        if not merged.get(name):
            raise InvalidRequestError(
                f"companion: {name} missing (give --companion-{name.replace('_', '-')}"
                f" or [companion] {name} in the request file)"
                if name != "target"
                else "companion: target missing (give --companion USER@HOST[:PORT])"
            )
    values: dict[str, Any] = {}
    for name in _NAMES:
        if name not in merged:
            continue
        value = merged[name]
        if name in _NUMBERS:
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise InvalidRequestError(f"companion: {name} must be a number > 0; got {value!r}")
            value = float(value)
        elif name in _FLAGS:
            if not isinstance(value, bool):
                raise InvalidRequestError(f"companion: {name} must be true or false")
        elif name == "identity":
            value = (value,) if isinstance(value, str) else value
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise InvalidRequestError("companion: identity must be a path or a list of paths")
            value = tuple(value)
        elif not isinstance(value, str):
            raise InvalidRequestError(f"companion: {name} must be a string; got {value!r:.60}")
        values[name] = value
    parse_target(values["target"])  # a bad target is refused before anything starts
    return CompanionOptions(**values)
