"""The corpus watcher's check (takeoff_cache.build.watch), on a real demo corpus and cache."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from takeoff_cache.build.request import parse_request, read_request_file
from takeoff_cache.build.watch import check_corpus
from takeoff_cache.tiles.corpus import select_tiles
from takeoff_cache.trust.keys import TrustedKey, key_id
from tests.conftest import Demo
from tests.support.cli import run_cli
from tests.support.procs import change_one_tile


def test_cache_without_manifest_is_not_reported_as_changed(demo: Demo) -> None:
    check = check_corpus(parse_request(read_request_file(demo.request)))
    assert not check.has_manifest and not check.changed
    assert check.built_fingerprint is None
    assert check.tile_count == 80
    request = parse_request(read_request_file(demo.request))
    expected = select_tiles(request.corpus, request.bbox.as_tuple(), request.zoom_levels)
    assert check.fingerprint == expected.fingerprint


@pytest.mark.usefixtures("prefect_harness")
def test_changed_tile_is_reported_and_untrusted_manifest_is_ignored(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    assert run_cli(capsys, *demo.build_args()).code == 0
    request = parse_request(read_request_file(demo.request))
    built = json.loads((demo.cache / "Manifest.json").read_text())["signed"]["corpus"]

    unchanged = check_corpus(request)
    assert unchanged.has_manifest and not unchanged.changed
    assert unchanged.built_fingerprint == built["fingerprint"] == unchanged.fingerprint
    assert unchanged.manifest_version == 1

    change_one_tile(demo.root)
    changed = check_corpus(request)
    assert changed.changed
    assert changed.built_fingerprint == built["fingerprint"] != changed.fingerprint
    assert changed.tile_count == changed.built_tile_count == 80

    # A manifest signed by a key outside the trust store says nothing about the build.
    stranger = Ed25519PrivateKey.generate().public_key()
    other = check_corpus(request, [TrustedKey(key_id(stranger), stranger, "stranger.pub")])
    assert not other.has_manifest and not other.changed
