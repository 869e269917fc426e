"""Pruning the work folder's indexes: most recently used kept, nothing young removed."""

from __future__ import annotations

import os
import time
from pathlib import Path

from takeoff_cache.core.workdir import prune_indexes, touch_index

NOW = time.time()
HOUR = 3600.0


def index(work: Path, stem: str, age_s: float) -> None:
    folder = work / "indexes"
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".faiss", ".tiles.json"):
        path = folder / f"{stem}{suffix}"
        path.write_bytes(b"x")
        os.utime(path, (NOW - age_s, NOW - age_s))


def stems(work: Path) -> set[str]:
    names = [p.name for p in (work / "indexes").iterdir()]
    assert all(n.endswith((".faiss", ".tiles.json")) for n in names if not n.startswith("."))
    return {n.removesuffix(".faiss") for n in names if n.endswith(".faiss")}


def test_keeps_the_most_recently_used_and_removes_both_files_of_the_rest(tmp_path: Path) -> None:
    for i in range(7):
        index(tmp_path, f"vpr.{i}", age_s=(i + 2) * HOUR)
    removed = prune_indexes(tmp_path, keep=4, now=NOW)
    assert stems(tmp_path) == {"vpr.0", "vpr.1", "vpr.2", "vpr.3"}
    assert sorted(p.name for p in removed) == sorted(
        f"vpr.{i}{s}" for i in (4, 5, 6) for s in (".faiss", ".tiles.json")
    )
    assert not any(p.name.startswith("vpr.4") for p in (tmp_path / "indexes").iterdir())


def test_nothing_young_is_removed_even_beyond_the_count(tmp_path: Path) -> None:
    # Another cache's build may have just written one and not yet linked it.
    for i in range(6):
        index(tmp_path, f"vpr.{i}", age_s=i * 60.0)
    assert prune_indexes(tmp_path, keep=2, now=NOW) == []
    assert len(stems(tmp_path)) == 6


def test_an_index_used_again_counts_as_recent(tmp_path: Path) -> None:
    for i in range(3):
        index(tmp_path, f"vpr.{i}", age_s=(i + 2) * HOUR)
    folder = tmp_path / "indexes"
    touch_index(folder / "vpr.2.faiss", folder / "vpr.2.tiles.json")
    prune_indexes(tmp_path, keep=1, now=NOW + 2 * HOUR)  # it is then 2 h old, the rest 4+ h
    assert stems(tmp_path) == {"vpr.2"}


def test_temporary_files_of_killed_writes_go_once_stale(tmp_path: Path) -> None:
    index(tmp_path, "vpr.0", age_s=0)
    folder = tmp_path / "indexes"
    stale, fresh = folder / ".vpr.9.faiss.tmp-4242", folder / ".vpr.8.tiles.json.tmp-4343"
    for path, age in ((stale, 2 * HOUR), (fresh, 60.0)):
        path.write_bytes(b"partial")
        os.utime(path, (NOW - age, NOW - age))
    assert prune_indexes(tmp_path, now=NOW) == [stale]
    assert fresh.exists() and stems(tmp_path) == {"vpr.0"}


def test_a_work_folder_without_indexes_is_left_alone(tmp_path: Path) -> None:
    assert prune_indexes(tmp_path / "never-built", now=NOW) == []
