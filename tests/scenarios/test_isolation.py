"""One cache cannot damage another: every cache holds its own copies of the work folder's files."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from takeoff_cache.core.fsutil import copy_file, sha256_file
from takeoff_cache.core.workdir import engines_dir, indexes_dir
from takeoff_cache.errors import VerificationError
from takeoff_cache.trust.keys import load_trust_store
from takeoff_cache.trust.verify import verify_cache
from tests.conftest import Demo
from tests.support.cli import run_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")


def build(capsys: pytest.CaptureFixture[str], demo: Demo, cache: Path) -> dict:
    result = run_cli(capsys, *demo.build_args("--cache-root", str(cache), "--json"))
    assert result.code == 0, result.err
    report: dict = result.json()
    return report


def store_files(work: Path) -> dict[Path, str]:
    """The work folder's engines (and their records) and indexes, with their digests."""
    files = [
        p
        for folder in (engines_dir(work), indexes_dir(work))
        for p in folder.iterdir()
        if p.is_file() and not p.name.endswith(".lock")
    ]
    return {p: sha256_file(p) for p in files}


def flip_a_byte(path: Path) -> None:
    """Damage ``path`` in place: same inode, same size, one byte different."""
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))


def listed(cache: Path, kind: str) -> Path:
    signed = json.loads((cache / "Manifest.json").read_text())["signed"]
    return cache / next(a["path"] for a in signed["artifacts"] if a["kind"] == kind)


def test_a_cache_damaged_in_place_leaves_the_other_cache_and_the_store_intact(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    first, second = demo.cache, demo.root / "second-cache"
    second.mkdir()
    build(capsys, demo, first)
    build(capsys, demo, second)
    trusted = load_trust_store(demo.trust)
    store = store_files(demo.work)
    assert store
    for path in store:
        assert stat.S_IMODE(path.stat().st_mode) == 0o444, path
    for cache in (first, second):
        for kind in ("engine", "faiss_index", "tile_map"):
            path = listed(cache, kind)
            assert path.stat().st_nlink == 1, f"{path} shares its inode"
            assert stat.S_IMODE(path.stat().st_mode) & stat.S_IWUSR, path

    flip_a_byte(listed(first, "engine"))
    flip_a_byte(listed(first, "faiss_index"))

    with pytest.raises(VerificationError):
        verify_cache(first, trusted)
    verify_cache(second, trusted)
    assert store_files(demo.work) == store

    report = build(capsys, demo, first)
    assert report["outcome"] == "success"
    assert report["engines_built"] == 0  # the store's engines were never damaged
    verify_cache(first, trusted)
    verify_cache(second, trusted)
    assert store_files(demo.work) == store


def test_a_copy_shares_no_inode_and_survives_damage_to_the_source(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 4096)
    dst = tmp_path / "out" / "dst.bin"
    copy_file(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_ino != src.stat().st_ino and src.stat().st_nlink == 1
    flip_a_byte(src)
    assert dst.read_bytes() == bytes(range(256)) * 4096


def test_a_copy_replaces_a_read_only_file(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"new")
    dst = tmp_path / "dst.bin"
    dst.write_bytes(b"old")
    dst.chmod(0o444)
    copy_file(src, dst)
    assert dst.read_bytes() == b"new"
