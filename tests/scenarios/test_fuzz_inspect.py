"""Mangled manifests through ``takeoff-cache inspect``: a summary or one ``inspect:`` line
per problem with exit 7 — never an internal error.

The mutations are those that fuzz the manifest parser (test_fuzz_manifest.py). A
re-signed manifest that inspect shows must also pass verification's checks but
expiry: both read through one parser.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from takeoff_cache.core.layout import MANIFEST_NAME
from takeoff_cache.errors import VerificationError
from takeoff_cache.trust.keys import Signer, TrustedKey
from takeoff_cache.trust.manifest import parse_manifest_bytes, sign_manifest, verify_manifest_bytes
from tests.scenarios.test_fuzz_manifest import FILES, NASTY, SETTINGS, mutate
from tests.support.cli import CliResult, run_cli
from tests.support.factories import make_cache, new_signer, trust_for

EXAMPLES = {"resigned": 300, "unsigned": 200, "bytes": 200}
World = tuple[Path, Signer, list[TrustedKey], bytes]
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    signer = new_signer()
    root = tmp_path_factory.mktemp("fuzz-inspect") / "cache"
    data = make_cache(root, signer, FILES)
    return root, signer, trust_for(signer), data


@pytest.fixture(autouse=True)
def restore(world: World) -> object:
    yield
    (world[0] / MANIFEST_NAME).write_bytes(world[3])


def inspect(capsys: pytest.CaptureFixture[str], world: World, blob: bytes) -> CliResult:
    """Inspect ``blob`` as the cache's manifest; check the one-line-per-problem contract."""
    root = world[0]
    (root / MANIFEST_NAME).write_bytes(blob)
    result = run_cli(capsys, "inspect", str(root))
    assert result.code in (0, 7), (result.code, result.err)
    assert "Traceback" not in result.err + result.out
    if result.code == 0:
        assert result.err == "" and "artifacts:" in result.out
        return result
    assert result.out == ""
    try:
        parse_manifest_bytes(blob)
    except VerificationError as exc:
        expected = len(exc.problems)
    else:
        raise AssertionError(f"inspect failed where the parser did not: {result.err}")
    assert len(result.err_lines) == expected, result.err
    for line in result.err_lines:
        assert line.startswith("takeoff-cache: inspect: "), line
    return result


@settings(max_examples=EXAMPLES["resigned"], **SETTINGS)
@given(data=st.data())
def test_resigned_structural_mutations(
    capsys: pytest.CaptureFixture[str], world: World, data: st.DataObject
) -> None:
    _, signer, trusted, original = world
    mutated = copy.deepcopy(json.loads(original)["signed"])
    where = data.draw(st.sampled_from(["anywhere", "artifacts", "artifact field"]))
    if where == "anywhere":
        mutated = mutate(data, mutated)
    elif where == "artifacts":
        mutated["artifacts"] = mutate(data, mutated["artifacts"])
    else:
        entry = data.draw(st.sampled_from(mutated["artifacts"]))
        entry[data.draw(st.sampled_from(sorted(entry)))] = data.draw(NASTY)
    try:
        blob = sign_manifest(mutated, signer)
    except Exception:  # a value that cannot be canonicalized cannot be signed either
        return
    shown = inspect(capsys, world, blob).code == 0
    try:
        verify_manifest_bytes(blob, trusted, check_expiry=False)
        verified = True
    except VerificationError:
        verified = False
    assert shown == verified


@settings(max_examples=EXAMPLES["unsigned"], **SETTINGS)
@given(data=st.data())
def test_unsigned_structural_mutations(
    capsys: pytest.CaptureFixture[str], world: World, data: st.DataObject
) -> None:
    mutated = mutate(data, copy.deepcopy(json.loads(world[3])))
    inspect(capsys, world, json.dumps(mutated).encode())


@settings(max_examples=EXAMPLES["bytes"], **SETTINGS)
@given(data=st.data())
def test_byte_mutations(
    capsys: pytest.CaptureFixture[str], world: World, data: st.DataObject
) -> None:
    blob = bytearray(world[3])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        at = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if op == "flip" and blob:
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif blob:
            del blob[at : at + data.draw(st.integers(1, 8))]
    inspect(capsys, world, bytes(blob))
