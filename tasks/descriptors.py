"""The descriptors phase: embed what the store lacks, then write the index.

Imported by the flow only when a build has work to do (see :mod:`tasks.build`).
The phase's task is cached, keyed on the descriptor key, the index files'
paths and their digests (a missing or damaged file is a cache miss); a run
files its result under the key of the files it wrote, so the next build that
needs them finds it. Staging the files for the cache happens around the task,
in the flow, on every build.
"""

from __future__ import annotations

import contextlib
import contextvars
import sqlite3
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from takeoff_cache_prefect.tasks.engines import place_recognition_engine
from takeoff_cache_prefect.tasks.scaleout import embed_on_dask

from takeoff_cache.backbones.file import Backbone
from takeoff_cache.build import artifacts
from takeoff_cache.build.options import BuildOptions
from takeoff_cache.build.validate import ValidatedRequest
from takeoff_cache.core.canonical import content_key
from takeoff_cache.core.fsutil import sha256_file
from takeoff_cache.core.workdir import (
    index_files,
    indexes_dir,
    prune_indexes,
    store_path,
    touch_index,
)
from takeoff_cache.descriptors import decode, pipeline, scaleout
from takeoff_cache.descriptors.index import IndexFiles, descriptor_key
from takeoff_cache.descriptors.store import DescriptorStore, descriptor_space, prune_store
from takeoff_cache.engines.store import EngineRecord
from takeoff_cache.errors import BadTilesError, DescriptorError
from takeoff_cache.tiles import corpus
from takeoff_cache.trust.manifest import Artifact
from takeoff_cache_prefect.artifacts import artifact_key
from takeoff_cache_prefect.results import file_for_the_next_build, untracked


def _place_recognition(
    validated: ValidatedRequest, records: list[EngineRecord]
) -> tuple[Backbone, EngineRecord, str]:
    """The backbone whose descriptors are indexed, its engine, and their descriptor space."""
    backbone, record = place_recognition_engine(validated, records)
    return backbone, record, descriptor_space(record.key, backbone.image)


def _index_stem(backbone: str, desc_key: str) -> str:
    return f"{backbone}.{desc_key[:12]}"


def _index_paths(work_dir: str, backbone: Backbone, desc_key: str) -> list[Path]:
    stem = _index_stem(backbone.name, desc_key)
    return [p.resolve() for p in index_files(indexes_dir(Path(work_dir)), stem)]


def _index_key(desc_key: str, paths: list[Path], digests: list[str]) -> str:
    # The result names the files, so their paths and digests are part of the key:
    # a file changed or gone since is a cache miss.
    return content_key(["index", desc_key, [str(p) for p in paths], digests])


def _index_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    desc_key = parameters["desc_key"]
    paths = _index_paths(parameters["work_dir"], parameters["backbone"], desc_key)
    if not all(path.is_file() for path in paths):
        return None
    return _index_key(desc_key, paths, [sha256_file(path) for path in paths])


class _Progress:
    """Terminal bar plus a Prefect progress artifact, sent at most twice a second.

    The artifact is created at the first value sent: half a second into the
    phase, or, for a phase that ends sooner (a rebuild that embeds a few
    tiles), at its close, with its final value. One API call then, where
    creating it at 0% and updating it at the end took two, both beside the
    phase's own work. API calls go through one background thread (in this
    task's context, so the artifact belongs to its run): the phase never waits
    on one, nor, once ``close`` is called, on the last; :func:`settle_progress`
    waits for that.
    """

    every_s = 0.5  # between API calls: each is a round trip the server answers

    def __init__(self, key: str) -> None:
        self._api = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress")
        self._context = contextvars.copy_context()
        self._key = key
        self._artifact: Future[UUID] | None = None
        self._last = time.monotonic()
        self._value: float | None = None  # the latest value, sent or not
        self._sent: float | None = None
        self._bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=0, unit="tile", desc="descriptors", file=sys.stderr)

    @staticmethod
    def _create(key: str, value: float) -> UUID:
        artifact_id = create_progress_artifact(value, key=key, description="descriptors computed")
        # Called from a synchronous task, so this is the id, not a coroutine.
        return cast(UUID, artifact_id)

    def _update(self, value: float) -> None:
        assert self._artifact is not None
        update_progress_artifact(self._artifact.result(), value)

    def _send(self, value: float) -> None:
        self._last = time.monotonic()
        self._sent = value
        if self._artifact is None:
            self._artifact = self._api.submit(self._context.run, self._create, self._key, value)
        else:
            self._api.submit(self._context.run, self._update, value)

    def __call__(self, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.total = total
            self._bar.n = done
            self._bar.refresh()
        # The UI prints the value as is: one decimal reads as a percentage.
        self._value = round(100.0 * done / max(total, 1), 1)
        # The end goes at once to an artifact the UI already shows: writing the
        # index can take seconds more before ``close``.
        due = time.monotonic() - self._last >= self.every_s
        if self._value != self._sent and (due or (done >= total and self._artifact is not None)):
            self._send(self._value)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._value is not None and self._value != self._sent:
            self._send(self._value)
        # The last call completes while the build goes on, and the flow settles it:
        # waiting for it here had the phase wait on a server that, on a small host,
        # is busy recording the run's task runs.
        self._api.shutdown(wait=False)
        _unsettled.append(self._api)


_unsettled: list[ThreadPoolExecutor] = []


def settle_progress() -> None:
    """Wait until every closed progress artifact has its last update (or has failed:
    a lost UI update must not change a build's outcome)."""
    while _unsettled:
        _unsettled.pop().shutdown(wait=True)


# One task for the whole phase: a nested task for the index would add a task
# run's API round trips to every rebuild.
@task(
    name="descriptors",
    task_run_name="descriptors",
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
) -> tuple[IndexFiles, pipeline.EmbedResult]:
    req = validated.request
    store = DescriptorStore(store_path(Path(work_dir)))
    progress = _Progress(artifact_key("descriptors", req.cache_root))
    space = descriptor_space(record.key, backbone.image)
    try:
        runner = validated.backend.load(Path(record.store_path), backbone, backbone.output or "")
        files, result = pipeline.embed_and_index(
            selection,
            req.corpus,
            runner.run,
            backbone.image,
            space,
            store,
            indexes_dir(Path(work_dir)),
            _index_stem(backbone.name, desc_key),
            streams=runner.streams,
            workers=decode.decode_workers(runner.on_accelerator),
            progress=progress,
        )
        if files is None:
            # Raised, not returned: Prefect never caches a failed run.
            raise BadTilesError(list(result.bad_tiles), result.generated, result.reused)
        digests = [files.index_sha256, files.map_sha256]
        paths = _index_paths(work_dir, backbone, desc_key)
        file_for_the_next_build(_index_key(desc_key, paths, digests), (files, result))
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
) -> pipeline.EmbedResult:
    """Embed missing descriptors on a Dask cluster, ahead of the descriptors phase.

    Called outside any task (by :func:`descriptors`): chunk task runs carry their parent's
    context to the workers, and a task's context holds its arguments (the
    signing key among them), which must not, and cannot, travel.
    """
    req = validated.request
    backbone, record, space = _place_recognition(validated, records)
    engine = scaleout.EngineRef(record.store_path, record.sha256, validated.backend.name, backbone)
    store = DescriptorStore(store_path(work_dir))
    progress = _Progress(artifact_key("descriptors", req.cache_root))
    try:
        result = embed_on_dask(dask_address, selection, req.corpus, engine, space, store, progress)
    finally:
        progress.close()
        store.close()
    if result.bad_tiles:
        raise BadTilesError(list(result.bad_tiles), result.generated, result.reused)
    return result


def _mark_space_used(work_dir: Path, space: str) -> None:
    with contextlib.suppress(DescriptorError, sqlite3.Error, OSError):
        store = DescriptorStore(store_path(work_dir))
        try:
            store.mark_used(space)
        finally:
            store.close()


def prune_work_folder(work_dir: Path) -> None:
    """After a successful build: old indexes and unused descriptor spaces go.

    Both are only accelerators, so a disk or store that refuses is no reason
    to fail a build that has already committed.
    """
    with contextlib.suppress(OSError):
        prune_indexes(work_dir)
    with contextlib.suppress(DescriptorError, OSError):
        prune_store(store_path(work_dir))


def descriptors(
    validated: ValidatedRequest,
    selection: corpus.TileSelection,
    records: list[EngineRecord],
    options: BuildOptions,
    staging: Path,
) -> tuple[int, list[Artifact], list[tuple[str, str]]]:
    """The descriptors phase: embed (on a Dask cluster when one is named) what the
    store lacks, run or take from Prefect's cache the index task.

    Returns how many descriptors were computed, the index's artifacts, and the
    files the commit copies into the cache (cache path, work-folder file).
    """
    work_dir = options.work_dir
    spread = None
    if options.dask_address:
        spread = spread_descriptors(validated, selection, records, work_dir, options.dask_address)
    backbone, record, space = _place_recognition(validated, records)
    desc_key = descriptor_key(space, selection.fingerprint)
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
        result = pipeline.EmbedResult(0, len(selection.tiles), ())
        # Used again: the work folder's pruning keeps the most recently used indexes
        # and descriptor spaces.
        with contextlib.suppress(OSError):
            touch_index(Path(files.index_path), Path(files.map_path))
        _mark_space_used(work_dir, space)
    described = artifacts.index_artifacts(files, backbone.name, record.key, desc_key)
    staged = [(described[0].path, files.index_path), (described[1].path, files.map_path)]
    # Descriptors embedded on the cluster were found stored by the index task.
    generated = result.generated + (spread.generated if spread else 0)
    return generated, described, staged
