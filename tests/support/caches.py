"""Real demo caches for the locate and self-test tests: built by the real build, re-signed
with the demo's trusted key where a test changes an artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from takeoff_cache.cli.main import main
from takeoff_cache.core.fsutil import sha256_file
from takeoff_cache.demo.models import build_weak_vpr_model
from takeoff_cache.localize.locate import Localizer, open_localizer
from takeoff_cache.trust.keys import load_signer, load_trust_store
from takeoff_cache.trust.manifest import Manifest, sign_manifest
from takeoff_cache.trust.verify import verify_cache


def build_demo_cache(source: Path, dest: Path, *extra: str, weak: bool = False) -> Path:
    """A copy of the demo inputs at ``dest``, built (``extra``: more build flags); with
    ``weak``, its place-recognition backbone is the deliberately weak one."""
    shutil.copytree(source, dest)
    if weak:
        build_weak_vpr_model(dest / "models" / "weak.onnx")
        toml = dest / "backbones.toml"
        toml.write_text(toml.read_text().replace("models/vpr.onnx", "models/weak.onnx"))
    argv = ["build", "--request", str(dest / "request.toml"), "--work-dir", str(dest / "work")]
    code = main([*argv, *extra, "--json"])
    if code != 0:
        raise RuntimeError(f"demo build failed with exit code {code}")
    return dest


def verified(root: Path) -> Manifest:
    return verify_cache(root / "cache", load_trust_store(root / "trust"))


def localizer_of(root: Path) -> tuple[Manifest, Localizer]:
    manifest = verified(root)
    return manifest, open_localizer(root / "cache", manifest)


def artifact_path(root: Path, kind: str) -> str:
    doc = json.loads((root / "cache" / "Manifest.json").read_text())
    return str(next(a["path"] for a in doc["signed"]["artifacts"] if a["kind"] == kind))


def replace_and_resign(root: Path, rel: str, data: bytes) -> None:
    """Give the artifact ``rel`` new bytes and re-sign the manifest with the trusted key."""
    path = root / "cache" / rel
    path.unlink()  # the cache's files share their inode with the work folder's store
    path.write_bytes(data)
    doc: dict[str, Any] = json.loads((root / "cache" / "Manifest.json").read_text())
    signed = doc["signed"]
    for entry in signed["artifacts"]:
        if entry["path"] == rel:
            entry["size"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    signed["version"] += 1
    data = sign_manifest(signed, load_signer(root / "operator.key"))
    (root / "cache" / "Manifest.json").write_bytes(data)
