"""Coverage: every file in the cache root must be listed; the walk that finds them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from takeoff_cache.build.coverage import check_coverage, enforce
from takeoff_cache.core.layout import LOCK_NAME, MANIFEST_NAME, STAGING_NAME, walk_cache
from takeoff_cache.errors import CoverageError

NEW = {"engines/vpr.new.onnx", "index/vpr.new.faiss"}
OLD = {"engines/vpr.new.onnx", "index/vpr.old.faiss"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    for rel in NEW | OLD:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    (root / MANIFEST_NAME).write_text("{}")
    return root


def test_a_covered_cache_has_no_offending_paths(root: Path) -> None:
    assert check_coverage(root, NEW, OLD) == []
    enforce(root, [])


def test_files_listed_only_in_the_old_manifest_are_not_reported(root: Path) -> None:
    assert check_coverage(root, NEW, set()) == ["index/vpr.old.faiss"]
    assert check_coverage(root, NEW, OLD) == []


def test_an_unknown_file_is_reported(root: Path) -> None:
    (root / "index" / "stray.faiss").write_bytes(b"x")
    (root / "top.bin").write_bytes(b"x")
    assert check_coverage(root, NEW, OLD) == ["index/stray.faiss", "top.bin"]


def test_an_unknown_file_in_a_new_folder_is_reported_with_its_posix_path(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "c.bin").write_bytes(b"x")
    assert check_coverage(root, NEW, OLD) == ["a/b/c.bin"]


def test_empty_folders_are_not_reported(root: Path) -> None:
    (root / "empty" / "deeper").mkdir(parents=True)
    assert check_coverage(root, NEW, OLD) == []


def test_a_symlink_is_reported_as_not_a_regular_file(root: Path) -> None:
    (root / "index" / "link.faiss").symlink_to(root / "index" / "vpr.new.faiss")
    assert check_coverage(root, NEW, OLD) == ["index/link.faiss (not a regular file)"]


def test_a_symlink_on_a_path_the_new_manifest_lists_is_left_for_the_commit_to_replace(
    root: Path,
) -> None:
    target = root / "index" / "vpr.new.faiss"
    outside = root.parent / "outside.faiss"
    target.rename(outside)
    target.symlink_to(outside)
    assert check_coverage(root, NEW, OLD) == []


def test_a_symlink_on_a_path_only_the_old_manifest_lists_is_reported(root: Path) -> None:
    target = root / "index" / "vpr.old.faiss"
    target.unlink()
    target.symlink_to(root / "index" / "vpr.new.faiss")
    assert check_coverage(root, NEW, OLD) == ["index/vpr.old.faiss (not a regular file)"]


def test_a_symlinked_folder_above_a_listed_path_is_reported(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (root / "index").rename(outside)
    (root / "index").symlink_to(outside, target_is_directory=True)
    assert check_coverage(root, NEW, OLD) == ["index (not a regular file)"]


def test_a_dangling_symlink_is_reported(root: Path) -> None:
    (root / "dangling").symlink_to(root / "nowhere")
    assert check_coverage(root, NEW, OLD) == ["dangling (not a regular file)"]


def test_a_symlinked_folder_is_reported_and_not_followed(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"x")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    assert check_coverage(root, NEW, OLD) == ["linked (not a regular file)"]


def test_a_fifo_is_reported_as_not_a_regular_file(root: Path) -> None:
    os.mkfifo(root / "index" / "pipe")
    assert check_coverage(root, NEW, OLD) == ["index/pipe (not a regular file)"]


def test_the_lock_file_manifest_and_staging_folder_are_ignored(root: Path) -> None:
    (root / LOCK_NAME).write_bytes(b"")
    staging = root / STAGING_NAME
    (staging / "engines").mkdir(parents=True)
    (staging / "engines" / "vpr.next.onnx").write_bytes(b"x")
    (staging / "Manifest.pending.json").write_text("{}")
    assert check_coverage(root, NEW, OLD) == []


def test_reserved_names_only_count_at_the_top_level(root: Path) -> None:
    (root / "index" / LOCK_NAME).write_bytes(b"")
    (root / "index" / STAGING_NAME).mkdir()
    (root / "index" / STAGING_NAME / "x").write_bytes(b"")
    (root / "index" / MANIFEST_NAME).write_bytes(b"")
    assert check_coverage(root, NEW, OLD) == sorted(
        [f"index/{STAGING_NAME}/x", f"index/{LOCK_NAME}", f"index/{MANIFEST_NAME}"]
    )


def test_walk_cache_separates_regular_files_from_everything_else(root: Path) -> None:
    (root / "index" / "link").symlink_to(root / "index" / "vpr.new.faiss")
    os.mkfifo(root / "pipe")
    (root / LOCK_NAME).write_bytes(b"")
    entries = walk_cache(root)
    assert entries.files == tuple(sorted(NEW | OLD))
    assert entries.others == ("index/link", "pipe")


def test_enforce_raises_coverage_error_with_the_paths(root: Path) -> None:
    (root / "stray.bin").write_bytes(b"x")
    os.mkfifo(root / "pipe")
    offending = check_coverage(root, NEW, OLD)
    with pytest.raises(CoverageError) as info:
        enforce(root, offending)
    assert info.value.paths == ["pipe (not a regular file)", "stray.bin"]
    assert "stray.bin" in str(info.value) and "2 file(s)" in str(info.value)
    assert info.value.exit_code == 5


def test_enforce_lists_at_most_twenty_paths_in_the_message(root: Path) -> None:
    for i in range(25):
        (root / f"stray{i:02d}.bin").write_bytes(b"x")
    offending = check_coverage(root, NEW, OLD)
    with pytest.raises(CoverageError) as info:
        enforce(root, offending)
    assert len(info.value.paths) == 25
    assert "stray19.bin" in str(info.value)
    assert "stray20.bin" not in str(info.value)
    assert "and 5 more" in str(info.value)
