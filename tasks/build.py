"""One Prefect task per build phase; the bodies call the library and return small values.

Cached tasks key on content (engine key, descriptor key), on the path of the
file a cached result names, and on that file's digest. While the file is
missing the key is None (run, cache nothing), so deleting or damaging a file
turns the next run into a cache miss, never into a cache that fails ``verify``.
"""

from __future__ import annotations

import contextvars
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.utilities.annotations import quote

from takeoff_cache import (
    __version__,
    artifacts,
    calibration,
    commit,
    corpus,
    coverage,
    descriptors,
    identity,
    noop,
    scaleout,
    selection_cache,
)
from takeoff_cache import lock as lock_mod
from takeoff_cache import validate as validate_mod
from takeoff_cache.backbones import Backbone, place_recognition
from takeoff_cache.canonical import content_key
from takeoff_cache.engines import get_backend
from takeoff_cache.engines.store import (
    EngineRecord,
    engine_file_name,
    engine_key,
    ensure_engine,
    lookup_engine,
)
from takeoff_cache.errors import BadTilesError
from takeoff_cache.fsutil import sha256_file
from takeoff_cache.manifest import Artifact, Manifest, compose_signed, sign_manifest
from takeoff_cache.report import BuildReport
from takeoff_cache.validate import ValidatedRequest
from tasks.scaleout import embed_on_dask


@task(name="validate", task_run_name="validate", cache_policy=NO_CACHE, persist_result=False)
def validate(raw: dict[str, Any], backend: str) -> ValidatedRequest:
    return validate_mod.validate(raw, backend)


@task(name="lock", task_run_name="lock", cache_policy=NO_CACHE, persist_result=False)
def lock(validated: ValidatedRequest) -> lock_mod.BuildLock:
    held = lock_mod.acquire(validated.request.cache_root)
    # A build killed mid-commit left staging behind; settle it before reading the cache.
    commit.recover(validated.request.cache_root, validated.trusted)
    return held


def untracked(selection: corpus.TileSelection) -> corpus.TileSelection:
    """The selection, passed to a task without Prefect walking each of its tiles.

    Prefect visits every element of a task's arguments (looking for upstream
    futures) twice per call: seconds for 50 000 tiles. ``quote`` is its
    documented way out; the task still receives the selection itself.
    """
    return cast(corpus.TileSelection, quote(selection))


@task(name="select", task_run_name="select", cache_policy=NO_CACHE, persist_result=False)
def select(validated: ValidatedRequest, work_dir: Path | None = None) -> corpus.TileSelection:
    req = validated.request
    if work_dir is None:
        return corpus.select_tiles(req.corpus, req.bbox.as_tuple(), req.zoom_levels)
    return selection_cache.select_tiles_cached(
        req.corpus, req.bbox.as_tuple(), req.zoom_levels, work_dir / "selections"
    )


@task(name="identity", task_run_name="identity", cache_policy=NO_CACHE, persist_result=False)
def build_identity(validated: ValidatedRequest, fingerprint: str) -> str:
    return identity.build_identity(validated, fingerprint)


@task(name="noop", task_run_name="noop", cache_policy=NO_CACHE, persist_result=False)
def noop_check(validated: ValidatedRequest, build_id: str) -> tuple[Manifest | None, bool]:
    root = validated.request.cache_root
    current = noop.current_manifest(root, validated.trusted)
    return current, noop.is_noop(root, current, build_id)


def _engine_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    backbone: Backbone = parameters["backbone"]
    backend = get_backend(parameters["backend_name"])
    key = engine_key(
        backbone,
        backend,
        backend.host_identity(),
        parameters["precision"],
        parameters["calibration_sha256"],
    )
    path = (
        Path(parameters["work_dir"])
        / "engines"
        / engine_file_name(backbone, backend, parameters["precision"], key)
    )
    found = lookup_engine(path, key)
    if found is None:
        # Nothing intact to point at: run, and cache nothing under a key that a
        # later deletion would make stale.
        return None
    # The result names the stored file, so its path is part of the key too.
    return content_key(["engine", key, str(path.resolve()), found[0]])


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
    return ensure_engine(
        backbone,
        get_backend(backend_name),
        precision,
        Path(calibration) if calibration else None,
        calibration_sha256,
        Path(work_dir),
    )


@task(name="engines", task_run_name="engines", cache_policy=NO_CACHE, persist_result=False)
def engines(
    validated: ValidatedRequest, work_dir: Path, staging: Path | None
) -> tuple[list[EngineRecord], list[Artifact], list[str]]:
    """Compile or reuse every backbone's engine; stage them when building a cache."""
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
    staged: list[str] = []
    described: list[Artifact] = []
    if staging is not None:
        for record in records:
            artifact = artifacts.engine_artifact(record)
            staged.append(artifacts.stage(Path(record.store_path), staging, artifact))
            described.append(artifact)
        if req.calibration is not None and validated.calibration_sha256:
            artifact = artifacts.calibration_artifact(req.calibration, validated.calibration_sha256)
            staged.append(artifacts.stage(req.calibration, staging, artifact, link=False))
            described.append(artifact)
    return records, described, staged


def _place_recognition(
    validated: ValidatedRequest, records: list[EngineRecord]
) -> tuple[Backbone, EngineRecord, str]:
    """The backbone whose descriptors are indexed, its engine, and their descriptor space."""
    backbone = place_recognition(validated.backbones)
    record = next(r for r in records if r.backbone == backbone.name)
    return backbone, record, descriptors.descriptor_space(record.key, backbone.input)


@task(name="int8-drift", task_run_name="int8-drift", cache_policy=NO_CACHE, persist_result=False)
def int8_drift(
    validated: ValidatedRequest, records: list[EngineRecord], work_dir: Path
) -> dict[str, float]:
    """How far the int8 place-recognition engine's descriptors are from fp32 ones."""
    req = validated.request
    if req.precision != "int8" or req.calibration is None:
        return {}
    backbone, record, _ = _place_recognition(validated, records)
    reference = compile_engine(
        backbone, validated.backend.name, "fp32", None, None, str(work_dir), return_state=True
    ).result()
    output = backbone.output or ""
    quantized = validated.backend.load(Path(record.store_path), backbone, output)
    original = validated.backend.load(Path(reference.store_path), backbone, output)
    samples = calibration.load_samples(req.calibration)
    return {
        backbone.name: round(
            calibration.mean_cosine(quantized.run, original.run, samples, backbone.input), 6
        )
    }


def _index_stem(backbone: str, desc_key: str) -> str:
    return f"{backbone}.{desc_key[:12]}"


def _index_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    desc_key = parameters["desc_key"]
    out = Path(parameters["work_dir"]) / "indexes"
    stem = _index_stem(parameters["backbone"].name, desc_key)
    files = [(out / f"{stem}.faiss").resolve(), (out / f"{stem}.tiles.json").resolve()]
    if not all(path.is_file() for path in files):
        return None
    digests = [sha256_file(path) for path in files]
    return content_key(["index", desc_key, [str(p) for p in files], digests])


class _Progress:
    """Terminal bar plus a Prefect progress artifact, updated at most twice a second.

    API calls go through one background thread (in this task's context, so the
    artifact belongs to its run): a rebuild that embeds a few tiles does not
    wait on the artifact's creation. ``close`` waits for the last update.
    """

    def __init__(self, key: str) -> None:
        self._api = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress")
        context = contextvars.copy_context()
        self._artifact: Future[UUID] = self._api.submit(context.run, self._create, key)
        self._context = context
        # Each update is an API round trip: none before half a second, none repeated.
        self._last = time.monotonic()
        self._sent = 0.0
        self._bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=0, unit="tile", desc="descriptors", file=sys.stderr)

    @staticmethod
    def _create(key: str) -> UUID:
        artifact_id = create_progress_artifact(0.0, key=key, description="descriptors computed")
        # Called from a synchronous task, so this is the id, not a coroutine.
        return cast(UUID, artifact_id)

    def _update(self, value: float) -> None:
        update_progress_artifact(self._artifact.result(), value)

    def __call__(self, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.total = total
            self._bar.n = done
            self._bar.refresh()
        now = time.monotonic()
        # The UI prints the value as is: one decimal reads as a percentage.
        value = round(100.0 * done / max(total, 1), 1)
        if value != self._sent and (done >= total or now - self._last >= 0.5):
            self._last = now
            self._sent = value
            self._api.submit(self._context.run, self._update, value)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._api.shutdown(wait=True)


def artifact_key(prefix: str, cache_root: Path) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(cache_root).lower()).strip("-")
    return f"{prefix}-{slug}"[-100:].lstrip("-")


@task(
    name="build-index",
    task_run_name="build-index",
    cache_key_fn=_index_cache_key,
    persist_result=True,
)
def build_index(
    validated: ValidatedRequest,
    selection: corpus.TileSelection,
    backbone: Backbone,
    record: EngineRecord,
    desc_key: str,
    work_dir: str,
) -> tuple[descriptors.IndexFiles, descriptors.EmbedResult]:
    req = validated.request
    store = descriptors.DescriptorStore(Path(work_dir) / "descriptors.sqlite")
    progress = _Progress(artifact_key("descriptors", req.cache_root))
    space = descriptors.descriptor_space(record.key, backbone.input)
    try:
        runner = validated.backend.load(Path(record.store_path), backbone, backbone.output or "")
        files, result = descriptors.embed_and_index(
            selection,
            req.corpus,
            runner.run,
            backbone.input,
            space,
            store,
            Path(work_dir) / "indexes",
            _index_stem(backbone.name, desc_key),
            streams=runner.streams,
            progress=progress,
        )
        if files is None:
            # Raised, not returned: Prefect never caches a failed run.
            raise BadTilesError(list(result.bad_tiles))
        return files, result
    finally:
        progress.close()
        store.close()


def spread_descriptors(
    validated: ValidatedRequest,
    selection: corpus.TileSelection,
    records: list[EngineRecord],
    work_dir: Path,
    dask_address: str,
) -> descriptors.EmbedResult:
    """Embed missing descriptors on a Dask cluster, ahead of the descriptors phase.

    Called from the flow, not from a task: chunk task runs carry their parent's
    context to the workers, and a task's context holds its arguments (the
    signing key among them), which must not, and cannot, travel.
    """
    req = validated.request
    backbone, record, space = _place_recognition(validated, records)
    engine = scaleout.EngineRef(record.store_path, record.sha256, validated.backend.name, backbone)
    store = descriptors.DescriptorStore(work_dir / "descriptors.sqlite")
    progress = _Progress(artifact_key("descriptors", req.cache_root))
    try:
        result = embed_on_dask(dask_address, selection, req.corpus, engine, space, store, progress)
    finally:
        progress.close()
        store.close()
    if result.bad_tiles:
        raise BadTilesError(list(result.bad_tiles))
    return result


@task(name="descriptors", task_run_name="descriptors", cache_policy=NO_CACHE, persist_result=False)
def descriptors_phase(
    validated: ValidatedRequest,
    selection: corpus.TileSelection,
    records: list[EngineRecord],
    work_dir: Path,
    staging: Path,
) -> tuple[descriptors.EmbedResult, list[Artifact], list[str]]:
    backbone, record, space = _place_recognition(validated, records)
    desc_key = descriptors.descriptor_key(space, selection.fingerprint)
    state = build_index(
        validated,
        untracked(selection),
        backbone,
        record,
        desc_key,
        str(work_dir),
        return_state=True,
    )
    files, result = state.result()
    if state.name == "Cached":
        result = descriptors.EmbedResult(0, len(selection.tiles), ())
    described = artifacts.index_artifacts(files, backbone.name, record.key, desc_key)
    staged = [
        artifacts.stage(Path(files.index_path), staging, described[0]),
        artifacts.stage(Path(files.map_path), staging, described[1]),
    ]
    return result, described, staged


@task(name="manifest", task_run_name="manifest", cache_policy=NO_CACHE, persist_result=False)
def manifest(
    validated: ValidatedRequest,
    build_id: str,
    selection: corpus.TileSelection,
    described: list[Artifact],
    expires_in_s: float | None,
) -> bytes:
    root = validated.request.cache_root
    now = datetime.now(UTC)
    signed = compose_signed(
        version=noop.previous_version(root) + 1,
        created_at=now,
        expires_at=now + timedelta(seconds=expires_in_s) if expires_in_s else None,
        build_identity=build_id,
        request=validated.request.to_json(),
        host=validated.host,
        corpus_fingerprint=selection.fingerprint,
        tile_count=len(selection.tiles),
        artifacts=described,
        tool_version=__version__,
    )
    return sign_manifest(signed, validated.signer)


@task(name="coverage", task_run_name="coverage", cache_policy=NO_CACHE, persist_result=False)
def coverage_check(
    validated: ValidatedRequest, new_paths: set[str], previous: Manifest | None, strict: bool
) -> list[str]:
    root = validated.request.cache_root
    old_paths = {a.path for a in previous.artifacts} if previous else set()
    offending = coverage.check_coverage(root, new_paths, old_paths)
    if strict:
        coverage.enforce(root, offending)
    return offending


@task(name="commit", task_run_name="commit", cache_policy=NO_CACHE, persist_result=False)
def commit_cache(
    validated: ValidatedRequest,
    manifest_bytes: bytes,
    staged: list[str],
    previous: Manifest | None,
    new_paths: set[str],
) -> list[str]:
    return commit.commit(validated.request.cache_root, manifest_bytes, staged, previous, new_paths)


@task(name="report", task_run_name="report", cache_policy=NO_CACHE, persist_result=False)
def publish_report(report: BuildReport, cache_root: str) -> None:
    create_markdown_artifact(
        report.markdown(),
        key=artifact_key("build-report", Path(cache_root)),
        description=f"takeoff-cache build report for {cache_root}",
    )
