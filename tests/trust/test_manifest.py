"""The signed manifest: canonical bytes, signing and verification from bytes alone."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from takeoff_cache import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION
from takeoff_cache.errors import VerificationError
from takeoff_cache.trust.keys import Signer, TrustedKey
from takeoff_cache.trust.manifest import (
    Artifact,
    Manifest,
    canonical_bytes,
    parse_time,
    sign_manifest,
    verify_manifest_bytes,
)
from tests.support.factories import CREATED, new_signer, signed_doc, trust_for

ARTIFACTS = [
    Artifact("index/vpr.abc.faiss", "faiss_index", 1234, "1" * 64, {"dimension": 3}),
    Artifact("engines/vpr.onnxruntime.fp32.abc.onnx", "engine", 99, "2" * 64, {"backbone": "vpr"}),
]
NOW = CREATED + timedelta(hours=1)


@pytest.fixture
def signer() -> Signer:
    return new_signer()


@pytest.fixture
def trusted(signer: Signer) -> list[TrustedKey]:
    return trust_for(signer)


def verify(data: bytes, trusted: list[TrustedKey], **kw: Any) -> Manifest:
    return verify_manifest_bytes(data, trusted, now=kw.pop("now", NOW), **kw)


def rejected(data: bytes, trusted: list[TrustedKey], fragment: str, **kw: Any) -> list[str]:
    with pytest.raises(VerificationError) as info:
        verify(data, trusted, **kw)
    assert any(fragment in p for p in info.value.problems), info.value.problems
    return info.value.problems


def edit(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """Re-serialize the manifest file after ``change`` (signature untouched)."""
    doc = json.loads(data)
    change(doc)
    return json.dumps(doc, indent=2).encode()


def resigned(signed: dict[str, Any], change: Callable[[dict[str, Any]], None], s: Signer) -> bytes:
    copy = json.loads(json.dumps(signed))
    change(copy)
    return sign_manifest(copy, s)


def leaves(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, (*path, i))
    else:
        yield path


def altered(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1") if value else "x"
    return "x"  # None


def test_signed_manifest_round_trips(signer: Signer, trusted: list[TrustedKey]) -> None:
    signed = signed_doc(ARTIFACTS, version=3)
    data = sign_manifest(signed, signer)
    manifest = verify(data, trusted)
    assert manifest.signed == signed
    assert manifest.keyid == signer.keyid
    assert manifest.version == 3
    assert manifest.build_identity == "b" * 64
    assert [a.path for a in manifest.artifacts] == sorted(a.path for a in ARTIFACTS)
    assert {a.path: a for a in manifest.artifacts}[ARTIFACTS[0].path] == ARTIFACTS[0]
    assert signed["format"] == MANIFEST_FORMAT
    assert signed["format_version"] == MANIFEST_FORMAT_VERSION
    assert parse_time(signed["created_at"]) == CREATED


def test_manifest_file_is_readable_json_with_signed_and_signatures(signer: Signer) -> None:
    doc = json.loads(sign_manifest(signed_doc(ARTIFACTS), signer))
    assert set(doc) == {"signed", "signatures"}
    (sig,) = doc["signatures"]
    assert sig["keyid"] == signer.keyid
    assert len(base64.b64decode(sig["sig"])) == 64


def test_whitespace_and_key_order_in_the_file_do_not_matter(
    signer: Signer, trusted: list[TrustedKey]
) -> None:
    data = sign_manifest(signed_doc(ARTIFACTS), signer)
    doc = json.loads(data)
    reordered = {
        "signed": dict(reversed(list(doc["signed"].items()))),
        "signatures": doc["signatures"],
    }
    verify(json.dumps(reordered, separators=(",", ":")).encode(), trusted)


def test_canonical_bytes_do_not_depend_on_key_order() -> None:
    a = {"b": 1, "a": {"y": [1, 2, {"q": 1.5, "p": None}], "x": "é"}}
    b = {"a": {"x": "é", "y": [1, 2, {"p": None, "q": 1.5}]}, "b": 1}
    assert canonical_bytes(a) == canonical_bytes(b)
    assert canonical_bytes(a) == '{"a":{"x":"é","y":[1,2,{"p":null,"q":1.5}]},"b":1}'.encode()


def test_canonical_bytes_depend_on_list_order_and_values() -> None:
    assert canonical_bytes({"a": [1, 2]}) != canonical_bytes({"a": [2, 1]})
    assert canonical_bytes({"a": 1}) != canonical_bytes({"a": 1.5})


def test_any_changed_value_in_the_signed_part_fails(
    signer: Signer, trusted: list[TrustedKey]
) -> None:
    signed = signed_doc(ARTIFACTS, expires_at=NOW + timedelta(days=1))
    data = sign_manifest(signed, signer)
    paths = list(leaves(signed))
    assert len(paths) > 20
    for path in paths:

        def change(doc: dict[str, Any], path: tuple[Any, ...] = path) -> None:
            target = doc["signed"]
            for step in path[:-1]:
                target = target[step]
            target[path[-1]] = altered(target[path[-1]])

        with pytest.raises(VerificationError):
            verify(edit(data, change), trusted)


def test_any_flipped_byte_in_the_signed_part_fails(
    signer: Signer, trusted: list[TrustedKey]
) -> None:
    data = sign_manifest(signed_doc(ARTIFACTS), signer)
    start = data.index(b'"signed":')
    end = data.rindex(b"}")  # the closing brace of the whole document
    assert end - start > 500
    for i in range(start, end + 1):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        with pytest.raises(VerificationError):
            verify(bytes(flipped), trusted)


def test_an_added_or_removed_key_in_the_signed_part_fails(
    signer: Signer, trusted: list[TrustedKey]
) -> None:
    data = sign_manifest(signed_doc(ARTIFACTS), signer)
    rejected(edit(data, lambda d: d["signed"].update(extra=1)), trusted, "signature")
    rejected(edit(data, lambda d: d["signed"].pop("expires_at")), trusted, "signature")
    rejected(edit(data, lambda d: d["signed"]["artifacts"].pop()), trusted, "signature")


def test_a_signature_by_an_untrusted_key_fails(signer: Signer) -> None:
    data = sign_manifest(signed_doc(ARTIFACTS), signer)
    rejected(data, trust_for(new_signer()), "trusted key")
    rejected(data, [], "trusted key")


def test_a_manifest_without_signatures_fails(signer: Signer, trusted: list[TrustedKey]) -> None:
    data = sign_manifest(signed_doc(ARTIFACTS), signer)
    rejected(edit(data, lambda d: d.update(signatures=[])), trusted, "no signatures")
    rejected(edit(data, lambda d: d.pop("signatures")), trusted, "no signatures")


def test_duplicated_signature_entries_fail(signer: Signer, trusted: list[TrustedKey]) -> None:
    data = sign_manifest(signed_doc(ARTIFACTS), signer)
    rejected(
        edit(data, lambda d: d["signatures"].append(dict(d["signatures"][0]))),
        trusted,
        "duplicated",
    )


def test_the_same_signature_under_two_keyids_fails(
    signer: Signer, trusted: list[TrustedKey]
) -> None:
    def dup(doc: dict[str, Any]) -> None:
        doc["signatures"].append({"keyid": "0" * 64, "sig": doc["signatures"][0]["sig"]})

    rejected(edit(sign_manifest(signed_doc(ARTIFACTS), signer), dup), trusted, "duplicated")


@pytest.mark.parametrize(
    "signatures",
    [[{"keyid": "x"}], [{"keyid": "x", "sig": "!!not base64!!"}], ["sig"], {"keyid": "x"}],
)
def test_malformed_signature_entries_fail(
    signer: Signer, trusted: list[TrustedKey], signatures: Any
) -> None:
    data = sign_manifest(signed_doc(ARTIFACTS), signer)
    with pytest.raises(VerificationError):
        verify(edit(data, lambda d: d.update(signatures=signatures)), trusted)


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"\xff\xfe{}", b"[]", b'{"signatures": []}', b'{"signed": [], "sig": 1}'],
)
def test_non_json_or_shapeless_bytes_fail(trusted: list[TrustedKey], data: bytes) -> None:
    with pytest.raises(VerificationError):
        verify(data, trusted)


def test_unexpected_top_level_keys_fail(signer: Signer, trusted: list[TrustedKey]) -> None:
    data = sign_manifest(signed_doc(ARTIFACTS), signer)
    rejected(edit(data, lambda d: d.update(note="hi")), trusted, "top-level")


def test_unknown_format_name_fails_even_when_signed(
    signer: Signer, trusted: list[TrustedKey]
) -> None:
    data = resigned(signed_doc(ARTIFACTS), lambda s: s.update(format="other"), signer)
    rejected(data, trusted, "unknown manifest format")


@pytest.mark.parametrize(
    "lineage", ["", "cache-1", "6F1D2C3B-4A5E-4F60-8A7B-9C0D1E2F3A4B", None, 7, ["x"]]
)
def test_a_malformed_lineage_fails_even_when_signed(
    signer: Signer, trusted: list[TrustedKey], lineage: Any
) -> None:
    data = resigned(signed_doc(ARTIFACTS), lambda s: s.update(lineage=lineage), signer)
    rejected(data, trusted, "lineage")


def test_a_manifest_without_a_lineage_still_verifies(
    signer: Signer, trusted: list[TrustedKey]
) -> None:
    data = resigned(signed_doc(ARTIFACTS), lambda s: s.pop("lineage"), signer)
    assert verify_manifest_bytes(data, trusted).lineage is None


@pytest.mark.parametrize("format_version", [MANIFEST_FORMAT_VERSION + 1, 0, "1", None])
def test_unknown_format_version_fails_even_when_signed(
    signer: Signer, trusted: list[TrustedKey], format_version: Any
) -> None:
    data = resigned(
        signed_doc(ARTIFACTS), lambda s: s.update(format_version=format_version), signer
    )
    rejected(data, trusted, "format_version")


def test_an_expired_manifest_fails(signer: Signer, trusted: list[TrustedKey]) -> None:
    expires = NOW + timedelta(hours=2)
    data = sign_manifest(signed_doc(ARTIFACTS, expires_at=expires), signer)
    verify(data, trusted, now=expires - timedelta(seconds=1))
    rejected(data, trusted, "expired", now=expires)
    rejected(data, trusted, "expired", now=expires + timedelta(days=1))


def test_a_manifest_without_expiry_never_expires(signer: Signer, trusted: list[TrustedKey]) -> None:
    data = sign_manifest(signed_doc(ARTIFACTS), signer)
    verify(data, trusted, now=NOW + timedelta(days=365 * 50))


def test_a_version_below_the_one_already_seen_fails(
    signer: Signer, trusted: list[TrustedKey]
) -> None:
    data = sign_manifest(signed_doc(ARTIFACTS, version=4), signer)
    verify(data, trusted, min_version=4)
    verify(data, trusted, min_version=1)
    rejected(data, trusted, "rollback", min_version=5)


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/etc/passwd", "plain relative path"),
        ("../outside.bin", "plain relative path"),
        ("index/../../outside.bin", "plain relative path"),
        ("engines\\vpr.onnx", "plain relative path"),
        ("engines//vpr.onnx", "plain relative path"),
        ("./engines/vpr.onnx", "plain relative path"),
        ("Manifest.json", "reserved"),
        (".staging/x.bin", "reserved"),
        (".build.lock", "reserved"),
        ("", "path"),
    ],
)
def test_artifact_paths_escaping_the_cache_or_naming_reserved_entries_fail(
    signer: Signer, trusted: list[TrustedKey], path: str, fragment: str
) -> None:
    def change(signed: dict[str, Any]) -> None:
        signed["artifacts"][0]["path"] = path

    data = resigned(signed_doc(ARTIFACTS), change, signer)
    rejected(data, trusted, fragment)


def test_artifact_path_dot_fails_verification(signer: Signer, trusted: list[TrustedKey]) -> None:
    def change(signed: dict[str, Any]) -> None:
        signed["artifacts"][0]["path"] = "."

    rejected(resigned(signed_doc(ARTIFACTS), change, signer), trusted, "path")


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("size", -1, "size"),
        ("size", "12", "size"),
        ("sha256", "A" * 64, "sha256"),
        ("sha256", "1" * 63, "sha256"),
        ("kind", None, "kind"),
    ],
)
def test_malformed_artifact_entries_fail_even_when_signed(
    signer: Signer, trusted: list[TrustedKey], field: str, value: Any, fragment: str
) -> None:
    def change(signed: dict[str, Any]) -> None:
        signed["artifacts"][0][field] = value

    rejected(resigned(signed_doc(ARTIFACTS), change, signer), trusted, fragment)


def test_an_artifact_listed_twice_fails_even_when_signed(
    signer: Signer, trusted: list[TrustedKey]
) -> None:
    def change(signed: dict[str, Any]) -> None:
        signed["artifacts"].append(dict(signed["artifacts"][0]))

    rejected(resigned(signed_doc(ARTIFACTS), change, signer), trusted, "listed twice")


@pytest.mark.parametrize(
    ("field", "value"),
    [("version", 0), ("version", "2"), ("version", True), ("created_at", "yesterday")],
)
def test_malformed_version_or_time_fails_even_when_signed(
    signer: Signer, trusted: list[TrustedKey], field: str, value: Any
) -> None:
    data = resigned(signed_doc(ARTIFACTS), lambda s: s.update({field: value}), signer)
    rejected(data, trusted, field)


def test_a_keyid_hint_naming_another_key_does_not_matter(signer: Signer) -> None:
    other = new_signer()
    data = sign_manifest(signed_doc(ARTIFACTS), signer)
    for hint in (other.keyid, "0" * 64, "not even hex"):
        hinted = edit(data, lambda d, h=hint: d["signatures"][0].update(keyid=h))
        manifest = verify(hinted, trust_for(other, signer))
        assert manifest.keyid == signer.keyid
        # A hint naming a trusted key does not make another key's signature trusted.
        with pytest.raises(VerificationError):
            verify(hinted, trust_for(other))


def test_any_trusted_key_in_a_multi_key_store_verifies(signer: Signer) -> None:
    others = [new_signer() for _ in range(3)]
    data = sign_manifest(signed_doc(ARTIFACTS), signer)
    manifest = verify(data, trust_for(*others[:2], signer, others[2]))
    assert manifest.keyid == signer.keyid


def test_nan_in_the_signed_part_fails(signer: Signer, trusted: list[TrustedKey]) -> None:
    data = sign_manifest(signed_doc(ARTIFACTS), signer)
    text = data.decode().replace('"tile_count": 3', '"tile_count": NaN')
    with pytest.raises(VerificationError):
        verify(text.encode(), trusted)
