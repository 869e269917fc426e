"""Mutated manifests: verification either succeeds (only when nothing signed changed) or
raises VerificationError — never another exception.

Three kinds of mutation: structural edits of ``signed`` re-signed with the trusted
key (so the checks after the signature see them), structural edits of the whole
document left unsigned, and raw byte flips, insertions and deletions.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from takeoff_cache.core.layout import MANIFEST_NAME
from takeoff_cache.errors import VerificationError
from takeoff_cache.trust.keys import Signer, TrustedKey
from takeoff_cache.trust.manifest import Manifest, sign_manifest, verify_manifest_bytes
from takeoff_cache.trust.verify import verify_cache
from tests.support.factories import HOST, make_cache, new_signer, trust_for

FILES = {
    "engines/vpr.onnxruntime.fp32.aaaa.onnx": b"engine " * 40,
    "index/vpr.1111.faiss": b"index " * 30,
    "index/vpr.1111.tiles.json": b'{"rows": []}',
}
EXAMPLES = {"resigned": 900, "unsigned": 500, "bytes": 700}
# Hypothesis warns when the global random state moves while it draws. Our strategies
# never touch it, but other threads of the test session do: the websockets client
# under Prefect's event worker pays each keepalive ping with random.getrandbits.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)
SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    "database": None,
}

# Strings a hostile or broken manifest might carry, beyond what st.text() draws.
NASTY = st.sampled_from(
    [
        "",
        ".",
        "..",
        "../x",
        "/etc/passwd",
        "a\x00b",
        "a" * 5000,
        "engines/" + "b" * 300 + "/x",
        "\udc80",
        "Manifest.json",
        ".staging/Manifest.pending.json",
        "engines",
        "0" * 64,
        "2026-01-01T00:00:00Z",
        "1999-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
        "takeoff-cache-manifest",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | NASTY
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6) | NASTY, inner, max_size=3)
    ),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Signer, list[TrustedKey], bytes]:
    signer = new_signer()
    root = tmp_path_factory.mktemp("fuzz") / "cache"
    data = make_cache(root, signer, FILES)
    return root, signer, trust_for(signer), data


def same(a: Any, b: Any) -> bool:
    """Equal as JSON: ``==`` alone calls true equal to 1 and 1.0 equal to 1."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def mutate(data: st.DataObject, value: Any) -> Any:
    """Return ``value`` with one edit somewhere inside it (or at its top)."""
    if isinstance(value, dict) and value and data.draw(st.integers(0, 9)) < 8:
        key = data.draw(st.sampled_from(sorted(value)))
        value[key] = mutate(data, value[key])
        return value
    if isinstance(value, list) and value and data.draw(st.integers(0, 9)) < 8:
        i = data.draw(st.integers(0, len(value) - 1))
        value[i] = mutate(data, value[i])
        return value
    op = data.draw(st.sampled_from(["drop", "insert", "retype", "change"]))
    if op == "drop" and isinstance(value, dict) and value:
        del value[data.draw(st.sampled_from(sorted(value)))]
    elif op == "drop" and isinstance(value, list) and value:
        del value[data.draw(st.integers(0, len(value) - 1))]
    elif op == "insert" and isinstance(value, dict):
        value[data.draw(st.text(max_size=8) | NASTY)] = data.draw(JSON)
    elif op == "insert" and isinstance(value, list):
        value.insert(data.draw(st.integers(0, len(value))), data.draw(JSON))
    elif op == "change" and isinstance(value, bool):
        return not value
    elif op == "change" and isinstance(value, int):
        return value + data.draw(st.integers(-3, 3))
    elif op == "change" and isinstance(value, str):
        return data.draw(NASTY | st.just(value + data.draw(st.text(max_size=3))))
    else:
        return data.draw(JSON)
    return value


def check(world: tuple[Path, Signer, list[TrustedKey], bytes], blob: bytes) -> Manifest | None:
    """Verify ``blob`` alone and as the cache's Manifest.json; only our error may escape."""
    root, _, trusted, _ = world
    try:
        alone: Manifest | None = verify_manifest_bytes(blob, trusted)
    except VerificationError:
        alone = None
    (root / MANIFEST_NAME).write_bytes(blob)
    for host in (None, HOST):
        with contextlib.suppress(VerificationError):
            verify_cache(root, trusted, host=host)
    return alone


@pytest.fixture(autouse=True)
def restore(world: tuple[Path, Signer, list[TrustedKey], bytes]) -> Any:
    yield
    root, _, _, original = world
    (root / MANIFEST_NAME).write_bytes(original)


@settings(max_examples=EXAMPLES["resigned"], **SETTINGS)
@given(data=st.data())
def test_resigned_structural_mutations_raise_only_verification_errors(
    world: tuple[Path, Signer, list[TrustedKey], bytes], data: st.DataObject
) -> None:
    _, signer, _, original = world
    signed = json.loads(original)["signed"]
    mutated = copy.deepcopy(signed)
    # Half the edits land in the artifact list, where verify touches the disk.
    where = data.draw(st.sampled_from(["anywhere", "artifacts", "artifact field"]))
    if where == "anywhere":
        mutated = mutate(data, mutated)
    elif where == "artifacts":
        mutated["artifacts"] = mutate(data, mutated["artifacts"])
    else:
        entry = data.draw(st.sampled_from(mutated["artifacts"]))
        entry[data.draw(st.sampled_from(sorted(entry)))] = data.draw(NASTY | JSON)
    try:
        blob = sign_manifest(mutated, signer)
    except Exception:  # a value that cannot be canonicalized cannot be signed either
        return
    result = check(world, blob)
    if same(mutated, signed):
        assert result is not None
    if result is not None:
        assert same(result.signed, mutated)


@settings(max_examples=EXAMPLES["unsigned"], **SETTINGS)
@given(data=st.data())
def test_unsigned_structural_mutations_raise_only_verification_errors(
    world: tuple[Path, Signer, list[TrustedKey], bytes], data: st.DataObject
) -> None:
    original = json.loads(world[3])
    mutated = mutate(data, copy.deepcopy(original))
    blob = json.dumps(mutated, ensure_ascii=False).encode("utf-8", "surrogatepass")
    result = check(world, blob)
    if result is not None:
        # Nothing that is signed may change without the signature failing.
        assert same(result.signed, original["signed"])


@settings(max_examples=EXAMPLES["bytes"], **SETTINGS)
@given(data=st.data())
def test_byte_mutations_raise_only_verification_errors(
    world: tuple[Path, Signer, list[TrustedKey], bytes], data: st.DataObject
) -> None:
    original = world[3]
    blob = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        at = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if op == "flip" and blob:
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif blob:
            del blob[at : at + data.draw(st.integers(1, 8))]
    result = check(world, bytes(blob))
    if bytes(blob) == original:
        assert result is not None
    if result is not None:
        assert same(result.signed, json.loads(original)["signed"])


def test_the_fuzzed_cache_verifies_untouched(
    world: tuple[Path, Signer, list[TrustedKey], bytes],
) -> None:
    root, _, trusted, _ = world
    assert verify_cache(root, trusted).version == 1


@pytest.mark.parametrize(
    "blob",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"signed": ' + b"[" * 100_000 + b"]" * 100_000 + b', "signatures": []}',
    ],
)
def test_deeply_nested_json_is_a_verification_error(
    world: tuple[Path, Signer, list[TrustedKey], bytes], blob: bytes
) -> None:
    with pytest.raises(VerificationError, match="nested too deeply"):
        verify_manifest_bytes(blob, world[2])


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_a_format_version_equal_to_1_but_not_the_integer_1_is_unknown(
    world: tuple[Path, Signer, list[TrustedKey], bytes], version: object
) -> None:
    _, signer, trusted, original = world
    signed = {**json.loads(original)["signed"], "format_version": version}
    with pytest.raises(VerificationError, match="format_version"):
        verify_manifest_bytes(sign_manifest(signed, signer), trusted)


@pytest.mark.parametrize("path", ["a\x00b", "x" * 5000, "engines/" + "b" * 300 + "/x"])
def test_a_signed_path_the_os_cannot_look_up_is_a_verification_problem(
    world: tuple[Path, Signer, list[TrustedKey], bytes], path: str
) -> None:
    root, signer, trusted, original = world
    signed = json.loads(original)["signed"]
    signed["artifacts"][0]["path"] = path
    (root / MANIFEST_NAME).write_bytes(sign_manifest(signed, signer))
    with pytest.raises(VerificationError) as caught:
        verify_cache(root, trusted)
    assert any("cannot be checked" in p for p in caught.value.problems), caught.value.problems
