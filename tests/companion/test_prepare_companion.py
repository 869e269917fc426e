"""`takeoff-cache prepare --companion`: the workstation resolves and selects, a real SSH
server on 127.0.0.1 stands in for the companion, which builds and verifies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from takeoff_cache.trust.keys import generate_keypair
from tests.companion.test_companion import SECRETS, Rig
from tests.conftest import Demo
from tests.support.cli import CliResult, run_cli
from tests.support.companion import tree_bytes

pytestmark = pytest.mark.usefixtures("prefect_harness")

PLAN = Path(__file__).parents[1] / "data" / "flights" / "survey_corridor.plan"


@pytest.fixture
def rig(tmp_path: Path, prefect_server: Any) -> Iterator[Rig]:
    env = {**prefect_server.env(), **SECRETS}
    # The companion's run logs are its progress lines: let its console show them.
    env.pop("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", None)
    rig = Rig(tmp_path, env)
    try:
        yield rig
    finally:
        rig.close()


def request_file(demo: Demo, companion: str = "") -> Path:
    """The demo's request without what the flight decides, and an optional [companion]."""
    kept = [
        line
        for line in demo.request.read_text().splitlines()
        if not line.startswith(("bbox", "zoom_levels", "takeoff_origin", "flight_id"))
    ]
    path = demo.root / "prepare-companion.toml"
    path.write_text("\n".join(kept) + "\n" + companion)
    return path


def ssh_flags(rig: Rig) -> list[str]:
    return [
        "--known-hosts", str(rig.client_dir / "known_hosts"),
        "--identity", str(rig.client_dir / "id_ed25519"), "--no-agent",
    ]  # fmt: skip


def prepare(
    capsys: pytest.CaptureFixture[str], demo: Demo, request: Path, *extra: str
) -> CliResult:
    return run_cli(
        capsys, "prepare", "--request", str(request), "--work-dir", str(demo.work), "--json",
        "--plan", str(PLAN), "--zoom", "16", "--buffer-m", "100", "--backend", "onnxruntime",
        # Recall@1 is not what these tests judge (tests/prepare/test_readiness.py does).
        "--min-recall", "0", *extra,
    )  # fmt: skip


def companion_flags(rig: Rig, trust: str = "~/trust") -> list[str]:
    return [
        "--companion", f"pilot@127.0.0.1:{rig.companion.port}",
        "--companion-cache-root", "~/cache", "--companion-key", "~/operator.key",
        "--companion-trust", trust, "--companion-work-dir", "~/work",
        "--companion-inputs-dir", "~/inputs", "--trust", str(rig.workstation_trust),
        *ssh_flags(rig),
    ]  # fmt: skip


def test_a_flight_is_built_and_verified_on_the_companion(
    capsys: pytest.CaptureFixture[str], rig: Rig, demo: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    # The build options go with the build: its manifest expires there too.
    # The demo corpus covers part of the corridor: its gaps are accepted knowingly.
    first = prepare(
        capsys, demo, request_file(demo), *companion_flags(rig), "--expires-in", "36h",
        "--allow-gaps",
    )  # fmt: skip
    assert first.code == 0, first.err
    assert any(" build " in c and "--expires-in" in c for c in rig.companion.commands)
    report = first.json()
    assert report["outcome"] == "success" and report["verify"]["ok"] is True
    up, sent = report["companion"]["bring_up"], report["companion"]["transfer"]
    assert up["backend"] == "onnxruntime" and up["host_identity"]
    assert sent["bytes_sent"] > 0 and sent["bytes_skipped"] == 0
    assert report["build"]["tiles"] == report["area"]["tiles"] - report["download"]["missing"]
    assert (rig.companion.cache / "Manifest.json").is_file()
    assert not (demo.cache / "Manifest.json").exists()  # nothing built on the workstation
    # Its manifest was checked here, and its map and report came back here.
    assert report["verify"]["workstation"]["build_identity"] == report["build"]["build_identity"]
    local_map = Path(report["build"]["coverage_map"])
    assert local_map.is_file() and local_map.is_relative_to(demo.work)
    assert report["build"]["coverage_map_there"].startswith(str(rig.companion.root))
    assert json.loads(Path(report["build"]["report_path"]).read_text())["tiles"] > 0
    assert str(local_map) in first.err or str(local_map) in first.out
    assert any(line.startswith("companion: ") for line in first.err_lines), first.err

    # The same from the request file's [companion] table: nothing to send, nothing to build.
    table = (
        "[companion]\n"
        f'target = "pilot@127.0.0.1:{rig.companion.port}"\n'
        'cache_root = "~/cache"\nkey = "~/operator.key"\ntrust = "~/trust"\n'
        'work_dir = "~/work"\ninputs_dir = "~/inputs"\n'
    )
    second = prepare(
        capsys, demo, request_file(demo, table), "--trust", str(rig.workstation_trust),
        "--expires-in", "36h", "--allow-gaps", *ssh_flags(rig),
    )  # fmt: skip
    assert second.code == 0, second.err
    again = second.json()
    assert again["build"]["outcome"] == "idempotent_no_op"
    assert again["companion"]["transfer"]["bytes_sent"] == 0
    assert again["companion"]["transfer"]["bytes_skipped"] == sent["bytes_sent"]
    with capsys.disabled():
        print(
            f"\nprepare --companion, corridor over the demo corpus ({report['build']['tiles']}"
            f" tiles): {sent['bytes_sent']} bytes in {sent['files_sent']} files,"
            f" {sent['elapsed_s']:.3f} s; second run sent 0, skipped {sent['bytes_sent']}"
        )
    seen = "\n".join([first.out, first.err, second.out, second.err, *rig.companion.commands])
    everything = seen.encode() + tree_bytes(rig.companion.root) + tree_bytes(demo.work)
    for value in SECRETS.values():
        assert value.encode() not in everything


def test_an_unknown_companion_host_key_is_refused_with_its_fingerprint(
    capsys: pytest.CaptureFixture[str], rig: Rig, demo: Demo
) -> None:
    (rig.client_dir / "known_hosts").write_text("")
    result = prepare(capsys, demo, request_file(demo), *companion_flags(rig))
    assert result.code == 11, result.err
    assert len(result.err_lines) == 1
    assert rig.host_key.get_fingerprint("sha256") in result.err
    assert result.json()["phase"] == "companion"
    assert rig.companion.commands == []  # refused before any command ran there


def test_a_failing_remote_build_brings_back_its_line_and_code(
    capsys: pytest.CaptureFixture[str], rig: Rig, demo: Demo
) -> None:
    # A trust store there that does not hold the companion's key: its build exits 6.
    other = rig.companion.root / "other-trust"
    other.mkdir()
    generate_keypair(rig.companion.root / "stranger.key")
    (other / "stranger.pub").write_bytes((rig.companion.root / "stranger.key.pub").read_bytes())
    result = prepare(capsys, demo, request_file(demo), *companion_flags(rig, "~/other-trust"))
    assert result.code == 6, result.err
    errors = [line for line in result.err_lines if not line.startswith("companion: ")]
    assert len(errors) == 1 and "trust" in errors[0]
    report = result.json()
    assert report["phase"] == "companion" and report["exit_code"] == 6
    assert not (rig.companion.cache / "Manifest.json").exists()


def test_companion_flags_without_a_companion_are_refused(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    result = prepare(capsys, demo, request_file(demo), "--companion-key", "~/k")
    assert result.code == 2 and "--companion USER@HOST" in result.err
    table = '[companion]\ntarget = "jetson"\ncache_root = "c"\nkey = "k"\ntrust = "t"\n'
    bad = prepare(capsys, demo, request_file(demo, table))
    assert bad.code == 11 and "user@host" in bad.err
    assert json.loads(bad.out)["phase"] == "resolve"
