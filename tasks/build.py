"""One Prefect task per build phase; the bodies call the library and return small values.

This module holds the phases every run goes through, up to the no-op check,
and the ones after the index (manifest, coverage, commit, report). The
engines and descriptors phases live in :mod:`tasks.engines` and
:mod:`tasks.descriptors`, which the flow imports only when a build has work
to do: they pull in numpy, ONNX Runtime, Pillow and faiss, and a no-op
re-run needs none of them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.results import get_result_store
from prefect.transactions import get_transaction
from prefect.utilities.annotations import quote

from takeoff_cache import (
    __version__,
    commit,
    corpus,
    coverage,
    identity,
    noop,
    selection_cache,
    workdir,
)
from takeoff_cache import lock as lock_mod
from takeoff_cache import validate as validate_mod
from takeoff_cache.manifest import (
    Artifact,
    Manifest,
    compose_signed,
    new_lineage,
    sign_manifest,
)
from takeoff_cache.options import BuildOptions
from takeoff_cache.report import BuildReport
from takeoff_cache.validate import ValidatedRequest

if TYPE_CHECKING:  # the self-test's module pulls in numpy, Pillow and faiss
    from takeoff_cache_prefect.tasks.selftest import SelfTested


@task(name="validate", task_run_name="validate", cache_policy=NO_CACHE, persist_result=False)
def validate(raw: dict[str, Any], options: BuildOptions) -> ValidatedRequest:
    return validate_mod.validate(raw, options.backend, options.work_dir)


@task(name="lock", task_run_name="lock", cache_policy=NO_CACHE, persist_result=False)
def lock(validated: ValidatedRequest, run: ExitStack) -> None:
    """Hold the cache's lock until ``run`` ends."""
    run.enter_context(lock_mod.acquire(validated.request.cache_root))
    # A build killed mid-commit left staging behind; settle it before reading the cache.
    commit.recover(validated.request.cache_root, validated.trusted)


@task(name="staging", task_run_name="staging", cache_policy=NO_CACHE, persist_result=False)
def open_staging(validated: ValidatedRequest, run: ExitStack) -> Path:
    """A fresh staging folder in the cache root, settled when ``run`` ends."""
    return run.enter_context(commit.staging(validated.request.cache_root, validated.trusted))


def file_for_the_next_build(key: str, result: object) -> None:
    """File a cached task's ``result`` in Prefect's result store under ``key``: the
    cache key the next run will compute from the files this run has just written.

    Such a key holds the files' digests, so the run's own key was computed before
    they were written (None when they did not exist yet); without this, only the
    second run after them would find the result cached. Nothing is done when the
    run's own key is already ``key`` (Prefect files it when the run commits). The
    cache is only an accelerator: a store that refuses is no reason to fail a build.
    """
    transaction = get_transaction()
    if transaction is not None and transaction.key == key:
        return
    with contextlib.suppress(OSError):
        get_result_store().write(obj=result, key=key)


def untracked(selection: corpus.TileSelection) -> corpus.TileSelection:
    """The selection, passed to a task without Prefect walking each of its tiles.

    Prefect visits every element of a task's arguments (looking for upstream
    futures) twice per call: seconds for 50 000 tiles. ``quote`` is its
    documented way out; the task still receives the selection itself.
    """
    return cast(corpus.TileSelection, quote(selection))


@task(name="select", task_run_name="select", cache_policy=NO_CACHE, persist_result=False)
def select(validated: ValidatedRequest, work_dir: Path) -> corpus.TileSelection:
    req = validated.request
    return selection_cache.select_tiles_cached(
        req.corpus,
        req.bbox.as_tuple(),
        req.zoom_levels,
        workdir.selections_dir(work_dir),
        area=req.area,
    )


def no_tiles_reason(validated: ValidatedRequest) -> str:
    where = "bbox" if validated.request.area is None else "area"
    return (
        f"no tiles of the corpus intersect the {where} at zoom levels "
        f"{list(validated.request.zoom_levels)}: download tiles for this area first"
    )


@task(name="identity", task_run_name="identity", cache_policy=NO_CACHE, persist_result=False)
def build_identity(validated: ValidatedRequest, fingerprint: str) -> str:
    return identity.build_identity(validated, fingerprint)


@task(name="noop", task_run_name="noop", cache_policy=NO_CACHE, persist_result=False)
def noop_check(validated: ValidatedRequest, build_id: str) -> tuple[Manifest | None, bool]:
    root = validated.request.cache_root
    current = noop.current_manifest(root, validated.trusted)
    return current, noop.is_noop(root, current, build_id)


def artifact_key(prefix: str, cache_root: Path) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(cache_root).lower()).strip("-")
    return f"{prefix}-{slug}"[-100:].lstrip("-")


@task(name="manifest", task_run_name="manifest", cache_policy=NO_CACHE, persist_result=False)
def manifest(
    validated: ValidatedRequest,
    build_id: str,
    selection: corpus.TileSelection,
    described: list[Artifact],
    options: BuildOptions,
    tested: SelfTested,
) -> bytes:
    root = validated.request.cache_root
    now = datetime.now(UTC)
    expires_in_s = options.expires_in_s
    # The cache's lineage outlives every rebuild of it; only a first build (or one
    # over a manifest that no trusted key signed) starts a new one.
    current = noop.current_manifest(root, validated.trusted)
    signed = compose_signed(
        version=noop.previous_version(root) + 1,
        lineage=(current.lineage if current else None) or new_lineage(),
        created_at=now,
        expires_at=now + timedelta(seconds=expires_in_s) if expires_in_s else None,
        build_identity=build_id,
        request=validated.request.to_json(),
        host=validated.host,
        corpus_fingerprint=selection.fingerprint,
        tile_count=len(selection.tiles),
        artifacts=described,
        tool_version=__version__,
        self_test=tested.signed,
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
    staged: list[tuple[str, str]],
    previous: Manifest | None,
    new_paths: set[str],
) -> list[str]:
    return commit.commit(validated.request.cache_root, manifest_bytes, staged, previous, new_paths)


# A map above this is linked by its path only: the artifact lives in Prefect's database.
MAX_EMBEDDED_MAP = 2 * 1024 * 1024


def _embedded_map(path: str | None) -> str:
    """The coverage map inline, as a data: URI image: the Prefect UI renders markdown
    images but cannot fetch a file from the build machine's work folder."""
    if not path:
        return ""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return ""
    if len(data) > MAX_EMBEDDED_MAP:
        return f"\ncoverage map: `{path}`\n"
    return f"\n![coverage map](data:image/png;base64,{base64.b64encode(data).decode()})\n"


REPORT_BLOCK = re.compile(r"```json takeoff-cache-report\n(.*?)\n```", re.S)


def report_block(report: dict[str, Any]) -> str:
    """The report as JSON, fenced: what a caller on another machine reads back
    (``prepare --work-pool``), since a deployment run's result stays on its worker."""
    return f"\n```json takeoff-cache-report\n{json.dumps(report)}\n```\n"


def read_report_block(markdown: str) -> dict[str, Any] | None:
    match = REPORT_BLOCK.search(markdown)
    if match is None:
        return None
    data: dict[str, Any] = json.loads(match.group(1))
    return data


@task(name="report", task_run_name="report", cache_policy=NO_CACHE, persist_result=False)
def publish_report(report: BuildReport, cache_root: str) -> None:
    create_markdown_artifact(
        report.markdown() + _embedded_map(report.coverage_map) + report_block(report.to_json()),
        key=artifact_key("build-report", Path(cache_root)),
        description=f"takeoff-cache build report for {cache_root}",
    )
