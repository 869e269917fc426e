"""The commit phase and recovery: the cache verifies at every step, leftovers are cleaned up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from takeoff_cache.build.commit import commit, prepare_staging, recover, staging
from takeoff_cache.core.layout import PENDING_MANIFEST, RETIRED_MANIFEST, STAGING_NAME
from takeoff_cache.errors import CacheIOError
from takeoff_cache.trust.keys import Signer, TrustedKey
from takeoff_cache.trust.manifest import MANIFEST_NAME, Manifest
from takeoff_cache.trust.verify import verify_cache
from tests.support.factories import manifest_for, new_signer, trust_for, write_files

SHARED = "engines/vpr.onnxruntime.fp32.aaaa.onnx"  # in both builds
OLD_ONLY = "index/vpr.1111.faiss"  # only in the first build
NEW_ONLY = "index/vpr.2222.faiss"  # only in the second build
FIRST = {SHARED: b"engine " * 64, OLD_ONLY: b"old index " * 32}
SECOND = {SHARED: b"engine " * 64, NEW_ONLY: b"new index " * 40}


@pytest.fixture
def signer() -> Signer:
    return new_signer()


@pytest.fixture
def trusted(signer: Signer) -> tuple[TrustedKey, ...]:
    return tuple(trust_for(signer))


def stage(root: Path, files: dict[str, bytes], signer: Signer, version: int) -> bytes:
    """Prepare staging, place ``files`` in it and return the signed manifest listing them:
    staging as a commit leaves it once it has copied the artifacts in."""
    staging = prepare_staging(root)
    write_files(staging, files)
    return manifest_for(staging, sorted(files), signer, version=version)


def work_files(root: Path, files: dict[str, bytes]) -> list[tuple[str, str]]:
    """Write ``files`` to a work folder beside ``root``: what commit copies from."""
    work = root.parent / "work"
    write_files(work, files)
    return [(rel, str(work / rel)) for rel in sorted(files)]


def prepared(
    root: Path, files: dict[str, bytes], signer: Signer, version: int
) -> tuple[bytes, list[tuple[str, str]]]:
    """A fresh staging folder, and the signed manifest and sources of a build of ``files``."""
    prepare_staging(root)
    sources = work_files(root, files)
    return manifest_for(root.parent / "work", sorted(files), signer, version=version), sources


def build(
    root: Path,
    files: dict[str, bytes],
    signer: Signer,
    trusted: tuple[TrustedKey, ...],
    version: int,
) -> list[str]:
    previous = verify_cache(root, list(trusted)) if (root / MANIFEST_NAME).exists() else None
    data, sources = prepared(root, files, signer, version)
    return commit(root, data, sources, previous, set(files))


@pytest.fixture
def first(tmp_path: Path, signer: Signer, trusted: tuple[TrustedKey, ...]) -> Path:
    root = tmp_path / "cache"
    root.mkdir()
    assert build(root, FIRST, signer, trusted, 1) == []
    return root


def check(root: Path, trusted: tuple[TrustedKey, ...]) -> Manifest:
    return verify_cache(root, list(trusted))


def test_a_first_commit_makes_a_cache_that_verifies(
    first: Path, trusted: tuple[TrustedKey, ...]
) -> None:
    manifest = check(first, trusted)
    assert manifest.version == 1
    assert sorted(a.path for a in manifest.artifacts) == sorted(FIRST)
    assert not (first / STAGING_NAME).exists()
    for rel, data in FIRST.items():
        assert (first / rel).read_bytes() == data


def test_a_second_commit_replaces_the_manifest_and_deletes_old_only_files(
    first: Path, signer: Signer, trusted: tuple[TrustedKey, ...]
) -> None:
    removed = build(first, SECOND, signer, trusted, 2)
    assert removed == [OLD_ONLY]
    assert not (first / OLD_ONLY).exists()
    assert (first / NEW_ONLY).read_bytes() == SECOND[NEW_ONLY]
    assert (first / SHARED).read_bytes() == SECOND[SHARED]
    assert not (first / STAGING_NAME).exists()
    manifest = check(first, trusted)
    assert manifest.version == 2
    assert sorted(a.path for a in manifest.artifacts) == sorted(SECOND)


def test_commit_never_deletes_unknown_files(
    first: Path, signer: Signer, trusted: tuple[TrustedKey, ...]
) -> None:
    previous = check(first, trusted)
    (first / "index" / "operator-notes.txt").write_text("mine")
    data, sources = prepared(first, SECOND, signer, 2)
    commit(first, data, sources, previous, set(SECOND))
    assert (first / "index" / "operator-notes.txt").read_text() == "mine"


def test_commit_removes_folders_emptied_by_deletion(
    first: Path, signer: Signer, trusted: tuple[TrustedKey, ...]
) -> None:
    only_engine = {SHARED: FIRST[SHARED]}
    assert build(first, only_engine, signer, trusted, 2) == [OLD_ONLY]
    assert not (first / "index").exists()
    assert (first / "engines").is_dir()
    check(first, trusted)


def test_staging_left_before_the_commit_point_leaves_the_previous_cache_in_force(
    first: Path, trusted: tuple[TrustedKey, ...]
) -> None:
    before = (first / MANIFEST_NAME).read_bytes()
    with pytest.raises(RuntimeError), staging(first, trusted) as folder:
        write_files(folder, SECOND)
        raise RuntimeError("the build failed before its commit phase")
    assert not (first / STAGING_NAME).exists()
    assert (first / MANIFEST_NAME).read_bytes() == before
    check(first, trusted)


def test_the_pending_manifest_is_in_staging_before_any_artifact_is_copied(
    first: Path, signer: Signer, trusted: tuple[TrustedKey, ...]
) -> None:
    previous = check(first, trusted)
    data, sources = prepared(first, SECOND, signer, 2)
    Path(sources[-1][1]).unlink()  # the second copy fails
    with pytest.raises(CacheIOError, match="commit: cannot copy"):
        commit(first, data, sources, previous, set(SECOND))
    staging = first / STAGING_NAME
    assert (staging / PENDING_MANIFEST).read_bytes() == data
    assert (staging / sources[0][0]).is_file()
    assert check(first, trusted).version == 1  # the pending manifest vouches for the copy


def test_a_symlink_on_a_listed_path_is_replaced_by_the_commit(
    first: Path, signer: Signer, trusted: tuple[TrustedKey, ...], tmp_path: Path
) -> None:
    previous = check(first, trusted)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(FIRST[SHARED])
    (first / SHARED).unlink()
    (first / SHARED).symlink_to(outside)
    data, sources = prepared(first, SECOND, signer, 2)
    commit(first, data, sources, previous, set(SECOND))
    assert not (first / SHARED).is_symlink()
    assert outside.read_bytes() == FIRST[SHARED]
    assert check(first, trusted).version == 2


def kill_after_moving_artifacts(root: Path, signer: Signer) -> bytes:
    """Steps 1-2 of commit done, then killed: pending manifest and new files in place."""
    staging = root / STAGING_NAME
    data = stage(root, SECOND, signer, 2)
    (staging / PENDING_MANIFEST).write_bytes(data)
    for rel in sorted(SECOND):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, root / rel)
    return data


def test_a_build_killed_before_the_commit_point_verifies_and_rolls_back(
    first: Path, signer: Signer, trusted: tuple[TrustedKey, ...]
) -> None:
    old_manifest = (first / MANIFEST_NAME).read_bytes()
    kill_after_moving_artifacts(first, signer)
    assert (first / NEW_ONLY).exists()
    assert check(first, trusted).version == 1

    assert recover(first, trusted) is True
    assert not (first / NEW_ONLY).exists()
    assert (first / OLD_ONLY).exists() and (first / SHARED).exists()
    assert not (first / STAGING_NAME).exists()
    assert (first / MANIFEST_NAME).read_bytes() == old_manifest
    assert check(first, trusted).version == 1


def test_a_build_killed_after_the_commit_point_verifies_and_rolls_forward(
    first: Path, signer: Signer, trusted: tuple[TrustedKey, ...]
) -> None:
    staging = first / STAGING_NAME
    data = kill_after_moving_artifacts(first, signer)
    os.link(first / MANIFEST_NAME, staging / RETIRED_MANIFEST)
    os.replace(staging / PENDING_MANIFEST, first / MANIFEST_NAME)  # the commit point
    assert (first / MANIFEST_NAME).read_bytes() == data
    assert (first / OLD_ONLY).exists()
    assert check(first, trusted).version == 2

    assert recover(first, trusted) is True
    assert not (first / OLD_ONLY).exists()
    assert (first / NEW_ONLY).exists() and (first / SHARED).exists()
    assert not (first / STAGING_NAME).exists()
    assert check(first, trusted).version == 2


def test_a_build_killed_between_retiring_and_switching_verifies_and_rolls_back(
    first: Path, signer: Signer, trusted: tuple[TrustedKey, ...]
) -> None:
    kill_after_moving_artifacts(first, signer)
    os.link(first / MANIFEST_NAME, first / STAGING_NAME / RETIRED_MANIFEST)
    assert check(first, trusted).version == 1
    recover(first, trusted)
    assert not (first / NEW_ONLY).exists() and (first / OLD_ONLY).exists()
    assert check(first, trusted).version == 1


def test_a_first_build_killed_before_its_commit_point_leaves_nothing_behind(
    tmp_path: Path, signer: Signer, trusted: tuple[TrustedKey, ...]
) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    kill_after_moving_artifacts(root, signer)
    assert recover(root, trusted) is True
    assert list(root.iterdir()) == []


def test_recover_without_staging_does_nothing(first: Path, trusted: tuple[TrustedKey, ...]) -> None:
    assert recover(first, trusted) is False
    check(first, trusted)


def test_recover_ignores_a_staging_manifest_not_signed_by_a_trusted_key(
    first: Path, trusted: tuple[TrustedKey, ...]
) -> None:
    intruder = new_signer()
    (first / "mine.txt").write_text("operator file")
    staging = prepare_staging(first)
    data = manifest_for(first, ["mine.txt"], intruder, version=9)
    (staging / PENDING_MANIFEST).write_bytes(data)
    assert recover(first, trusted) is True
    assert (first / "mine.txt").read_text() == "operator file"
    assert not staging.exists()


def test_recover_then_a_new_build_succeeds(
    first: Path, signer: Signer, trusted: tuple[TrustedKey, ...]
) -> None:
    kill_after_moving_artifacts(first, signer)
    recover(first, trusted)
    assert build(first, SECOND, signer, trusted, 2) == [OLD_ONLY]
    assert check(first, trusted).version == 2


def test_a_small_atomic_write_gets_its_temporary_name_only_when_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A build killed while writing its pending manifest must leave no partial
    # file in staging that verify cannot vouch for.
    from takeoff_cache.core import fsutil

    target = tmp_path / "Manifest.pending.json"
    seen: list[list[str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        real_fsync(fd)

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    fsutil.atomic_write_bytes(target, b'{"signed": {}}')
    assert target.read_bytes() == b'{"signed": {}}'
    assert seen and seen[0] == [], f"a named file existed before its bytes were synced: {seen}"
