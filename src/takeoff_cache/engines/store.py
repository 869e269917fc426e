"""The engine store in the work folder: compiled engines, content-addressed by engine key.

An engine is reused only when its key (model SHA-256, backend and version,
host identity, precision, calibration SHA-256, build options) matches and the
file's SHA-256 still equals the one recorded when it was compiled. Anything
else compiles anew, so a changed model with an old name, a new backend
version or a damaged file never yields a stale engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from takeoff_cache.backbones.file import Backbone
from takeoff_cache.core.canonical import content_key
from takeoff_cache.core.faults import checkpoint
from takeoff_cache.core.fsutil import atomic_output, atomic_write_bytes, sha256_file
from takeoff_cache.core.workdir import engines_dir
from takeoff_cache.engines.base import Backend, built_as
from takeoff_cache.errors import CacheIOError, EngineError


@dataclass(frozen=True)
class EngineRecord:
    backbone: str
    role: str
    key: str
    file_name: str
    store_path: str
    sha256: str
    size: int
    backend: str
    precision: str
    built: bool


def engine_key(
    backbone: Backbone,
    backend: Backend,
    host: dict[str, Any],
    precision: str,
    calibration_sha256: str | None,
) -> str:
    return content_key(
        {
            "model_sha256": backbone.onnx_sha256,
            # int8 calibration preprocesses by the input spec, and TensorRT's
            # optimization profile takes its shapes from it (a matcher's: its names).
            "input": backbone.input.identity(),
            "backend": backend.name,
            "backend_version": backend.version,
            "host": host,
            "precision": precision,
            "calibration_sha256": calibration_sha256,
            "build_options": backend.build_options(precision, backbone),
        }
    )


def engine_file_name(backbone: Backbone, backend: Backend, precision: str, key: str) -> str:
    return f"{backbone.name}.{backend.host_tag()}.{precision}.{key[:12]}.{backend.suffix}"


def _stored_digest(sidecar: Path, key: str) -> tuple[str, int] | None:
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None
    sha, size = meta.get("sha256"), meta.get("size")
    if not isinstance(sha, str) or not isinstance(size, int):
        return None
    return sha, size


def lookup_engine(path: Path, key: str) -> tuple[str, int] | None:
    """Return ``(sha256, size)`` of a stored engine that is intact, else None."""
    recorded = _stored_digest(path.with_name(path.name + ".json"), key)
    if recorded is None or not path.is_file():
        return None
    sha, size = recorded
    if path.stat().st_size != size or sha256_file(path) != sha:
        return None
    return recorded


def ensure_engine(
    backbone: Backbone,
    backend: Backend,
    precision: str,
    calibration: Path | None,
    calibration_sha256: str | None,
    work_dir: Path,
) -> EngineRecord:
    """Return the stored engine for ``backbone``, compiling it first if needed, at the
    precision :func:`.base.built_as` gives (a matcher asked for int8 is built at fp32)."""
    if built_as(backbone, precision, calibration_sha256) != (precision, calibration_sha256):
        precision, calibration_sha256 = built_as(backbone, precision, calibration_sha256)
        calibration = None
    store = engines_dir(work_dir)
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheIOError(f"work folder: cannot create {store}: {exc.strerror}") from exc
    host = backend.host_identity()
    key = engine_key(backbone, backend, host, precision, calibration_sha256)
    name = engine_file_name(backbone, backend, precision, key)
    path = store / name

    def record(sha: str, size: int, built: bool) -> EngineRecord:
        return EngineRecord(
            backbone.name,
            backbone.role,
            key,
            name,
            str(path),
            sha,
            size,
            backend.name,
            precision,
            built,
        )

    # Several caches share the store: one compile per engine at a time. Stored
    # files are read-only (0444); a cache holds its own copy, never the store's file.
    with FileLock(str(store / f".{name}.lock")):
        found = lookup_engine(path, key)
        if found is not None:
            return record(*found, built=False)
        try:
            with atomic_output(path, point="store", read_only=True) as tmp:
                checkpoint("store.compile", tmp)
                backend.compile(backbone, precision, calibration, tmp, work_dir)
                sha, size = sha256_file(tmp), tmp.stat().st_size
        except EngineError:
            raise
        except OSError as exc:
            raise EngineError(
                f"backbone {backbone.name!r}: writing engine {path} failed: {exc.strerror}"
            ) from exc
        sidecar = {
            "key": key,
            "sha256": sha,
            "size": size,
            "backbone": backbone.name,
            "backend": backend.name,
            "backend_version": backend.version,
            "precision": precision,
            "host": host,
        }
        atomic_write_bytes(
            path.with_name(name + ".json"),
            json.dumps(sidecar, indent=2, sort_keys=True).encode(),
            0o444,
            point="store.record",
        )
        return record(sha, size, built=True)
