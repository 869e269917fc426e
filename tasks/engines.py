"""The engines phase: compile or reuse every backbone's engine for this host.

Imported by the flow only when a build has work to do (see :mod:`tasks.build`).
Compiled engines are cached tasks keyed on the engine key, the stored file's
path and its digest: while the file is missing the key is None (run, cache
nothing), so deleting or damaging an engine turns the next run into a cache
miss, never into a cache that fails ``verify``. A run files its record under
the key of the engine it stored, so the next build finds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from takeoff_cache.backbones.file import Backbone, place_recognition
from takeoff_cache.build import artifacts
from takeoff_cache.build.validate import ValidatedRequest
from takeoff_cache.core import workdir
from takeoff_cache.core.canonical import content_key
from takeoff_cache.engines import calibration, get_backend
from takeoff_cache.engines.base import built_as
from takeoff_cache.engines.store import (
    EngineRecord,
    engine_file_name,
    engine_key,
    ensure_engine,
    lookup_engine,
)
from takeoff_cache.trust.manifest import Artifact
from takeoff_cache_prefect.results import file_for_the_next_build


def _engine_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    backbone: Backbone = parameters["backbone"]
    backend = get_backend(parameters["backend_name"])
    precision, calibration_sha256 = built_as(
        backbone, parameters["precision"], parameters["calibration_sha256"]
    )
    key = engine_key(backbone, backend, backend.host_identity(), precision, calibration_sha256)
    path = workdir.engines_dir(Path(parameters["work_dir"])) / engine_file_name(
        backbone, backend, precision, key
    )
    found = lookup_engine(path, key)
    if found is None:
        # Nothing intact to point at: run, and cache nothing under a key that a
        # later deletion would make stale.
        return None
    return _engine_result_key(key, path, found[0])


def _engine_result_key(key: str, path: Path, sha256: str) -> str:
    # The result names the stored file, so its path is part of the key too.
    return content_key(["engine", key, str(path.resolve()), sha256])


@task(
    name="compile-engine",
    cache_key_fn=_engine_cache_key,
    persist_result=True,
    task_run_name="compile-engine-{backbone.name}",
)
def compile_engine(
    backbone: Backbone,
    backend_name: str,
    precision: str,
    calibration: str | None,
    calibration_sha256: str | None,
    work_dir: str,
) -> EngineRecord:
    record = ensure_engine(
        backbone,
        get_backend(backend_name),
        precision,
        Path(calibration) if calibration else None,
        calibration_sha256,
        Path(work_dir),
    )
    # The next build's key is computed from the stored engine: it finds this record.
    key = _engine_result_key(record.key, Path(record.store_path), record.sha256)
    file_for_the_next_build(key, record)
    return record


@task(name="engines", task_run_name="engines", cache_policy=NO_CACHE, persist_result=False)
def engines(
    validated: ValidatedRequest, work_dir: Path, staging: Path | None
) -> tuple[list[EngineRecord], list[Artifact], list[tuple[str, str]]]:
    """Compile or reuse every backbone's engine; when building a cache, describe them
    and name the files the commit copies into it (cache path, source)."""
    req = validated.request
    records: list[EngineRecord] = []
    for backbone in validated.backbones:
        state = compile_engine(
            backbone,
            validated.backend.name,
            req.precision,
            str(req.calibration) if req.calibration else None,
            validated.calibration_sha256,
            str(work_dir),
            return_state=True,
        )
        record: EngineRecord = state.result()
        if state.name == "Cached":
            record = EngineRecord(**{**record.__dict__, "built": False})
        records.append(record)
    staged: list[tuple[str, str]] = []
    described: list[Artifact] = []
    if staging is not None:
        for record in records:
            artifact = artifacts.engine_artifact(record)
            staged.append((artifact.path, record.store_path))
            described.append(artifact)
        if req.calibration is not None and validated.calibration_sha256:
            artifact = artifacts.calibration_artifact(req.calibration, validated.calibration_sha256)
            staged.append((artifact.path, str(req.calibration)))
            described.append(artifact)
    return records, described, staged


def place_recognition_engine(
    validated: ValidatedRequest, records: list[EngineRecord]
) -> tuple[Backbone, EngineRecord]:
    """The backbone whose descriptors are indexed, and its engine."""
    backbone = place_recognition(validated.backbones)
    return backbone, next(r for r in records if r.backbone == backbone.name)


@task(name="int8-drift", task_run_name="int8-drift", cache_policy=NO_CACHE, persist_result=False)
def int8_drift(
    validated: ValidatedRequest, records: list[EngineRecord], work_dir: Path
) -> dict[str, float]:
    """How far the int8 place-recognition engine's descriptors are from fp32 ones."""
    req = validated.request
    if req.precision != "int8" or req.calibration is None:
        return {}
    backbone, record = place_recognition_engine(validated, records)
    reference = compile_engine(
        backbone, validated.backend.name, "fp32", None, None, str(work_dir), return_state=True
    ).result()
    output = backbone.output or ""
    quantized = validated.backend.load(Path(record.store_path), backbone, output)
    original = validated.backend.load(Path(reference.store_path), backbone, output)
    samples = calibration.load_samples(req.calibration)
    return {
        backbone.name: round(
            calibration.mean_cosine(quantized.run, original.run, samples, backbone.image), 6
        )
    }
