"""Small factories shared by the library unit tests: keys, artifacts, signed manifests, caches."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from takeoff_cache.core.fsutil import sha256_file
from takeoff_cache.engines import onnxruntime as ort_backend
from takeoff_cache.trust.keys import Signer, TrustedKey
from takeoff_cache.trust.manifest import MANIFEST_NAME, Artifact, compose_signed, sign_manifest

HOST: dict[str, Any] = {"backend": "onnxruntime", "backend_version": "1.0", "arch": "x86_64"}
CREATED = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
REQUEST: dict[str, Any] = {"bbox": [48.44, 35.02, 48.47, 35.07], "zoom_levels": [16, 17]}
LINEAGE = "6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"


def on_another_cpu(monkeypatch: pytest.MonkeyPatch, cpu: dict[str, Any]) -> None:
    """Make the ONNX Runtime backend detect ``cpu`` in this process, as it would on that host."""
    monkeypatch.setattr(ort_backend, "cpu_identity", lambda: cpu)


def new_signer() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


def trust_for(*signers: Signer) -> list[TrustedKey]:
    return [TrustedKey(s.keyid, s.public_key(), f"test:{s.keyid[:8]}") for s in signers]


def artifact_for(root: Path, rel: str, kind: str = "engine") -> Artifact:
    """An artifact entry describing the file ``root/rel`` as it is now."""
    path = root / rel
    return Artifact(rel, kind, path.stat().st_size, sha256_file(path), {"backbone": "vpr"})


def signed_doc(
    artifacts: list[Artifact],
    *,
    version: int = 1,
    host: dict[str, Any] | None = None,
    expires_at: datetime | None = None,
    build_identity: str = "b" * 64,
    lineage: str = LINEAGE,
) -> dict[str, Any]:
    return compose_signed(
        version=version,
        lineage=lineage,
        created_at=CREATED,
        expires_at=expires_at,
        build_identity=build_identity,
        request=REQUEST,
        host=HOST if host is None else host,
        corpus_fingerprint="c" * 64,
        tile_count=3,
        artifacts=artifacts,
        tool_version="0.1.0",
    )


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def manifest_for(root: Path, rels: list[str], signer: Signer, *, version: int = 1) -> bytes:
    """Signed manifest bytes listing the files ``rels`` as they are now under ``root``."""
    return sign_manifest(signed_doc([artifact_for(root, r) for r in rels], version=version), signer)


def make_cache(root: Path, signer: Signer, files: dict[str, bytes], *, version: int = 1) -> bytes:
    """Write ``files`` under ``root`` and a Manifest.json listing them; return its bytes."""
    root.mkdir(parents=True, exist_ok=True)
    write_files(root, files)
    data = manifest_for(root, sorted(files), signer, version=version)
    (root / MANIFEST_NAME).write_bytes(data)
    return data
