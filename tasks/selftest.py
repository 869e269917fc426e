"""The self-test phase: does the new index find drone-like views of its own tiles?

Runs after the descriptors phase, on the index files it wrote to the work
folder (the staged copies are byte for byte the same) and the
place-recognition engine already compiled, before anything is signed: a
Recall@1 below ``--min-recall`` ends the build with the previous cache in
force. Imported by the flow only when a build has work to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from takeoff_cache_prefect.tasks.engines import place_recognition_engine
from takeoff_cache_prefect.tasks.features import extractor_for, matcher_for

from takeoff_cache.build.options import BuildOptions
from takeoff_cache.build.validate import ValidatedRequest
from takeoff_cache.core.workdir import indexes_dir, maps_dir, registered_views_dir, store_path
from takeoff_cache.descriptors.decode import decode_workers
from takeoff_cache.descriptors.index import read_index
from takeoff_cache.descriptors.store import DescriptorStore, descriptor_space
from takeoff_cache.engines.store import EngineRecord
from takeoff_cache.errors import DescriptorError
from takeoff_cache.features.artifact import FeatureSet
from takeoff_cache.localize.coverage_map import missing_tiles, short_path, write_coverage_map
from takeoff_cache.localize.locate import Localizer, read_tile_map
from takeoff_cache.localize.registered import evaluate_registered, self_test_views
from takeoff_cache.localize.selftest import (
    SelfTestResult,
    ViewReuse,
    min_recall,
    run_self_test,
    weakest_text,
)
from takeoff_cache.tiles import corpus
from takeoff_cache.trust.manifest import Artifact
from takeoff_cache_prefect.results import untracked


@dataclass(frozen=True)
class SelfTested:
    """What the phase hands on: figures for the report and for the manifest, the map."""

    summary: dict[str, Any] | None = None  # the report's figures, with the phase's seconds
    signed: dict[str, Any] | None = None  # the manifest's, with every query
    coverage_map: str | None = None
    failure_reason: str | None = None


SKIPPED = SelfTested()


def map_path(work_dir: Path, cache_root: Path) -> Path:
    """The cache's coverage map in the work folder: one per cache root, redrawn by each build."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(cache_root)).strip("-.") or "cache"
    folder = maps_dir(work_dir)
    folder.mkdir(exist_ok=True)
    return folder / f"{slug[-120:]}.png"


def _localizer(
    validated: ValidatedRequest, records: list[EngineRecord], index: Artifact, work_dir: Path
) -> tuple[Localizer, str]:
    """The new index's localizer, and its engine's descriptor space."""
    backbone, record = place_recognition_engine(validated, records)
    runner = validated.backend.load(Path(record.store_path), backbone, backbone.output or "")
    # The cache's index files are copies of these, under the same names.
    folder = indexes_dir(work_dir)
    try:
        faiss_index = read_index(folder / PurePosixPath(index.path).name)
    except RuntimeError as exc:  # faiss reports unreadable files as RuntimeError
        raise DescriptorError(f"self-test: index {index.path} cannot be read: {exc}") from exc
    tiles = read_tile_map(folder / PurePosixPath(str(index.fields["tile_map"])).name)
    space = descriptor_space(record.key, backbone.image)
    return Localizer(runner, backbone.image, faiss_index, tiles), space


def _draw(
    validated: ValidatedRequest,
    selection: corpus.TileSelection,
    result: SelfTestResult,
    path: Path,
) -> Path:
    req = validated.request
    bbox = req.bbox.as_tuple()
    tiles = [(t.z, t.x, t.y) for t in selection.tiles]
    subtitle = (
        f"self-test: Recall@1 {result.recall_at_1:.2f}, Recall@5 {result.recall_at_5:.2f},"
        f" median error {result.median_error_m:.0f} m over {result.k} views"
    )
    weakest = weakest_text(result.route) if result.route is not None else None
    if weakest is not None:
        subtitle += f" along the route; weakest {weakest}"
    return write_coverage_map(
        path,
        bbox=bbox,
        tiles=tiles,
        missing=missing_tiles(bbox, req.zoom_levels, tiles, area=req.area),
        area=req.area,
        queries=result.queries,
        title=f"takeoff cache at {short_path(req.cache_root)}",
        subtitle=subtitle,
    )


def self_test(
    validated: ValidatedRequest,
    selection: corpus.TileSelection,
    records: list[EngineRecord],
    index_described: list[Artifact],
    options: BuildOptions,
    build_id: str,
    features_file: str | None = None,
) -> SelfTested:
    """The phase: skipped, with no task run, under ``--self-test 0``. ``features_file``:
    the features phase's file in the work folder, on which the views are registered."""
    if not options.self_test:
        return SKIPPED
    return self_test_task(
        validated, untracked(selection), records, index_described, options, build_id, features_file
    )


@task(name="self_test", task_run_name="self_test", cache_policy=NO_CACHE, persist_result=False)
def self_test_task(
    validated: ValidatedRequest,
    selection: corpus.TileSelection,
    records: list[EngineRecord],
    index_described: list[Artifact],
    options: BuildOptions,
    build_id: str,
    features_file: str | None = None,
) -> SelfTested:
    """Query ``options.self_test`` views of the new index, along the request's route when
    it has one, seeded by the index's tiles and the route (so one build identity draws
    the same views, and a rebuild reuses the embeddings of views whose tiles did not
    change); draw the coverage map into the work folder."""
    index = next(a for a in index_described if a.kind == "faiss_index")
    localizer, space = _localizer(validated, records, index, options.work_dir)
    store = DescriptorStore(store_path(options.work_dir))
    try:
        shas = {(t.z, t.x, t.y): t.sha256 for t in selection.tiles}
        reuse = ViewReuse(store, space, shas)
        result = run_self_test(
            localizer,
            validated.request.corpus,
            k=options.self_test,
            route=validated.request.route,
            workers=decode_workers(localizer.runner.on_accelerator),
            reuse=reuse,
        )
        registered = None
        if features_file is not None:
            registered = _registered(validated, records, localizer, options, features_file, reuse)
    finally:
        store.close()
    drawn = _draw(
        validated, selection, result, map_path(options.work_dir, validated.request.cache_root)
    )
    reason = min_recall(result, options.min_recall) if options.min_recall is not None else None
    summary, signed = result.summary(), result.signed()
    if registered is not None:
        summary["registered"] = registered
        signed["registered"] = {
            k: v for k, v in registered.items() if k not in ("seconds", "views_reused")
        }
    return SelfTested(summary, signed, str(drawn), reason)


def _registered(
    validated: ValidatedRequest,
    records: list[EngineRecord],
    localizer: Localizer,
    options: BuildOptions,
    features_file: str,
    reuse: ViewReuse,
) -> dict[str, Any]:
    """The self-test's views registered on the new features file (localize/registered.py),
    those whose outcome cannot have changed taken from the work folder."""
    views = self_test_views(localizer, options.self_test, validated.request.route)
    result = evaluate_registered(
        localizer,
        validated.request.corpus,
        views,
        extractor_for(validated, records),
        FeatureSet(Path(features_file)),
        workers=decode_workers(localizer.runner.on_accelerator),
        reuse=reuse,
        remembered=registered_views_dir(options.work_dir),
        matcher=matcher_for(validated, records),
    )
    return result.summary()
