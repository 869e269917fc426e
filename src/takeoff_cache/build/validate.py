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
from takeoff_cache.build.request import BuildRequest, parse_fields
from takeoff_cache.core.fsutil import kind_problem, sha256_file
from takeoff_cache.core.workdir import checked_backbones_dir, normalized_areas_dir
from takeoff_cache.engines import Backend, get_backend
from takeoff_cache.errors import CorpusError, InvalidRequestError, Problems
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
    return engine_inputs(
        request.backbones, request.precision, request.calibration, backend_name, work_dir
    )


def engine_inputs(
    backbones_path: Path,
    precision: str,
    calibration: Path | None,
    backend_name: str,
    work_dir: Path | None = None,
) -> tuple[tuple[Backbone, ...], str | None, Backend]:
    checked = checked_backbones_dir(work_dir) if work_dir is not None else None
    backbones = load_backbones(backbones_path, checked)
    calibration_sha = None
    if calibration is not None:
        if problem := kind_problem(calibration, "file"):
            raise InvalidRequestError(f"calibration: {calibration} {problem}")
        calibration_sha = sha256_file(calibration)
    backend = get_backend(backend_name)
    if precision not in backend.precisions:
        raise InvalidRequestError(
            f"precision: the {backend.name} backend on this host builds"
            f" {' and '.join(backend.precisions)}, not {precision}"
        )
    if precision == "int8" and calibration is not None and backend.name == "onnxruntime":
        from takeoff_cache.engines.calibration import (
            load_samples,  # numpy and Pillow: int8 builds only
        )

        load_samples(calibration)  # refuses a file that is not calibration samples
    return backbones, calibration_sha, backend


def check_cache_root(path: Path) -> None:
    if problem := kind_problem(path, "folder"):
        hint = "; create it first (a build never creates the cache root)"
        raise InvalidRequestError(
            f"cache_root: {path} {problem}" + (hint if problem == "does not exist" else "")
        )


def signing_keys(key: Path, trust: Path) -> tuple[Signer, list[TrustedKey]]:
    """The signing key, and the trust store that must hold its public half."""
    trusted = load_trust_store(trust)
    signer = load_signer(key)
    check_trusted(signer, trusted, key, trust)
    return signer, trusted


def check_inputs(
    fields: dict[str, Any], problems: Problems, backend_name: str, work_dir: Path | None
) -> tuple[Any, ...] | None:
    """Check the files the fields name, each problem added to ``problems``.

    Fields a problem left undecided (or another step decides: ``prepare``'s
    corpus) are skipped. Returns ``(engine inputs, signing keys)`` when both are good.
    """
    if "cache_root" in fields:
        with problems.check():
            check_cache_root(fields["cache_root"])
    if "corpus" in fields:
        with problems.check():
            check_corpus(fields["corpus"])
    engines = keys = None
    if {"backbones", "precision", "calibration"} <= fields.keys():
        with problems.check():
            engines = engine_inputs(
                fields["backbones"],
                fields["precision"],
                fields["calibration"],
                backend_name,
                work_dir,
            )
    if {"key", "trust"} <= fields.keys():
        with problems.check():
            keys = signing_keys(fields["key"], fields["trust"])
    return (engines, keys) if engines is not None and keys is not None else None


def validate(
    raw: dict[str, Any], backend_name: str = "auto", work_dir: Path | None = None
) -> ValidatedRequest:
    """The request and every file it names, checked; all problems reported at once."""
    problems = Problems()
    fields = parse_fields(raw, problems, normalized_areas_dir(work_dir) if work_dir else None)
    # The files of the fields that parsed are checked too, so that one try names a bad
    # field and a missing key file alike (as prepare's precheck does).
    checked = check_inputs(fields, problems, backend_name, work_dir)
    problems.raise_any()
    assert checked is not None
    request = BuildRequest(**fields)
    (backbones, calibration_sha, backend), (signer, trusted) = checked
    return ValidatedRequest(
        request,
        backbones,
        calibration_sha,
        backend,
        backend.host_identity(),
        signer,
        tuple(trusted),
    )
