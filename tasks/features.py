"""The features phase: every selected tile's local features, into the cache as one file.

Runs after the descriptors phase. The extractor is the ``local_features``
backbone's engine (compiled by the engines phase) when the backbones file has
one, else OpenCV's SIFT; the ``matcher`` backbone, where there is one, is
recorded beside them (the features artifact's ``matcher``), so that ``locate``
and the self-test match views with it. Tiles whose features the work folder's feature store
already holds for that extractor are not read at all; the features file is
written from the store into the work folder and copied into the cache by the
commit, like the index. Imported by the flow only when a build has work to do.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from takeoff_cache.backbones.file import LOCAL_FEATURES, matcher
from takeoff_cache.backbones.spec import MatcherInput
from takeoff_cache.build import artifacts
from takeoff_cache.build.validate import ValidatedRequest
from takeoff_cache.core.workdir import (
    features_dir,
    features_store_path,
    prune_features,
    registered_views_dir,
)
from takeoff_cache.engines.base import Runner
from takeoff_cache.engines.store import EngineRecord
from takeoff_cache.errors import BadTilesError, DescriptorError
from takeoff_cache.features.extract import Extractor, NetworkExtractor, SiftExtractor
from takeoff_cache.features.match import Matcher
from takeoff_cache.features.pipeline import extract_and_write, features_key
from takeoff_cache.features.store import FeatureStore, prune_feature_store
from takeoff_cache.localize.registered import prune_registered
from takeoff_cache.tiles import corpus
from takeoff_cache.trust.manifest import Artifact


@dataclass(frozen=True)
class FeaturesBuilt:
    """What the phase hands on: counts for the report, the artifact, the file to stage."""

    generated: int
    reused: int
    artifact: Artifact
    staged: tuple[str, str]  # (cache path, work-folder file)
    work_file: str

    @property
    def bytes_per_tile(self) -> int:
        count = int(self.artifact.fields["count"])
        return round(self.artifact.size / count) if count else 0


def extractor_for(validated: ValidatedRequest, records: list[EngineRecord]) -> Extractor:
    """The request's ``local_features`` backbone as an extractor, else SIFT."""
    found = [b for b in validated.backbones if b.role == LOCAL_FEATURES]
    if not found:
        return SiftExtractor()
    backbone = found[0]
    record = next(r for r in records if r.backbone == backbone.name)

    def load(output: str) -> Runner:
        return validated.backend.load(Path(record.store_path), backbone, output)

    return NetworkExtractor(load, backbone.image, record.key, backbone.name)


def matcher_for(validated: ValidatedRequest, records: list[EngineRecord]) -> Matcher | None:
    """The request's ``matcher`` backbone, on its engine; None without one."""
    backbone = matcher(validated.backbones)
    if backbone is None:
        return None
    spec, output = backbone.input, backbone.output or ""
    if not isinstance(spec, MatcherInput):
        raise DescriptorError(f"backbone {backbone.name!r}: a matcher without a matcher's inputs")
    found = backbone
    record = next(r for r in records if r.backbone == found.name)

    def load() -> Runner:
        return validated.backend.load(Path(record.store_path), found, output)

    return Matcher(load, spec, output, record.key, found.name)


@task(name="features", task_run_name="features", cache_policy=NO_CACHE, persist_result=False)
def features(
    validated: ValidatedRequest,
    selection: corpus.TileSelection,
    records: list[EngineRecord],
    work_dir: Path,
) -> FeaturesBuilt:
    extractor = extractor_for(validated, records)
    store = FeatureStore(features_store_path(work_dir))
    try:
        name = getattr(extractor, "backbone", "sift")
        files, result = extract_and_write(
            selection, validated.request.corpus, extractor, store, features_dir(work_dir), name
        )
        store.mark_used(extractor.space)  # so that pruning keeps it (prune_features_folder)
    except sqlite3.Error as exc:
        raise DescriptorError(f"feature store: {exc}") from exc
    finally:
        store.close()
    if files is None:
        raise BadTilesError(list(result.bad_tiles), result.generated, result.reused)
    key = features_key(extractor.space, selection.fingerprint)
    paired = matcher_for(validated, records)
    artifact = artifacts.features_artifact(
        files, extractor.identity(), key, paired.identity() if paired is not None else None
    )
    return FeaturesBuilt(
        result.generated, result.reused, artifact, (artifact.path, files.path), files.path
    )


def prune_features_folder(work_dir: Path) -> None:
    """After a successful build: old features files, the features of extractors no
    build uses any more and old registered views go (only accelerators; a disk or
    store that refuses is no reason to fail a build that has committed)."""
    with contextlib.suppress(OSError):
        prune_features(work_dir)
    with contextlib.suppress(DescriptorError, OSError):
        prune_feature_store(features_store_path(work_dir))
    with contextlib.suppress(OSError):
        prune_registered(registered_views_dir(work_dir))


def report_figures(built: FeaturesBuilt) -> dict[str, Any]:
    """The build report's ``local_features``: what was extracted, reused, and its size,
    and the matcher (its backbone's name; None: mutual nearest neighbours)."""
    fields = built.artifact.fields
    return {
        "extractor": fields["extractor"]["extractor"],
        "matcher": (fields.get("matcher") or {}).get("backbone"),
        "generated": built.generated,
        "reused": built.reused,
        "keypoints": fields["keypoints"],
        "max_keypoints": fields["max_keypoints"],
        "bytes": built.artifact.size,
        "bytes_per_tile": built.bytes_per_tile,
    }
