"""What goes into a cache root: engines and index files, copied from the work folder.

Artifact names carry their content key, so a path names one content: a file
already in the cache under the same name is the same artifact, and a changed
input always yields a new name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from takeoff_cache.descriptors.index import METRIC, IndexFiles
from takeoff_cache.engines.store import EngineRecord
from takeoff_cache.features.artifact import FeaturesFile
from takeoff_cache.features.extract import MAX_KEYPOINTS
from takeoff_cache.trust.manifest import Artifact

ENGINES_DIR = "engines"
INDEX_DIR = "index"
FEATURES_DIR = "features"


def engine_artifact(record: EngineRecord) -> Artifact:
    return Artifact(
        f"{ENGINES_DIR}/{record.file_name}",
        "engine",
        record.size,
        record.sha256,
        {
            "backbone": record.backbone,
            "role": record.role,
            "backend": record.backend,
            "precision": record.precision,
            "engine_key": record.key,
        },
    )


def index_artifacts(
    files: IndexFiles, backbone: str, engine_key: str, descriptor_key: str
) -> list[Artifact]:
    index = Path(files.index_path)
    tile_map = Path(files.map_path)
    return [
        Artifact(
            f"{INDEX_DIR}/{index.name}",
            "faiss_index",
            index.stat().st_size,
            files.index_sha256,
            {
                "backbone": backbone,
                "engine_key": engine_key,
                "descriptor_key": descriptor_key,
                "index_type": files.index_type,
                "dimension": files.dimension,
                "count": files.count,
                "metric": METRIC,
                "tile_map": f"{INDEX_DIR}/{tile_map.name}",
                # Exact search for "Flat"; else measured on held-out queries at this nprobe.
                "recall_at_1": files.recall_at_1,
                "recall_queries": files.recall_queries,
                **({"nprobe": files.nprobe} if files.nprobe is not None else {}),
            },
        ),
        Artifact(
            f"{INDEX_DIR}/{tile_map.name}",
            "tile_map",
            tile_map.stat().st_size,
            files.map_sha256,
            {"count": files.count, "columns": ["z", "x", "y"]},
        ),
    ]


def calibration_artifact(path: Path, sha256: str) -> Artifact:
    return Artifact(
        f"calibration/{sha256[:12]}.{path.name}", "calibration", path.stat().st_size, sha256, {}
    )


def features_artifact(
    files: FeaturesFile, extractor: dict[str, Any], key: str, matcher: dict[str, Any] | None = None
) -> Artifact:
    """The cache's features file: every selected tile's local features (features/), and
    the ``matcher`` that pairs them with a view's, where the backbones name one."""
    path = Path(files.path)
    fields: dict[str, Any] = {
        "extractor": extractor,
        "features_key": key,
        "count": files.tiles,
        "keypoints": files.keypoints,
        "max_keypoints": MAX_KEYPOINTS,
        "descriptor_bytes": files.dimension,
    }
    if matcher is not None:
        fields["matcher"] = matcher
    return Artifact(
        f"{FEATURES_DIR}/{path.name}", "local_features", files.size, files.sha256, fields
    )
