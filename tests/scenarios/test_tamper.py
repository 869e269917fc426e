"""``takeoff-cache verify`` on a real, tampered cache: exit 7 and one line per problem.

One demo cache is built for the module; every test damages its own copy.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from takeoff_cache.cli.main import main
from takeoff_cache.trust.keys import load_signer
from takeoff_cache.trust.manifest import parse_time, sign_manifest
from tests.support.cli import CliResult, run_cli
from tests.support.factories import new_signer, on_another_cpu
from tests.support.procs import assert_clean, copy_sandbox

pytestmark = pytest.mark.usefixtures("prefect_harness")

VERIFY_FAILED = 7
PREFIX = "takeoff-cache: verify: "


@pytest.fixture(scope="module")
def built(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_sandbox(demo_source, tmp_path_factory.mktemp("tamper") / "built")
    assert main(build_argv(root)) == 0
    assert assert_clean(root).version == 1
    return root


def build_argv(root: Path, *extra: str) -> list[str]:
    request, work = str(root / "request.toml"), str(root / "work")
    return ["build", "--request", request, "--work-dir", work, "--json", *extra]


@pytest.fixture
def root(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built demo: inputs, cache and work folder."""
    return copy_sandbox(built, tmp_path / "copy")


def verify(capsys: pytest.CaptureFixture[str], root: Path, *extra: str) -> CliResult:
    return run_cli(capsys, "verify", str(root / "cache"), "--trust", str(root / "trust"), *extra)


def refused(result: CliResult, *expected: str) -> None:
    """Exit 7, no traceback, and exactly one stderr line per expected problem, in any order."""
    assert result.code == VERIFY_FAILED, (result.code, result.out, result.err)
    assert "Traceback" not in result.err
    lines = result.err_lines
    assert all(line.startswith(PREFIX) for line in lines), lines
    assert len(lines) == len(expected), lines
    for words in expected:
        assert any(all(w in line for w in words.split(" | ")) for line in lines), (words, lines)


def signed_of(root: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((root / "cache" / "Manifest.json").read_text())
    return doc


def artifact(root: Path, kind: str, backbone: str | None = None) -> str:
    for entry in signed_of(root)["signed"]["artifacts"]:
        if entry["kind"] == kind and backbone in (None, entry.get("backbone")):
            return str(entry["path"])
    raise AssertionError(kind)


def resign(root: Path, edit: Callable[[dict[str, Any]], None], signer: Any = None) -> None:
    """Change ``signed`` and sign it again with the operator's (demo) key."""
    signed = signed_of(root)["signed"]
    edit(signed)
    signer = signer or load_signer(root / "operator.key")
    (root / "cache" / "Manifest.json").write_bytes(sign_manifest(signed, signer))


def test_the_untouched_copy_verifies(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    result = verify(capsys, root)
    assert result.code == 0, result.err
    assert result.err == ""


@pytest.mark.parametrize(
    ("kind", "backbone"),
    [("engine", "vpr"), ("engine", "keypoints"), ("faiss_index", None), ("tile_map", None)],
)
def test_a_flipped_byte_in_an_artifact_fails(
    capsys: pytest.CaptureFixture[str], root: Path, kind: str, backbone: str | None
) -> None:
    rel = artifact(root, kind, backbone)
    path = root / "cache" / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.unlink()  # the cache's engines share their inode with the work folder's store
    path.write_bytes(bytes(data))
    refused(verify(capsys, root), f"{rel} | SHA-256 differs")


@pytest.mark.parametrize("where", ["a digest", "the version", "a path", "the signature"])
def test_a_flipped_byte_in_the_manifest_fails(
    capsys: pytest.CaptureFixture[str], root: Path, where: str
) -> None:
    path = root / "cache" / "Manifest.json"
    text = path.read_text()
    anchor = {
        "a digest": '"sha256": "',
        "the version": '\n    "version": ',  # signed.version, not tool.version
        "a path": '"path": "engines/',
        "the signature": '"sig": "',
    }[where]
    at = text.index(anchor) + len(anchor) + (0 if where == "the version" else 2)
    data = bytearray(text.encode())
    # One character changed for another that is still valid there (JSON, hex, base64).
    data[at] = ord("B") if where == "the signature" and data[at] != ord("B") else data[at] ^ 0x01
    if where == "the signature" and data[at] == text.encode()[at]:
        data[at] = ord("C")
    path.write_bytes(bytes(data))
    refused(verify(capsys, root), "signature does not verify with any trusted key")


def test_a_flipped_byte_that_breaks_the_json_fails(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    path = root / "cache" / "Manifest.json"
    data = bytearray(path.read_bytes())
    data[0] ^= 0x40  # "{" becomes ";"
    path.write_bytes(bytes(data))
    refused(verify(capsys, root), "not valid UTF-8 JSON")


def test_a_truncated_artifact_fails(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    rel = artifact(root, "faiss_index")
    path = root / "cache" / rel
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])
    refused(verify(capsys, root), f"{rel} | size {len(data) // 2} != recorded {len(data)}")


def test_a_truncated_manifest_fails(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    path = root / "cache" / "Manifest.json"
    path.write_bytes(path.read_bytes()[:-40])
    refused(verify(capsys, root), "not valid UTF-8 JSON")


def test_an_extra_file_fails(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    (root / "cache" / "index" / "extra.faiss").write_bytes(b"x")
    refused(verify(capsys, root), "index/extra.faiss | not listed")


def test_a_missing_file_fails(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    rel = artifact(root, "tile_map")
    (root / "cache" / rel).unlink()
    refused(verify(capsys, root), f"{rel} | missing")


def test_an_artifact_replaced_by_a_symlink_fails(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    rel = artifact(root, "engine", "vpr")
    path = root / "cache" / rel
    copy = root / "elsewhere.onnx"
    shutil.copyfile(path, copy)
    path.unlink()
    path.symlink_to(copy)
    # Listed but a symlink, and a symlink where only regular files may be.
    refused(verify(capsys, root), f"{rel} | is a symlink", f"{rel} | not a regular file")


def test_an_added_symlink_fails(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    (root / "cache" / "index" / "link").symlink_to("/etc/hostname")
    refused(verify(capsys, root), "index/link | not a regular file")


def test_two_problems_give_two_lines(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    (root / "cache" / artifact(root, "tile_map")).unlink()
    (root / "cache" / "notes.txt").write_text("x")
    refused(verify(capsys, root), "missing", "notes.txt | not listed")


@pytest.mark.parametrize("path", ["../outside.bin", "/etc/hostname", "index/../../outside.bin"])
def test_an_artifact_path_escaping_the_cache_root_fails_even_when_signed(
    capsys: pytest.CaptureFixture[str], root: Path, path: str
) -> None:
    (root / "outside.bin").write_bytes(b"outside")

    def escape(signed: dict[str, Any]) -> None:
        signed["artifacts"].append(
            {"path": path, "kind": "calibration", "size": 7, "sha256": "0" * 64}
        )

    resign(root, escape)
    refused(verify(capsys, root), "not a plain relative path inside the cache root")


def test_a_signature_by_an_untrusted_key_fails(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    resign(root, lambda signed: None, signer=new_signer())
    refused(verify(capsys, root), "signature does not verify with any trusted key")


def test_a_trusted_keyid_on_an_untrusted_signature_fails(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    good_keyid = signed_of(root)["signatures"][0]["keyid"]
    resign(root, lambda signed: None, signer=new_signer())
    doc = signed_of(root)
    doc["signatures"][0]["keyid"] = good_keyid  # the key id is a hint, never a proof
    (root / "cache" / "Manifest.json").write_text(json.dumps(doc))
    refused(verify(capsys, root), "signature does not verify with any trusted key")


def test_duplicated_signatures_fail(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    doc = signed_of(root)
    doc["signatures"] = doc["signatures"] * 2
    (root / "cache" / "Manifest.json").write_text(json.dumps(doc))
    refused(verify(capsys, root), "duplicated signatures")


def test_an_expired_manifest_fails(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    resign(root, lambda signed: signed.update(expires_at="2020-01-01T00:00:00Z"))
    refused(verify(capsys, root), "expired at 2020-01-01T00:00:00Z")


def test_a_rolled_back_version_fails_against_the_state_file(
    capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"caches": {str((root / "cache").resolve()): {"version": 5}}}))
    refused(verify(capsys, root, "--state", str(state)), "version 1 is below version 5 | rollback")


def test_an_unknown_format_version_fails(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    resign(root, lambda signed: signed.update(format_version=2))
    refused(verify(capsys, root), "unknown manifest format_version 2")


def test_a_signature_that_is_not_base64_fails(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    doc = signed_of(root)
    doc["signatures"][0]["sig"] = "not base64!"
    (root / "cache" / "Manifest.json").write_text(json.dumps(doc))
    refused(verify(capsys, root), "signatures[0].sig is not base64")


def test_a_signature_cut_short_fails(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    doc = signed_of(root)
    sig = base64.b64decode(doc["signatures"][0]["sig"])
    doc["signatures"][0]["sig"] = base64.b64encode(sig[:32]).decode()
    (root / "cache" / "Manifest.json").write_text(json.dumps(doc))
    refused(verify(capsys, root), "signature does not verify")


# --- lifetime, rollback and host identity, end to end through build and verify --------------


def test_a_manifest_built_to_expire_in_1s_fails_verify_2s_later(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    # A changed zoom list, so the build signs a new manifest with the lifetime.
    result = run_cli(capsys, *build_argv(root, "--zoom", "16", "--expires-in", "1s"))
    assert result.code == 0, result.err
    expires = signed_of(root)["signed"]["expires_at"]
    assert expires is not None
    time.sleep(2.0)
    assert parse_time(expires) <= datetime.now(UTC)
    refused(verify(capsys, root), f"manifest expired at {expires}")


def test_the_state_file_refuses_a_restored_older_cache(
    capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path
) -> None:
    state = tmp_path / "seen.json"
    old_cache = tmp_path / "cache-v1"
    shutil.copytree(root / "cache", old_cache)  # the version-1 bytes, as an attacker keeps them
    assert verify(capsys, root, "--state", str(state)).code == 0
    result = run_cli(capsys, *build_argv(root, "--zoom", "16"))
    assert result.code == 0, result.err
    assert signed_of(root)["signed"]["version"] == 2
    assert verify(capsys, root, "--state", str(state)).code == 0
    lineage = signed_of(root)["signed"]["lineage"]
    assert json.loads(state.read_text())["lineages"] == {lineage: {"version": 2}}
    shutil.rmtree(root / "cache")
    shutil.copytree(old_cache, root / "cache")
    assert verify(capsys, root).code == 0  # the old cache is intact and signed ...
    refused(verify(capsys, root, "--state", str(state)), "version 1 is below version 2 | rollback")


def test_host_check_refuses_a_cache_for_another_cpu_set_at_verify_time(
    capsys: pytest.CaptureFixture[str], root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as there:
        on_another_cpu(there, {"arch": "aarch64", "isa": []})
        assert verify(capsys, root).code == 0  # without --host-check the host is not compared
        refused(verify(capsys, root, "--host-check"), "engines were built for another host")
    assert verify(capsys, root, "--host-check").code == 0


def test_verify_json_summary_of_a_good_cache(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    result = verify(capsys, root, "--json")
    assert result.code == 0
    summary = result.json()
    assert summary["ok"] is True and summary["version"] == 1 and summary["artifacts"] == 5
    assert summary["keyid"] == signed_of(root)["signatures"][0]["keyid"]
