"""The validate phase: every input checked before anything is written.

The signing key is loaded and checked against the trust store here, so an
untrusted key stops the build with zero files written.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from takeoff_cache.backbones.file import Backbone, load_backbones
from takeoff_cache.build.request import BuildRequest, parse_request
from takeoff_cache.core.fsutil import kind_problem, sha256_file
from takeoff_cache.core.workdir import checked_backbones_dir, normalized_areas_dir
from takeoff_cache.engines import Backend, get_backend
from takeoff_cache.errors import CorpusError, InvalidRequestError
from takeoff_cache.tiles.corpus import open_corpus
from takeoff_cache.trust.keys import (
    Signer,
    TrustedKey,
    check_trusted,
    load_signer,
    load_trust_store,
)


@dataclass(frozen=True)
class ValidatedRequest:
    request: BuildRequest
    backbones: tuple[Backbone, ...]
    calibration_sha256: str | None
    backend: Backend
    host: dict[str, Any]
    signer: Signer
    trusted: tuple[TrustedKey, ...]


def check_corpus(path: Path) -> None:
    try:
        open_corpus(path).close()
    except sqlite3.Error as exc:
        raise CorpusError(f"corpus: {path} cannot be read: {exc}") from exc


def check_engine_inputs(
    request: BuildRequest, backend_name: str, work_dir: Path | None = None
) -> tuple[tuple[Backbone, ...], str | None, Backend]:
    """What compile-engines needs: backbones, calibration and a backend."""
    checked = checked_backbones_dir(work_dir) if work_dir is not None else None
    backbones = load_backbones(request.backbones, checked)
    calibration_sha = None
    if request.calibration is not None:
        if problem := kind_problem(request.calibration, "file"):
            raise InvalidRequestError(f"calibration: {request.calibration} {problem}")
        calibration_sha = sha256_file(request.calibration)
    backend = get_backend(backend_name)
    if request.precision not in backend.precisions:
        raise InvalidRequestError(
            f"precision: the {backend.name} backend on this host builds"
            f" {' and '.join(backend.precisions)}, not {request.precision}"
        )
    if (
        request.precision == "int8"
        and request.calibration is not None
        and backend.name == "onnxruntime"
    ):
        from takeoff_cache.engines.calibration import (
            load_samples,  # numpy and Pillow: int8 builds only
        )

        load_samples(request.calibration)  # refuses a file that is not calibration samples
    return backbones, calibration_sha, backend


def validate(
    raw: dict[str, Any], backend_name: str = "auto", work_dir: Path | None = None
) -> ValidatedRequest:
    request = parse_request(raw, normalized_areas_dir(work_dir) if work_dir else None)
    if problem := kind_problem(request.cache_root, "folder"):
        hint = "; create it first (a build never creates the cache root)"
        raise InvalidRequestError(
            f"cache_root: {request.cache_root} {problem}"
            + (hint if problem == "does not exist" else "")
        )
    check_corpus(request.corpus)
    backbones, calibration_sha, backend = check_engine_inputs(request, backend_name, work_dir)
    trusted = load_trust_store(request.trust)
    signer = load_signer(request.key)
    check_trusted(signer, trusted, request.key, request.trust)
    return ValidatedRequest(
        request,
        backbones,
        calibration_sha,
        backend,
        backend.host_identity(),
        signer,
        tuple(trusted),
    )
