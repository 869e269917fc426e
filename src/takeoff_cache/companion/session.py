"""The whole companion run, phase by phase: bring-up, transfer, build, verify."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from takeoff_cache.build.request import BuildRequest
from takeoff_cache.companion import inputs
from takeoff_cache.companion.bringup import BringUp, CompanionPaths, bring_up
from takeoff_cache.companion.remote import Redactor, remote_build, remote_verify
from takeoff_cache.companion.ssh import Connection, SSHSettings, connect
from takeoff_cache.companion.transfer import TransferReport, send_files
from takeoff_cache.tiles.corpus import Tile


@dataclass(frozen=True)
class CompanionReport:
    bring_up: BringUp
    transfer: TransferReport
    build: dict[str, Any]
    verify: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "bring_up": self.bring_up.to_json(),
            "transfer": asdict(self.transfer),
            "build": self.build,
            "verify": self.verify,
        }


@dataclass(frozen=True)
class Sent:
    """A companion brought up and sent its inputs: what the build there reads."""

    bring_up: BringUp
    transfer: TransferReport
    request: dict[str, Any]  # the build request, with the companion's paths
    request_path: str  # the same, as the TOML file sent there


async def send_to_companion(
    conn: Connection,
    request: BuildRequest,
    tiles: Sequence[Tile],
    paths: CompanionPaths,
    *,
    backend: str = "auto",
    tool: str = "takeoff-cache",
) -> Sent:
    """Check the companion, then send it the selected tiles, the models and the request."""
    with tempfile.TemporaryDirectory(prefix="takeoff-cache-companion-") as tmp:
        staging = Path(tmp)
        names = inputs.INPUT_NAMES
        subset = staging / names["corpus"]
        inputs.write_tile_subset(request.corpus, tiles, subset)
        backbones_text, uploads = inputs.companion_backbones(request.backbones)
        backbones = staging / names["backbones"]
        backbones.write_text(backbones_text, encoding="utf-8")
        uploads = [
            inputs.Upload(subset, names["corpus"]),
            inputs.Upload(backbones, names["backbones"]),
            *uploads,
        ]
        if request.calibration is not None:
            uploads.append(inputs.Upload(request.calibration, names["calibration"]))
        send = inputs.total_bytes(u.local for u in uploads)
        model_bytes = send - subset.stat().st_size
        estimate = inputs.estimate_build_bytes(subset.stat().st_size, model_bytes, len(tiles))
        up = await bring_up(
            conn, paths, send_bytes=send, build_estimate_bytes=estimate, backend=backend, tool=tool
        )
        there = up.paths
        remote_dir = there.inputs_dir
        fields = inputs.companion_fields(request, inputs.remote_paths(there))
        (staging / "request.toml").write_text(inputs.toml_dumps(fields), encoding="utf-8")
        uploads.append(inputs.Upload(staging / "request.toml", "request.toml"))
        sent = await send_files(conn, uploads, remote_dir, python=up.python)
    return Sent(up, sent, fields, f"{remote_dir}/request.toml")


async def build_on_companion(
    settings: SSHSettings,
    request: BuildRequest,
    tiles: Sequence[Tile],
    paths: CompanionPaths,
    *,
    backend: str = "auto",
    options: Mapping[str, Any] | None = None,
    tool: str = "takeoff-cache",
    on_line: Callable[[str], None] | None = None,
    passphrase: str | None = None,
    redact: Redactor | None = None,
) -> CompanionReport:
    """Check the companion, send it the selected tiles and the models, build and verify there.

    ``options``: the build options (:func:`takeoff_cache.companion.remote.option_args`).
    """
    redact = redact or Redactor.from_env()
    async with connect(settings) as conn:
        sent = await send_to_companion(conn, request, tiles, paths, backend=backend, tool=tool)
        built = await remote_build(
            conn,
            sent.bring_up.paths,
            sent.request_path,
            tool=tool,
            backend=backend,
            options=options,
            # Its run logs (each phase as it ends) are the progress streamed back.
            extra_args=("-v",),
            on_line=on_line,
            passphrase=passphrase,
            redact=redact,
        )
        verified = await remote_verify(conn, sent.bring_up.paths, tool=tool, redact=redact)
    return CompanionReport(sent.bring_up, sent.transfer, built.report, verified.report)


async def verify_on_companion(
    settings: SSHSettings,
    paths: CompanionPaths,
    *,
    tool: str = "takeoff-cache",
    redact: Redactor | None = None,
) -> dict[str, Any]:
    """``verify --host-check`` of the companion's cache, there."""
    async with connect(settings) as conn:
        verified = await remote_verify(conn, paths, tool=tool, redact=redact)
    return verified.report
