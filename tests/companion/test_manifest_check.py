"""After a build on the companion, its manifest is read back and checked here: signed by
a key of the workstation's trust store, of the build that was sent. A companion whose
tool forges its reports is caught (a real SSH server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from takeoff_cache.companion.bringup import CompanionPaths
from takeoff_cache.companion.session import MANIFEST_LIMIT, build_on_companion
from takeoff_cache.errors import EXIT_COMPANION, CompanionManifestError, InvalidRequestError
from takeoff_cache.trust.keys import generate_keypair
from tests.companion.test_companion import Rig, demo_request
from tests.conftest import Demo


def _forging(rig: Rig) -> str:
    """A takeoff-cache that answers bring-up truly, but says it built and verified
    without doing either: a wrapper that forges those two reports."""
    built = {"outcome": "success", "tiles": 999999, "build_identity": None}
    verified = {"ok": True, "version": 1, "artifacts": 3, "problems": []}
    wrapper = rig.tool_bin / "forger"
    wrapper.write_text(
        "#!/bin/bash\n"
        f"if [ \"$1\" = build ]; then echo '{json.dumps(built)}'; exit 0; fi\n"
        f"if [ \"$1\" = verify ]; then echo '{json.dumps(verified)}'; exit 0; fi\n"
        'exec takeoff-cache "$@"\n'
    )
    wrapper.chmod(0o755)
    return "forger"


def _build(rig: Rig, demo: Demo, tiles: Any = None, **extra: Any) -> Any:
    request, selected = demo_request(demo)
    options: dict[str, Any] = {"backend": "onnxruntime", "trust": rig.workstation_trust}
    options.update(extra)
    paths = options.pop("paths", rig.companion.paths)
    return asyncio.run(
        build_on_companion(
            rig.settings(), request, selected if tiles is None else tiles(selected), paths,
            **options,
        )
    )  # fmt: skip


def _caught(call: Any) -> str:
    with pytest.raises(CompanionManifestError) as caught:
        call()
    message = str(caught.value)
    assert caught.value.exit_code == EXIT_COMPANION and "\n" not in message
    return message


def test_a_forged_success_without_a_build_is_caught(rig: Rig, demo: Demo) -> None:
    (rig.companion.root / "empty-cache").mkdir()
    paths = CompanionPaths("~/empty-cache", "~/operator.key", "~/trust", "~/work", "~/inputs")
    message = _caught(lambda: _build(rig, demo, tool=_forging(rig), paths=paths))
    assert "left no" in message and "Manifest.json" in message


def test_a_manifest_of_another_build_or_key_is_caught(rig: Rig, demo: Demo) -> None:
    first = _build(rig, demo)
    assert first.build["outcome"] == "success"
    assert first.verify["workstation"]["ok"] is True
    # The forger says it built fewer tiles; the manifest there is the first build's.
    message = _caught(lambda: _build(rig, demo, tiles=lambda t: t[:-3], tool=_forging(rig)))
    assert "not of the build sent" in message
    # A workstation trust store without the companion's key: its signature is refused.
    stranger = rig.client_dir / "stranger-trust"
    stranger.mkdir()
    generate_keypair(rig.client_dir / "stranger.key")
    (stranger / "stranger.pub").write_bytes((rig.client_dir / "stranger.key.pub").read_bytes())
    message = _caught(lambda: _build(rig, demo, trust=stranger))
    assert "does not verify with the workstation's trust store" in message


def test_a_manifest_that_is_not_a_small_regular_file_is_caught(rig: Rig, demo: Demo) -> None:
    first = _build(rig, demo)
    manifest = rig.companion.cache / "Manifest.json"
    data = manifest.read_bytes()
    # The forger claims success over a manifest swapped for a huge file: not read whole.
    with manifest.open("r+b") as fh:
        fh.truncate(MANIFEST_LIMIT + 1)
    message = _caught(lambda: _build(rig, demo, tool=_forging(rig)))
    assert "larger than a manifest" in message or "more than a manifest" in message
    manifest.write_bytes(data)
    assert first.build["outcome"] == "success"


def test_no_workstation_trust_store_is_refused_before_connecting(rig: Rig, demo: Demo) -> None:
    with pytest.raises(InvalidRequestError, match="trust"):
        _build(rig, demo, trust=None)
    assert rig.companion.commands == []


def test_a_work_pools_build_on_the_companion_is_checked_the_same_way(rig: Rig, demo: Demo) -> None:
    """``prepare --companion --work-pool``: the pool's worker built there; the verify
    phase reads the manifest back over SSH and checks it as after an SSH build."""
    from takeoff_cache.companion.session import verify_on_companion

    first = _build(rig, demo)
    identity = first.verify["workstation"]["build_identity"]
    paths = first.bring_up.paths  # as bring-up found them there (~ expanded)

    def verify(**extra: Any) -> dict[str, Any]:
        call = verify_on_companion(rig.settings(), paths, **extra)
        result: dict[str, Any] = asyncio.run(call)
        return result

    checked = verify(trust=rig.workstation_trust, identity=identity)
    assert checked["ok"] and checked["workstation"]["build_identity"] == identity
    message = _caught(lambda: verify(trust=rig.workstation_trust, identity="f" * 64))
    assert "not of the build sent" in message
    stranger = rig.client_dir / "stranger-trust"
    stranger.mkdir()
    generate_keypair(rig.client_dir / "stranger.key")
    (stranger / "stranger.pub").write_bytes((rig.client_dir / "stranger.key.pub").read_bytes())
    message = _caught(lambda: verify(trust=stranger, identity=identity))
    assert "does not verify with the workstation's trust store" in message
    assert "workstation" not in verify()  # without a trust store: the companion's word only
