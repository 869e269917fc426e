"""The signed manifest: canonical bytes, signing, and verification from bytes alone.

Canonicalization: the signature covers ``canonical_bytes(signed)``, which is
``json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``
encoded as UTF-8 — keys sorted by code point, no insignificant whitespace,
strings with minimal escaping, integers in decimal, floats in Python's
shortest round-trip form (bounding boxes and altitudes are the only floats).
``NaN`` and infinities are refused. The file itself is indented for reading;
whitespace there does not matter because the signature is over the
canonical form of the parsed ``signed`` object.

Nothing in this module touches the disk: it maps bytes and keys to a verified
:class:`Manifest` or a :class:`VerificationError` listing what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from takeoff_cache import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION
from takeoff_cache.core.canonical import canonical_json
from takeoff_cache.core.layout import (
    MANIFEST_NAME as MANIFEST_NAME,  # re-exported for callers of this module
)
from takeoff_cache.core.layout import RESERVED
from takeoff_cache.errors import SigningError, VerificationError
from takeoff_cache.trust.keys import Signer, TrustedKey

# A lineage is a random UUID in its canonical lowercase form.
_LINEAGE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def new_lineage() -> str:
    """A fresh lineage id, made by the first build of a cache root."""
    return str(uuid.uuid4())


def canonical_bytes(obj: Any) -> bytes:
    try:
        return canonical_json(obj)
    except ValueError as exc:
        raise SigningError(f"manifest: cannot canonicalize: {exc}") from exc


@dataclass(frozen=True)
class Artifact:
    path: str
    kind: str
    size: int
    sha256: str
    fields: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "size": self.size,
            "sha256": self.sha256,
            **self.fields,
        }


@dataclass(frozen=True)
class Manifest:
    """A manifest whose signature has been verified (or that we just signed)."""

    signed: dict[str, Any]
    keyid: str

    @property
    def version(self) -> int:
        return int(self.signed["version"])

    @property
    def build_identity(self) -> str:
        return str(self.signed["build_identity"])

    @property
    def lineage(self) -> str | None:
        """The cache's lineage id; None in manifests written before lineages existed."""
        lineage = self.signed.get("lineage")
        return lineage if isinstance(lineage, str) else None

    @property
    def artifacts(self) -> list[Artifact]:
        return _artifacts(self.signed)


@dataclass(frozen=True)
class UnverifiedManifest:
    """A manifest checked as a verified one is, but for its signature: to show, never to trust."""

    signed: dict[str, Any]
    keyids: list[str]  # what the signatures claim, unchecked

    @property
    def artifacts(self) -> list[Artifact]:
        return _artifacts(self.signed)


def _artifacts(signed: dict[str, Any]) -> list[Artifact]:
    out = []
    for entry in signed["artifacts"]:
        rest = {k: v for k, v in entry.items() if k not in {"path", "kind", "size", "sha256"}}
        out.append(Artifact(entry["path"], entry["kind"], entry["size"], entry["sha256"], rest))
    return out


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def sign_manifest(signed: dict[str, Any], signer: Signer) -> bytes:
    """Return the bytes of Manifest.json holding ``signed`` and one Ed25519 signature."""
    sig = signer.sign(canonical_bytes(signed))
    doc = {
        "signed": signed,
        "signatures": [{"keyid": signer.keyid, "sig": base64.b64encode(sig).decode("ascii")}],
    }
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _check_artifact_entry(i: int, entry: Any, problems: list[str]) -> None:
    if not isinstance(entry, dict):
        problems.append(f"artifacts[{i}] is not an object")
        return
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        problems.append(f"artifacts[{i}].path is missing or not a string")
    else:
        pure = PurePosixPath(path)
        if (
            not pure.parts
            or pure.parts == (".",)
            or pure.is_absolute()
            or "\\" in path
            or ".." in pure.parts
            or path != pure.as_posix()
        ):
            problems.append(
                f"artifacts[{i}].path {path!r} is not a plain relative path inside the cache root"
            )
        elif pure.parts[0] in RESERVED:
            problems.append(f"artifacts[{i}].path {path!r} names a reserved entry")
    if not isinstance(entry.get("kind"), str):
        problems.append(f"artifacts[{i}].kind is missing or not a string")
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        problems.append(f"artifacts[{i}].size is not a non-negative integer")
    digest = entry.get("sha256")
    if not (
        isinstance(digest, str)
        and len(digest) == 64
        and all(c in "0123456789abcdef" for c in digest)
    ):
        problems.append(f"artifacts[{i}].sha256 is not a lowercase hex SHA-256")


def _check_signed_structure(signed: dict[str, Any], problems: list[str]) -> None:
    version = signed.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        problems.append("signed.version is not a positive integer")
    if not isinstance(signed.get("build_identity"), str):
        problems.append("signed.build_identity is missing")
    lineage = signed.get("lineage")
    if "lineage" in signed and not (isinstance(lineage, str) and _LINEAGE.fullmatch(lineage)):
        problems.append("signed.lineage is not a lowercase UUID")
    for field in ("created_at", "expires_at"):
        value = signed.get(field)
        if value is None and field == "expires_at":
            continue
        try:
            if not isinstance(value, str):
                raise ValueError(field)
            parse_time(value)
        except ValueError:
            problems.append(f"signed.{field} is not a UTC time like 2026-01-31T12:00:00Z")
    artifacts = signed.get("artifacts")
    if not isinstance(artifacts, list):
        problems.append("signed.artifacts is not a list")
        return
    seen: set[str] = set()
    for i, entry in enumerate(artifacts):
        _check_artifact_entry(i, entry, problems)
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            if entry["path"] in seen:
                problems.append(f"artifacts[{i}].path {entry['path']!r} is listed twice")
            seen.add(entry["path"])


def _parse_document(data: bytes) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """Manifest.json bytes -> its ``signed`` object and its (keyid, signature) pairs."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VerificationError(f"manifest is not valid UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise VerificationError("manifest is nested too deeply to be a manifest") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("signed"), dict):
        raise VerificationError("manifest has no 'signed' object")
    signed: dict[str, Any] = doc["signed"]
    sigs = doc.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise VerificationError("manifest has no signatures")
    if set(doc) != {"signed", "signatures"}:
        raise VerificationError(
            f"manifest has unexpected top-level keys: {sorted(set(doc) - {'signed', 'signatures'})}"
        )

    problems: list[str] = []
    raw_sigs: list[tuple[str, bytes]] = []
    for i, entry in enumerate(sigs):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("keyid"), str)
            and isinstance(entry.get("sig"), str)
        ):
            problems.append(f"signatures[{i}] is not {{keyid, sig}}")
            continue
        try:
            raw = base64.b64decode(entry["sig"], validate=True)
        except (binascii.Error, ValueError):
            problems.append(f"signatures[{i}].sig is not base64")
            continue
        raw_sigs.append((entry["keyid"], raw))
    keyids = [k for k, _ in raw_sigs]
    if len(set(keyids)) != len(keyids) or len({s for _, s in raw_sigs}) != len(raw_sigs):
        problems.append("manifest carries duplicated signatures")
    if problems:
        raise VerificationError(problems[0], problems)
    return signed, raw_sigs


def _signed_problems(signed: dict[str, Any]) -> list[str]:
    """What is wrong with the format or the structure of ``signed``."""
    problems: list[str] = []
    if signed.get("format") != MANIFEST_FORMAT:
        problems.append(f"unknown manifest format {signed.get('format')!r}")
    # type() and not ==: true and 1.0 are not the format version 1.
    format_version = signed.get("format_version")
    if type(format_version) is not int or format_version != MANIFEST_FORMAT_VERSION:
        problems.append(
            f"unknown manifest format_version {signed.get('format_version')!r}"
            f" (this tool reads version {MANIFEST_FORMAT_VERSION})"
        )
    _check_signed_structure(signed, problems)
    return problems


def parse_manifest_bytes(data: bytes) -> UnverifiedManifest:
    """Parse Manifest.json bytes through every check of verification but the signature's,
    expiry and version: for showing a manifest (``inspect``), never for trusting it."""
    signed, raw_sigs = _parse_document(data)
    problems = _signed_problems(signed)
    if problems:
        raise VerificationError(problems[0], problems)
    return UnverifiedManifest(signed, [keyid for keyid, _ in raw_sigs])


def verify_manifest_bytes(
    data: bytes,
    trusted: list[TrustedKey],
    *,
    now: datetime | None = None,
    min_version: int | None = None,
    check_expiry: bool = True,
) -> Manifest:
    """Parse Manifest.json bytes and check signature, format, expiry and version.

    Trust is decided by the key that actually verifies the signature; the
    ``keyid`` in the file only says which key to try first. ``check_expiry=False``
    is for the manifests a killed commit leaves in staging: they only account
    for files, and must go on doing so after their lifetime ran out.
    """
    signed, raw_sigs = _parse_document(data)
    keyids = [k for k, _ in raw_sigs]
    try:
        message = canonical_bytes(signed)
    except SigningError as exc:
        raise VerificationError(str(exc)) from None
    verified_by: str | None = None
    # Try the hinted key first, but any trusted key that verifies counts.
    by_hint = sorted(trusted, key=lambda t: t.keyid not in keyids)
    for key in by_hint:
        if any(key.verifies(sig, message) for _, sig in raw_sigs):
            verified_by = key.keyid
            break
    if verified_by is None:
        raise VerificationError("signature does not verify with any trusted key")

    problems = _signed_problems(signed)
    if not problems:
        moment = now or datetime.now(UTC)
        expires = signed.get("expires_at")
        if check_expiry and isinstance(expires, str) and parse_time(expires) <= moment:
            problems.append(f"manifest expired at {expires}")
        if min_version is not None and signed["version"] < min_version:
            problems.append(
                f"manifest version {signed['version']} is below version {min_version}"
                " already seen (rollback)"
            )
    if problems:
        raise VerificationError(problems[0], problems)
    return Manifest(signed, verified_by)


def compose_signed(
    *,
    version: int,
    lineage: str,
    created_at: datetime,
    expires_at: datetime | None,
    build_identity: str,
    request: dict[str, Any],
    host: dict[str, Any],
    corpus_fingerprint: str,
    tile_count: int,
    artifacts: list[Artifact],
    tool_version: str,
    self_test: dict[str, Any] | None = None,
    ready: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``signed`` object of a new manifest (see schema/manifest.schema.json);
    ``self_test``: the self-test's figures, absent from a build that skipped it;
    ``ready``: the readiness verdict (build/readiness.py), absent from older builds."""
    signed: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "version": version,
        "lineage": lineage,
        "created_at": format_time(created_at),
        "expires_at": format_time(expires_at) if expires_at else None,
        "build_identity": build_identity,
        "request": request,
        "host": host,
        "corpus": {"fingerprint": corpus_fingerprint, "tile_count": tile_count},
        "artifacts": [a.to_json() for a in sorted(artifacts, key=lambda a: a.path)],
        "tool": {"name": "takeoff-cache", "version": tool_version},
    }
    if self_test is not None:
        signed["self_test"] = self_test
    if ready is not None:
        signed["ready"] = ready
    return signed
