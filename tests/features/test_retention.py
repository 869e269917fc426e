"""The work folder forgets what no build uses: features of retired extractors, and
registered self-test views not used for a week."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import numpy as np

from takeoff_cache.core.spaces import KEEP_SPACES, SPACE_IDLE_S
from takeoff_cache.features.extract import Features
from takeoff_cache.features.store import FeatureStore, prune_feature_store
from takeoff_cache.localize.registered import prune_registered

SHA = "ab" * 32


def some_features() -> Features:
    kp = np.array([[0.25, 0.5]], dtype=np.float32)
    return Features(kp, np.array([0.9], dtype=np.float32), np.ones((1, 32), dtype=np.int8))


def spaces_of(path: Path) -> dict[str, int]:
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT space, COUNT(*) FROM features GROUP BY space").fetchall())
    finally:
        db.close()


def test_features_of_extractors_unused_for_a_week_go_beyond_the_most_recent(
    tmp_path: Path,
) -> None:
    path = tmp_path / "features.sqlite"
    store = FeatureStore(path)
    try:
        now = time.time()
        retired = [f"retired-{i}" for i in range(KEEP_SPACES + 1)]
        for i, space in enumerate(retired):
            store.put(space, [SHA], [some_features()])
            store.mark_used(space, now - SPACE_IDLE_S - 60 - i)
        store.put("in use", [SHA], [some_features()])
        store.mark_used("in use", now)
        store.put("undated", [SHA], [some_features()])  # a store older than the dating
    finally:
        store.close()
    gone = prune_feature_store(path)
    # Kept: the KEEP_SPACES most recently used (two of them in use), then what is recent.
    kept = {"in use", "undated", *retired[: KEEP_SPACES - 2]}
    assert set(gone) == set(retired) - kept
    assert spaces_of(path) == {space: 1 for space in kept}
    assert prune_feature_store(tmp_path / "none.sqlite") == []


def test_registered_views_unused_for_a_week_go(tmp_path: Path) -> None:
    folder = tmp_path / "registered-views"
    folder.mkdir()
    old, recent = folder / "old.json", folder / "recent.json"
    for entry in (old, recent):
        entry.write_text("{}")
    week_ago = time.time() - SPACE_IDLE_S - 60
    os.utime(old, (week_ago, week_ago))
    assert prune_registered(folder) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["recent.json"]
    assert prune_registered(tmp_path / "missing") == 0
