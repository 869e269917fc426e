"""The whole companion run, phase by phase: bring-up, transfer, build, verify.

The companion's word that it built is not taken: afterwards its Manifest.json
is read back (within :data:`MANIFEST_LIMIT`), its signature verified against the
workstation's trust store, and its build identity compared with the one
computed here for what was sent (the companion's host identity from bring-up).
"""

from __future__ import annotations

import json
import posixpath
import re
import stat
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncssh

from takeoff_cache.backbones.file import load_backbones
from takeoff_cache.build.identity import identity_of
from takeoff_cache.build.request import BuildRequest
from takeoff_cache.companion import inputs
from takeoff_cache.companion.answers import Redactor, shown
from takeoff_cache.companion.bringup import BringUp, CompanionPaths, bring_up
from takeoff_cache.companion.remote import remote_build, remote_verify
from takeoff_cache.companion.ssh import Connection, SSHSettings, connect
from takeoff_cache.companion.transfer import TransferReport, send_files
from takeoff_cache.core.fsutil import atomic_output, sha256_file
from takeoff_cache.core.layout import MANIFEST_NAME
from takeoff_cache.core.workdir import maps_dir
from takeoff_cache.errors import CompanionManifestError, InvalidRequestError, VerificationError
from takeoff_cache.tiles.corpus import Tile, fingerprint
from takeoff_cache.trust.keys import TrustedKey, load_trust_store
from takeoff_cache.trust.manifest import Manifest, verify_manifest_bytes

# A manifest lists a cache's files; one past this size is not read back.
MANIFEST_LIMIT = 16 * 2**20
# The build's coverage map, fetched back (an image of the area: a few MB at most).
MAP_LIMIT = 32 * 2**20


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
    identity: str = ""  # the build identity of what was sent, on the companion's host


def expected_identity(request: BuildRequest, tiles: Sequence[Tile], host: dict[str, Any]) -> str:
    """The build identity the companion's build of ``request`` over ``tiles`` must
    have, with ``host`` its host identity (from bring-up)."""
    backbones = [b.identity() for b in load_backbones(request.backbones)]
    calibration = sha256_file(request.calibration) if request.calibration else None
    return identity_of(request, backbones, calibration, host, fingerprint(tuple(sorted(tiles))))


def workstation_trust(trust: Path | str | None) -> tuple[Path, list[TrustedKey]]:
    """The workstation's trust store, which the companion's manifest must verify with."""
    if trust is None:
        raise InvalidRequestError(
            "trust: a build on the companion needs the workstation's trust store too"
            " (--trust, holding the companion's public key): its manifest is checked with it"
        )
    path = Path(trust).expanduser()
    return path, load_trust_store(path)


async def read_remote_manifest(conn: Connection, cache_root: str) -> bytes:
    """The bytes of ``cache_root/Manifest.json`` there, a regular file of at most
    :data:`MANIFEST_LIMIT` bytes."""
    path = posixpath.join(cache_root, MANIFEST_NAME)
    missing = f"its build reported success but left no {shown(path, 300)}"
    return await read_remote_file(conn, path, MANIFEST_LIMIT, "a manifest", missing)


async def read_remote_file(
    conn: Connection, path: str, limit: int, what: str | None = None, missing: str | None = None
) -> bytes:
    """The bytes of the regular file ``path`` there, at most ``limit`` of them (its size
    is checked before it is read, and the read stops past it). ``what`` names such a
    file in the size error, ``missing`` says what its absence means."""
    target = conn.target
    too_big = f"larger than {what} ({limit})" if what else f"larger than {limit} bytes"
    try:
        async with await conn.conn.start_sftp_client() as sftp:
            attrs = await sftp.lstat(path)
            if attrs.permissions is None or not stat.S_ISREG(attrs.permissions):
                raise CompanionManifestError(
                    f"companion: {target}: {shown(path, 300)} is not a regular file"
                )
            if attrs.size is not None and attrs.size > limit:
                raise CompanionManifestError(
                    f"companion: {target}: {shown(path, 300)} holds {attrs.size} bytes, {too_big}"
                )
            async with sftp.open(path, "rb") as fh:
                data: bytes = await fh.read(limit + 1)
    except asyncssh.SFTPNoSuchFile:
        absent = missing or f"{shown(path, 300)} is not there"
        raise CompanionManifestError(f"companion: {target}: {absent}") from None
    except (asyncssh.Error, OSError) as exc:
        raise CompanionManifestError(
            f"companion: {target}: cannot read {shown(path, 300)} back: {exc}"
        ) from exc
    if len(data) > limit:
        raise CompanionManifestError(f"companion: {target}: {shown(path, 300)} is {too_big}")
    return data


async def fetch_file(conn: Connection, path: str, local: Path, limit: int) -> None:
    """Copy the regular file ``path`` there to ``local`` here, at most ``limit`` bytes,
    written whole or not at all."""
    data = await read_remote_file(conn, path, limit)
    local.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(local) as tmp:
        tmp.write_bytes(data)


async def fetch_back(conn: Connection, report: dict[str, Any], here: Path) -> dict[str, Any]:
    """The build's coverage map and its whole report, copied into ``here`` (the
    workstation's maps folder); the report returned names the copies, and keeps the
    companion's map path as ``coverage_map_there``."""
    there = report.get("coverage_map")
    name = f"companion-{conn.target.host}-{conn.target.port}"
    out = dict(report)
    if isinstance(there, str) and there:
        local = here / f"{name}-{_safe(posixpath.basename(there))}"
        await fetch_file(conn, there, local, MAP_LIMIT)
        out.update(coverage_map=str(local), coverage_map_there=there)
    report_path = here / f"{name}-{_safe(str(report.get('build_identity') or 'build'))}.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    out["report_path"] = str(report_path)
    with atomic_output(report_path) as tmp:
        tmp.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


def _safe(name: str) -> str:
    """A file name from the companion, made a plain one here."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:120] or "file"


def check_manifest(
    data: bytes, trusted: list[TrustedKey], identity: str | None, target: str, trust: Path | str
) -> Manifest:
    """The companion's manifest, verified with the workstation's keys and of ``identity``
    (when one is given)."""
    try:
        manifest = verify_manifest_bytes(data, trusted)
    except VerificationError as exc:
        raise CompanionManifestError(
            f"companion: {target}: its {MANIFEST_NAME} does not verify with the"
            f" workstation's trust store {trust}: {exc}"
        ) from None
    if identity is not None and manifest.build_identity != identity:
        raise CompanionManifestError(
            f"companion: {target}: its {MANIFEST_NAME} is of build"
            f" {shown(manifest.build_identity, 16)}..., not of the build sent"
            f" ({identity[:12]}...)"
        )
    return manifest


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
    identity = expected_identity(request, tiles, up.host_identity)
    return Sent(up, sent, fields, f"{remote_dir}/request.toml", identity)


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
    trust: Path | str | None = None,
    work_dir: Path | None = None,
) -> CompanionReport:
    """Check the companion, send it the selected tiles and the models, build and verify there,
    then check the manifest it signed against ``trust``, the workstation's trust store.

    ``options``: the build options (:func:`takeoff_cache.companion.remote.option_args`);
    ``work_dir``: the workstation's work folder, where the build's coverage map and
    report are copied (:func:`fetch_back`).
    """
    redact = redact or Redactor.from_env()
    trust_path, trusted = workstation_trust(trust)
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
        data = await read_remote_manifest(conn, sent.bring_up.paths.cache_root)
        manifest = check_manifest(data, trusted, sent.identity, str(conn.target), trust_path)
        reported = built.report.get("build_identity")
        if reported is not None and reported != manifest.build_identity:
            raise CompanionManifestError(
                f"companion: {conn.target}: its build reported identity"
                f" {shown(reported, 16)}..., its manifest {manifest.build_identity[:12]}..."
            )
        build = built.report
        if work_dir is not None:
            build = await fetch_back(conn, build, maps_dir(work_dir))
    checked = {"ok": True, "keyid": manifest.keyid, "build_identity": manifest.build_identity}
    verify = {**verified.report, "workstation": checked}
    return CompanionReport(sent.bring_up, sent.transfer, build, verify)


async def verify_on_companion(
    settings: SSHSettings,
    paths: CompanionPaths,
    *,
    tool: str = "takeoff-cache",
    redact: Redactor | None = None,
    trust: Path | str | None = None,
    identity: str | None = None,
) -> dict[str, Any]:
    """``verify --host-check`` of the companion's cache, there; with ``trust`` (the
    workstation's trust store) its manifest is also read back and checked here, as
    after a build over SSH: signed by a trusted key, and of ``identity`` when given
    (a build run by a work pool's worker on the companion, of what was sent)."""
    trusted = workstation_trust(trust) if trust is not None else None
    async with connect(settings) as conn:
        verified = await remote_verify(conn, paths, tool=tool, redact=redact)
        if trusted is None:
            return verified.report
        data = await read_remote_manifest(conn, paths.cache_root)
    trust_path, keys = trusted
    manifest = check_manifest(data, keys, identity, str(conn.target), trust_path)
    checked = {"ok": True, "keyid": manifest.keyid, "build_identity": manifest.build_identity}
    return {**verified.report, "workstation": checked}
