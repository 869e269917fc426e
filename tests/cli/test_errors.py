"""Bad input through the CLI: one clear line on stderr, the documented exit code, no traceback,
and the cache built before still verifies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from takeoff_cache.trust.keys import generate_keypair, load_trust_store
from takeoff_cache.trust.verify import verify_cache
from tests.conftest import Demo
from tests.support.cli import CliResult, run_cli
from tests.support.procs import hold_lock

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def built(capsys: pytest.CaptureFixture[str], demo: Demo) -> Demo:
    result = run_cli(capsys, *demo.build_args())
    assert result.code == 0, result.err
    return demo


def snapshot(cache: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(cache)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(cache.rglob("*"))
        if p.is_file()
    }


def assert_refused(result: CliResult, code: int, *words: str) -> None:
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err and "Traceback" not in result.out
    assert len(result.err_lines) == 1, result.err
    for word in words:
        assert word in result.err_lines[0], result.err_lines[0]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--bbox", "86,35,87,36"], ["bbox", "lat_min"]),
        (["--bbox", "48,200,49,201"], ["bbox", "lon_min"]),
        (["--bbox", "48.5,35,48.4,36"], ["bbox", "below"]),
        (["--bbox", "48,35,49"], ["bbox", "4 numbers"]),
        (["--zoom", ""], ["zoom_levels", "empty"]),
        (["--zoom", "16,23"], ["zoom_levels", "23"]),
        (["--zoom", "-1"], ["zoom_levels"]),
        (["--sector", "frontline"], ["sector_class"]),
        (["--precision", "fp64"], ["precision"]),
        (["--precision", "int8"], ["precision", "calibration"]),
        (["--flight-id", "not-a-uuid"], ["flight_id"]),
        (["--corpus", "/nonexistent/corpus.mbtiles"], ["corpus", "does not exist"]),
        (["--backend", "cuda"], ["backend"]),
        (["--coverage", "loose"], ["coverage"]),
    ],
)
def test_invalid_request_is_refused_with_exit_2_and_cache_kept(
    capsys: pytest.CaptureFixture[str], built: Demo, flags: list[str], words: list[str]
) -> None:
    before = snapshot(built.cache)
    result = run_cli(capsys, *built.build_args(*flags))
    assert_refused(result, 2, *words)
    assert snapshot(built.cache) == before
    verify_cache(built.cache, load_trust_store(built.trust))


def test_bad_fields_and_a_missing_file_are_named_in_one_try(
    capsys: pytest.CaptureFixture[str], built: Demo, tmp_path: Path
) -> None:
    flags = ("--bbox", "95,0,96,1", "--zoom", "40", "--key", str(tmp_path / "none.key"))
    result = run_cli(capsys, *built.build_args(*flags))
    assert result.code == 2, result.err
    assert [line.split(":")[2].strip() for line in result.err_lines] == [
        "bbox",
        "zoom_levels",
        "key",
    ]


def test_corpus_without_tiles_in_bbox_ends_failure_with_download_hint(
    capsys: pytest.CaptureFixture[str], built: Demo
) -> None:
    result = run_cli(capsys, *built.build_args("--bbox", "10,10,10.1,10.1", "--json"))
    assert_refused(result, 3, "download tiles")
    report = result.json()
    assert report["outcome"] == "failure" and "download tiles" in report["failure_reason"]
    verify_cache(built.cache, load_trust_store(built.trust))


def test_missing_cache_root_is_refused_and_not_created(
    capsys: pytest.CaptureFixture[str], demo: Demo, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-cache"
    result = run_cli(capsys, *demo.build_args("--cache-root", str(missing)))
    assert_refused(result, 2, "cache_root", "does not exist")
    assert not missing.exists()


def test_untrusted_key_stops_build_with_zero_files_written(
    capsys: pytest.CaptureFixture[str], demo: Demo, tmp_path: Path
) -> None:
    rogue = tmp_path / "rogue.key"
    generate_keypair(rogue)
    result = run_cli(capsys, *demo.build_args("--key", str(rogue)))
    assert_refused(result, 6, "not in the trust store")
    assert list(demo.cache.iterdir()) == []
    assert not demo.work.exists() or not any(demo.work.rglob("*.onnx"))


def test_group_readable_key_is_refused(capsys: pytest.CaptureFixture[str], demo: Demo) -> None:
    os.chmod(demo.root / "operator.key", 0o640)
    result = run_cli(capsys, *demo.build_args())
    assert_refused(result, 6, "chmod 600")
    assert list(demo.cache.iterdir()) == []


def test_lock_held_by_another_process_fails_fast_with_exit_4(
    capsys: pytest.CaptureFixture[str], built: Demo
) -> None:
    holder = hold_lock(built.cache / ".build.lock")
    try:
        before = snapshot(built.cache)
        start = time.monotonic()
        result = run_cli(capsys, *built.build_args("--zoom", "16"))
        assert time.monotonic() - start < 30
        assert_refused(result, 4, ".build.lock")
        assert snapshot(built.cache) == before
    finally:
        holder.kill()
        holder.wait()
    verify_cache(built.cache, load_trust_store(built.trust))
    # The kernel released the killed holder's lock: the next build runs.
    assert run_cli(capsys, *built.build_args("--zoom", "16")).code == 0


def test_a_run_started_by_prefect_is_refused_by_its_own_lock_phase(built: Demo) -> None:
    """A deployment run has no command line to take the lock early: its lock phase refuses."""
    from takeoff_cache_prefect.flows.build import build_cache

    from takeoff_cache.build.request import read_request_file
    from takeoff_cache.errors import LockHeldError

    holder = hold_lock(built.cache / ".build.lock")
    try:
        before = snapshot(built.cache)
        params = read_request_file(built.request)
        state = build_cache(**params, work_dir=str(built.work), return_state=True)
        assert state.is_failed()
        with pytest.raises(LockHeldError, match="another build holds"):
            state.result()
        assert snapshot(built.cache) == before
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_phase_adopts_the_lock_the_command_line_took(
    capsys: pytest.CaptureFixture[str], built: Demo
) -> None:
    from takeoff_cache.build.lock import BuildLock, adopt_or_acquire

    with BuildLock(built.cache).acquire() as early:
        assert early.held
        # Handed over, the lock this process holds is adopted, not opened twice.
        assert adopt_or_acquire(BuildLock(built.cache), (early,)) is early
        # Held by this process: another process is refused.
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent(f"""
                import sys
                from filelock import FileLock, Timeout
                try:
                    FileLock({str(early.path)!r}, fallback_to_soft=False).acquire(timeout=0)
                except Timeout:
                    sys.exit(4)
            """),
            ],
            check=False,
        )
        assert probe.returncode == 4
    assert not early.held


def test_unlisted_file_aborts_with_exit_5_and_previous_manifest_stays(
    capsys: pytest.CaptureFixture[str], built: Demo
) -> None:
    manifest = (built.cache / "Manifest.json").read_bytes()
    (built.cache / "notes.txt").write_text("left by hand")
    result = run_cli(capsys, *built.build_args("--zoom", "16"))
    assert_refused(result, 5, "notes.txt")
    assert (built.cache / "Manifest.json").read_bytes() == manifest
    assert not (built.cache / ".staging").exists()
    (built.cache / "notes.txt").unlink()
    verify_cache(built.cache, load_trust_store(built.trust))


def test_lenient_coverage_warns_and_builds(capsys: pytest.CaptureFixture[str], built: Demo) -> None:
    (built.cache / "notes.txt").write_text("left by hand")
    result = run_cli(capsys, *built.build_args("--zoom", "16", "--coverage", "lenient", "--json"))
    assert result.code == 0
    assert any("notes.txt" in w for w in result.json()["warnings"])


def test_usage_error_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "build", "--no-such-flag")
    assert_refused(result, 2, "usage")


def test_verify_of_tampered_cache_exits_7_one_line_per_problem(
    capsys: pytest.CaptureFixture[str], built: Demo
) -> None:
    signed = json.loads((built.cache / "Manifest.json").read_text())["signed"]
    for artifact in signed["artifacts"][:2]:
        path = built.cache / artifact["path"]
        path.write_bytes(path.read_bytes() + b"x")
    (built.cache / "extra.bin").write_bytes(b"x")
    result = run_cli(capsys, "verify", str(built.cache), "--trust", str(built.trust))
    assert result.code == 7
    assert len(result.err_lines) == 3, result.err
    assert "Traceback" not in result.err


def test_verify_of_good_cache_exits_0(capsys: pytest.CaptureFixture[str], built: Demo) -> None:
    result = run_cli(
        capsys, "verify", str(built.cache), "--trust", str(built.trust), "--json", "--host-check"
    )
    assert result.code == 0, result.err
    assert result.json()["ok"] is True
