"""verify_cache on hand-made caches: every tamper is found and named."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from takeoff_cache.core import env, faults
from takeoff_cache.core.fsutil import temp_path
from takeoff_cache.core.layout import LOCK_NAME, PENDING_MANIFEST, RETIRED_MANIFEST, STAGING_NAME
from takeoff_cache.errors import VerificationError
from takeoff_cache.trust.keys import Signer, TrustedKey
from takeoff_cache.trust.manifest import MANIFEST_NAME, Manifest, sign_manifest
from takeoff_cache.trust.verify import STATE_FORMAT, verify_cache
from tests.support.factories import (
    HOST,
    LINEAGE,
    artifact_for,
    make_cache,
    new_signer,
    signed_doc,
    trust_for,
    write_files,
)

FILES = {
    "engines/vpr.onnxruntime.fp32.abc123.onnx": b"engine bytes " * 100,
    "index/vpr.abc123.faiss": b"index bytes " * 50,
}
ENGINE, INDEX = sorted(FILES)


@pytest.fixture
def signer() -> Signer:
    return new_signer()


@pytest.fixture
def trusted(signer: Signer) -> list[TrustedKey]:
    return trust_for(signer)


@pytest.fixture
def cache(tmp_path: Path, signer: Signer) -> Path:
    root = tmp_path / "cache"
    make_cache(root, signer, FILES)
    return root


def problems_of(
    cache: Path,
    trusted: list[TrustedKey],
    *,
    state_file: Path | None = None,
    host: dict[str, Any] | None = None,
) -> list[str]:
    with pytest.raises(VerificationError) as info:
        verify_cache(cache, trusted, state_file=state_file, host=host)
    assert str(info.value) == info.value.problems[0]
    return info.value.problems


def names(problems: list[str], rel: str) -> bool:
    return any(rel in p for p in problems)


def test_an_untouched_cache_verifies(cache: Path, trusted: list[TrustedKey]) -> None:
    manifest = verify_cache(cache, trusted)
    assert isinstance(manifest, Manifest)
    assert sorted(a.path for a in manifest.artifacts) == [ENGINE, INDEX]


def test_a_flipped_byte_in_an_artifact_fails(cache: Path, trusted: list[TrustedKey]) -> None:
    path = cache / INDEX
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    problems = problems_of(cache, trusted)
    assert names(problems, INDEX) and names(problems, "SHA-256")
    assert not names(problems, ENGINE)


def test_a_truncated_artifact_fails(cache: Path, trusted: list[TrustedKey]) -> None:
    path = cache / ENGINE
    path.write_bytes(path.read_bytes()[:-1])
    problems = problems_of(cache, trusted)
    assert names(problems, ENGINE) and names(problems, "size")


def test_a_missing_artifact_fails(cache: Path, trusted: list[TrustedKey]) -> None:
    (cache / ENGINE).unlink()
    problems = problems_of(cache, trusted)
    assert problems == [f"{ENGINE}: missing"]


def test_a_missing_artifact_folder_fails(cache: Path, trusted: list[TrustedKey]) -> None:
    (cache / ENGINE).unlink()
    (cache / "engines").rmdir()
    assert names(problems_of(cache, trusted), ENGINE)


def test_every_problem_is_reported_at_once(cache: Path, trusted: list[TrustedKey]) -> None:
    (cache / ENGINE).unlink()
    (cache / INDEX).write_bytes(b"x")
    (cache / "stray.bin").write_bytes(b"x")
    problems = problems_of(cache, trusted)
    assert len(problems) == 3
    assert names(problems, ENGINE) and names(problems, INDEX) and names(problems, "stray.bin")


def test_an_extra_unlisted_file_fails(cache: Path, trusted: list[TrustedKey]) -> None:
    (cache / "index" / "extra.faiss").write_bytes(b"sneaky")
    problems = problems_of(cache, trusted)
    assert problems == ["index/extra.faiss: not listed in the manifest"]


def test_an_extra_hidden_file_at_the_top_fails(cache: Path, trusted: list[TrustedKey]) -> None:
    (cache / ".hidden").write_bytes(b"")
    assert names(problems_of(cache, trusted), ".hidden")


def test_an_artifact_replaced_by_a_symlink_fails(
    cache: Path, trusted: list[TrustedKey], tmp_path: Path
) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((cache / ENGINE).read_bytes())  # same bytes, same size
    (cache / ENGINE).unlink()
    (cache / ENGINE).symlink_to(outside)
    problems = problems_of(cache, trusted)
    assert f"{ENGINE}: is a symlink" in problems


def test_an_artifact_folder_replaced_by_a_symlink_fails(
    cache: Path, trusted: list[TrustedKey], tmp_path: Path
) -> None:
    (cache / "engines").rename(tmp_path / "engines")
    (cache / "engines").symlink_to(tmp_path / "engines")
    problems = problems_of(cache, trusted)
    assert names(problems, ENGINE)
    assert names(problems, "engines: not a regular file")


def test_an_added_symlink_fails(cache: Path, trusted: list[TrustedKey]) -> None:
    (cache / "index" / "link.faiss").symlink_to(cache / INDEX)
    problems = problems_of(cache, trusted)
    assert names(problems, "index/link.faiss")


def test_an_added_fifo_fails(cache: Path, trusted: list[TrustedKey]) -> None:
    os.mkfifo(cache / "pipe")
    assert names(problems_of(cache, trusted), "pipe")


def test_an_untrusted_trust_store_fails(cache: Path) -> None:
    problems = problems_of(cache, trust_for(new_signer()))
    assert names(problems, "trusted key")


def test_a_missing_manifest_fails(cache: Path, trusted: list[TrustedKey]) -> None:
    (cache / MANIFEST_NAME).unlink()
    assert names(problems_of(cache, trusted), MANIFEST_NAME)


def test_a_missing_cache_root_fails(tmp_path: Path, trusted: list[TrustedKey]) -> None:
    assert names(problems_of(tmp_path / "nope", trusted), "not a folder")


def test_a_manifest_that_is_a_folder_fails_verification(
    cache: Path, trusted: list[TrustedKey]
) -> None:
    (cache / MANIFEST_NAME).unlink()
    (cache / MANIFEST_NAME).mkdir()
    assert names(problems_of(cache, trusted), MANIFEST_NAME)


def state_for(path: Path, lineage: str, version: int) -> bytes:
    data = json.dumps({"format": STATE_FORMAT, "lineages": {lineage: {"version": version}}})
    path.write_text(data)
    return data.encode()


def seen(state: Path) -> dict[str, Any]:
    lineages: dict[str, Any] = json.loads(state.read_text())["lineages"]
    return lineages


def test_a_state_file_with_a_higher_version_fails_as_rollback(
    cache: Path, trusted: list[TrustedKey], tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    state_for(state, LINEAGE, 2)
    assert names(problems_of(cache, trusted, state_file=state), "rollback")


def test_a_state_file_records_the_version_and_catches_a_later_rollback(
    tmp_path: Path, signer: Signer, trusted: list[TrustedKey]
) -> None:
    root = tmp_path / "cache"
    state = tmp_path / "state" / "seen.json"
    state.parent.mkdir()
    old = make_cache(root, signer, FILES, version=1)
    verify_cache(root, trusted, state_file=state)
    make_cache(root, signer, FILES, version=2)
    verify_cache(root, trusted, state_file=state)
    assert seen(state) == {LINEAGE: {"version": 2}}
    (root / MANIFEST_NAME).write_bytes(old)  # an old, validly signed manifest
    assert names(problems_of(root, trusted, state_file=state), "rollback")
    verify_cache(root, trusted)  # without the state file the old manifest is fine


def test_a_copy_of_an_older_cache_in_another_folder_is_refused(
    tmp_path: Path, signer: Signer, trusted: list[TrustedKey]
) -> None:
    root, elsewhere = tmp_path / "cache", tmp_path / "usb" / "cache"
    state = tmp_path / "state.json"
    make_cache(root, signer, FILES, version=1)
    shutil.copytree(root, elsewhere)
    make_cache(root, signer, FILES, version=2)
    verify_cache(root, trusted, state_file=state)
    before = state.read_bytes()
    problems = problems_of(elsewhere, trusted, state_file=state)
    assert names(problems, "rollback") and names(problems, LINEAGE)
    assert state.read_bytes() == before


def test_a_state_file_for_another_lineage_does_not_interfere(
    cache: Path, trusted: list[TrustedKey], tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    other = "00000000-0000-4000-8000-000000000000"
    state_for(state, other, 99)
    verify_cache(cache, trusted, state_file=state)
    assert seen(state) == {other: {"version": 99}, LINEAGE: {"version": 1}}


def test_a_state_file_keyed_by_path_still_counts_for_that_cache_and_moves_to_its_lineage(
    cache: Path, trusted: list[TrustedKey], signer: Signer, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    key = str(cache.resolve())
    state.write_text(json.dumps({"caches": {key: {"version": 2}, "/elsewhere": {"version": 5}}}))
    assert names(problems_of(cache, trusted, state_file=state), "rollback")
    make_cache(cache, signer, FILES, version=2)
    verify_cache(cache, trusted, state_file=state)
    written = json.loads(state.read_text())
    assert written["lineages"] == {LINEAGE: {"version": 2}}
    assert written["caches"] == {"/elsewhere": {"version": 5}}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"lineages": []}',
        b'{"lineages": {"x": {"version": "2"}}}',
        b'{"lineages": {"x": {"version": 0}}}',
        b'{"lineages": {"x": 3}}',
        b'{"format": "something-else", "lineages": {}}',
        b'{"lineages": {}, "comment": "mine"}',
        b'{"lineages": {}} trailing',
    ],
)
def test_a_state_file_that_cannot_be_parsed_is_an_error_and_is_left_as_it_was(
    cache: Path, trusted: list[TrustedKey], tmp_path: Path, content: bytes
) -> None:
    state = tmp_path / "state.json"
    state.write_bytes(content)
    problems = problems_of(cache, trusted, state_file=state)
    assert problems[0].startswith("state: ") and len(problems) == 1
    assert state.read_bytes() == content


def test_a_state_path_that_is_a_folder_is_refused_before_verifying(
    cache: Path, trusted: list[TrustedKey], tmp_path: Path
) -> None:
    (cache / MANIFEST_NAME).unlink()  # verifying would fail too, but later
    state = tmp_path / "state"
    state.mkdir()
    assert problems_of(cache, trusted, state_file=state) == [
        f"state: {state} is a folder, not a file"
    ]
    assert list(state.iterdir()) == []


def test_a_state_path_in_a_missing_folder_is_refused_before_verifying(
    cache: Path, trusted: list[TrustedKey], tmp_path: Path
) -> None:
    (cache / MANIFEST_NAME).unlink()
    state = tmp_path / "nowhere" / "state.json"
    problems = problems_of(cache, trusted, state_file=state)
    assert problems[0].startswith("state: ") and len(problems) == 1


def test_a_failed_state_write_leaves_the_old_state(
    cache: Path, trusted: list[TrustedKey], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state.json"
    before = state_for(state, "00000000-0000-4000-8000-000000000000", 3)
    monkeypatch.setenv(env.FAIL_AT, "verify.state.rename:EIO")
    faults.reset()
    try:
        problems = problems_of(cache, trusted, state_file=state)
    finally:
        monkeypatch.delenv(env.FAIL_AT)
        faults.reset()
    assert problems[0].startswith(f"state: cannot write {state}")
    assert state.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cache", "state.json"]


def test_a_manifest_without_a_lineage_is_refused_with_a_state_file(
    tmp_path: Path, signer: Signer, trusted: list[TrustedKey]
) -> None:
    root = tmp_path / "cache"
    write_files(root, FILES)
    signed = signed_doc([artifact_for(root, r) for r in sorted(FILES)])
    del signed["lineage"]  # as builds wrote it before lineages
    (root / MANIFEST_NAME).write_bytes(sign_manifest(signed, signer))
    verify_cache(root, trusted)
    state = tmp_path / "state.json"
    assert names(problems_of(root, trusted, state_file=state), "no lineage")
    assert not state.exists()


def test_a_differing_host_fails_the_host_check(cache: Path, trusted: list[TrustedKey]) -> None:
    verify_cache(cache, trusted, host=dict(HOST))
    problems = problems_of(cache, trusted, host={**HOST, "arch": "aarch64"})
    assert names(problems, "another host")


def test_the_lock_file_and_an_empty_staging_folder_are_not_unlisted(
    cache: Path, trusted: list[TrustedKey]
) -> None:
    (cache / LOCK_NAME).write_bytes(b"")
    (cache / STAGING_NAME).mkdir()
    verify_cache(cache, trusted)


def test_reserved_names_below_the_top_level_are_unlisted_files(
    cache: Path, trusted: list[TrustedKey]
) -> None:
    (cache / "index" / LOCK_NAME).write_bytes(b"")
    (cache / "index" / MANIFEST_NAME).write_bytes(b"{}")
    problems = problems_of(cache, trusted)
    assert names(problems, f"index/{LOCK_NAME}") and names(problems, f"index/{MANIFEST_NAME}")


NEW = "engines/new.onnxruntime.fp32.def456.onnx"


def pending_listing_new(
    cache: Path, by: Signer, *, name: str = PENDING_MANIFEST, version: int | None = None
) -> None:
    """A signed manifest in staging that lists the current artifacts plus NEW.

    A pending manifest is the current version + 1; a retired one the current - 1,
    so for the retired case the current manifest is re-made as version 2.
    """
    if name == RETIRED_MANIFEST:
        make_cache(cache, by, FILES, version=2)
    (cache / NEW).write_bytes(b"new engine " * 30)
    artifacts = [artifact_for(cache, r) for r in (*FILES, NEW)]
    (cache / STAGING_NAME).mkdir(exist_ok=True)
    if version is None:
        version = 2 if name == PENDING_MANIFEST else 1
    data = sign_manifest(signed_doc(artifacts, version=version), by)
    (cache / STAGING_NAME / name).write_bytes(data)


@pytest.mark.parametrize("name", [PENDING_MANIFEST, RETIRED_MANIFEST])
def test_an_unlisted_file_vouched_for_by_a_trusted_staging_manifest_is_accepted(
    cache: Path, signer: Signer, trusted: list[TrustedKey], name: str
) -> None:
    pending_listing_new(cache, signer, name=name)
    manifest = verify_cache(cache, trusted)
    assert NEW not in {a.path for a in manifest.artifacts}


def test_a_pending_manifest_signed_by_another_trusted_key_also_vouches(
    cache: Path, signer: Signer
) -> None:
    other = new_signer()
    pending_listing_new(cache, other)
    verify_cache(cache, trust_for(signer, other))


UNTRUSTED_PENDING = (
    f"{STAGING_NAME}/{PENDING_MANIFEST}: not a manifest of this cache signed by a trusted key"
)


def test_a_pending_manifest_by_an_untrusted_key_does_not_vouch(
    cache: Path, trusted: list[TrustedKey]
) -> None:
    pending_listing_new(cache, new_signer())
    assert problems_of(cache, trusted) == [f"{NEW}: not listed in the manifest", UNTRUSTED_PENDING]


def test_an_old_signed_manifest_dropped_into_staging_vouches_for_nothing(
    cache: Path, signer: Signer, trusted: list[TrustedKey]
) -> None:
    pending_listing_new(cache, signer, version=1)
    assert problems_of(cache, trusted) == [f"{NEW}: not listed in the manifest", UNTRUSTED_PENDING]


def test_a_symlink_inside_staging_fails_verification(
    cache: Path, trusted: list[TrustedKey]
) -> None:
    (cache / STAGING_NAME).mkdir()
    (cache / STAGING_NAME / "passwd").symlink_to("/etc/passwd")
    assert problems_of(cache, trusted) == [f"{STAGING_NAME}/passwd: not a regular file"]


def test_a_pending_manifest_with_a_different_digest_does_not_vouch(
    cache: Path, signer: Signer, trusted: list[TrustedKey]
) -> None:
    pending_listing_new(cache, signer)
    data = bytearray((cache / NEW).read_bytes())
    data[0] ^= 0x01  # same size, different SHA-256
    (cache / NEW).write_bytes(bytes(data))
    assert problems_of(cache, trusted) == [f"{NEW}: not listed in the manifest"]


def test_a_tampered_pending_manifest_does_not_vouch(
    cache: Path, signer: Signer, trusted: list[TrustedKey]
) -> None:
    pending_listing_new(cache, signer)
    path = cache / STAGING_NAME / PENDING_MANIFEST
    doc = json.loads(path.read_bytes())
    doc["signed"]["version"] = 3
    path.write_text(json.dumps(doc))
    assert names(problems_of(cache, trusted), NEW)


def test_a_pending_manifest_does_not_excuse_a_tampered_listed_artifact(
    cache: Path, signer: Signer, trusted: list[TrustedKey]
) -> None:
    pending_listing_new(cache, signer)
    (cache / INDEX).write_bytes(b"tampered")
    problems = problems_of(cache, trusted)
    assert names(problems, INDEX) and not names(problems, NEW)


def test_a_stray_file_in_staging_fails(cache: Path, trusted: list[TrustedKey]) -> None:
    (cache / STAGING_NAME / "engines").mkdir(parents=True)
    (cache / STAGING_NAME / "engines" / "extra.onnx").write_bytes(b"rides along")
    assert problems_of(cache, trusted) == [
        f"{STAGING_NAME}/engines/extra.onnx: not vouched for by a signed manifest in {STAGING_NAME}"
    ]


def staged_copy(cache: Path, signer: Signer) -> Path:
    """A pending manifest listing NEW, and NEW's copy in staging (not yet moved)."""
    pending_listing_new(cache, signer)
    staged = cache / STAGING_NAME / NEW
    staged.parent.mkdir(parents=True)
    os.replace(cache / NEW, staged)
    return staged


def test_a_copy_in_staging_vouched_for_by_the_pending_manifest_is_accepted(
    cache: Path, signer: Signer, trusted: list[TrustedKey]
) -> None:
    staged_copy(cache, signer)
    verify_cache(cache, trusted)


def test_a_copy_in_staging_that_differs_from_the_pending_manifest_fails(
    cache: Path, signer: Signer, trusted: list[TrustedKey]
) -> None:
    staged = staged_copy(cache, signer)
    data = bytearray(staged.read_bytes())
    data[0] ^= 0x01
    staged.write_bytes(bytes(data))
    assert problems_of(cache, trusted) == [
        f"{STAGING_NAME}/{NEW}: not vouched for by a signed manifest in {STAGING_NAME}"
    ]


def test_staging_files_vouched_for_by_nothing_fail_without_a_pending_manifest(
    cache: Path, signer: Signer, trusted: list[TrustedKey]
) -> None:
    staged_copy(cache, signer)
    (cache / STAGING_NAME / PENDING_MANIFEST).unlink()
    assert names(problems_of(cache, trusted), f"{STAGING_NAME}/{NEW}")


@pytest.mark.parametrize(("cut", "accepted"), [(10, True), (0, True), (-1, False)])
def test_an_interrupted_copy_in_staging_is_accepted_only_if_no_larger_than_the_artifact(
    cache: Path, signer: Signer, trusted: list[TrustedKey], cut: int, accepted: bool
) -> None:
    staged = staged_copy(cache, signer)
    data = staged.read_bytes()
    temp = temp_path(staged)
    temp.write_bytes(data[: len(data) - cut] if cut >= 0 else data + b"x")
    staged.unlink()
    if accepted:
        verify_cache(cache, trusted)
    else:
        assert names(problems_of(cache, trusted), temp.name)


def test_a_written_but_not_renamed_pending_manifest_is_accepted_only_when_signed(
    cache: Path, signer: Signer, trusted: list[TrustedKey]
) -> None:
    pending_listing_new(cache, signer)
    (cache / NEW).unlink()
    pending = cache / STAGING_NAME / PENDING_MANIFEST
    temp = temp_path(pending)
    os.replace(pending, temp)
    verify_cache(cache, trusted)
    temp.write_bytes(temp.read_bytes()[:-10])
    assert names(problems_of(cache, trusted), temp.name)


def test_a_lock_file_with_content_fails(cache: Path, trusted: list[TrustedKey]) -> None:
    (cache / LOCK_NAME).write_bytes(b"hidden cargo")
    assert problems_of(cache, trusted) == [
        f"{LOCK_NAME}: holds 12 bytes; the lock file is always empty"
    ]
