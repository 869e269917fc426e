"""The corpus a work folder downloads into is found again offline, and its lock is
the corpus file's, whatever the work folder; a full disk is one line."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from takeoff_cache.errors import CacheIOError, CorpusError, LockHeldError
from takeoff_cache.prepare import job as p
from takeoff_cache.prepare.download import DownloadOptions, download_tiles
from takeoff_cache.prepare.tileserver import TileSource
from takeoff_cache.tiles.corpus import open_corpus
from tests.support.procs import hold_lock
from tests.support.tileserver import TileServer, tile_server

PLAN = Path(__file__).parents[1] / "data" / "flights" / "survey_corridor.plan"


@pytest.fixture
def server() -> Iterator[TileServer]:
    with tile_server() as state:
        yield state


def plan(work: Path, tiles_url: str | None = None, corpus: Path | None = None) -> p.Job:
    return p.plan_job(
        plan=PLAN,
        zoom_levels="16",
        buffer_m=100.0,
        tiles_url=tiles_url,
        corpus=corpus,
        work_dir=work,
    )


def test_a_rerun_without_a_tiles_url_finds_what_was_downloaded(
    tmp_path: Path, server: TileServer
) -> None:
    work = tmp_path / "work"
    online = plan(work, server.template)
    assert online.corpus == work / "tiles" / "tiles.mbtiles"
    assert p.dry_run(online.corpus, online.mission, online.options)["to_fetch"] == len(
        set(online.mission.tiles)
    )
    fetched = p.fetch_tiles(online.corpus, online.mission, online.source, online.options)
    assert fetched["fetched"] == len(set(online.mission.tiles)) and fetched["failed_count"] == 0
    offline = plan(work)  # in the field: no --tiles-url
    assert offline.corpus == online.corpus
    # The dry run agrees with the run it predicts: nothing to fetch, nothing missing.
    assert p.dry_run(offline.corpus, offline.mission, offline.options)["to_fetch"] == 0
    assert p.fetch_tiles(offline.corpus, offline.mission, None, offline.options)["missing"] == 0
    assert not p.downloads(offline) and not p.downloads(plan(work, server.template))


def test_a_corpus_named_after_its_host_by_an_older_release_is_still_found(
    tmp_path: Path, server: TileServer
) -> None:
    work = tmp_path / "work"
    old = work / "tiles" / f"127-0-0-1-{server.port}.mbtiles"
    old.parent.mkdir(parents=True)
    job = plan(work, server.template, corpus=old)
    p.fetch_tiles(job.corpus, job.mission, job.source, job.options)
    assert plan(work, server.template).corpus == old
    offline = plan(work)
    assert offline.corpus == old
    assert p.dry_run(offline.corpus, offline.mission, offline.options)["to_fetch"] == 0
    # A second one: offline, which is meant cannot be told.
    (work / "tiles" / "other-host.mbtiles").touch()
    with pytest.raises(CorpusError, match=r"holds several corpora .* name one with --corpus"):
        plan(work)
    assert plan(work, server.template).corpus == old


def test_two_work_folders_writing_one_corpus_meet_at_its_lock(
    tmp_path: Path, server: TileServer
) -> None:
    corpus = tmp_path / "shared" / "tiles.mbtiles"
    first = plan(tmp_path / "work-a", server.template, corpus=corpus)
    second = plan(tmp_path / "work-b", server.template, corpus=tmp_path / "link" / "tiles.mbtiles")
    (tmp_path / "link").symlink_to(tmp_path / "shared")  # the same file, another path
    lock_a = p.workstation_lock(first.work, first.corpus)
    lock_b = p.workstation_lock(second.work, second.corpus)
    assert lock_a.path == lock_b.path == corpus.with_name("tiles.mbtiles.lock")
    holder = hold_lock(lock_a.path)  # a prepare in another process, downloading
    try:
        with pytest.raises(LockHeldError) as info, p.corpus_lock(second):
            pass
        assert info.value.exit_code == 4 and str(corpus.resolve()) in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    with p.corpus_lock(second) as held:
        assert [lock.path for lock in held] == [lock_a.path]


def test_runs_that_only_read_a_corpus_take_no_lock(tmp_path: Path, server: TileServer) -> None:
    corpus = tmp_path / "shared" / "tiles.mbtiles"
    job = plan(tmp_path / "work-a", server.template, corpus=corpus)
    p.fetch_tiles(job.corpus, job.mission, job.source, job.options)
    holder = hold_lock(p.workstation_lock(job.work, corpus).path)
    try:
        for reader in (
            plan(tmp_path / "work-b", server.template, corpus=corpus),
            plan(tmp_path / "work-c", corpus=corpus),
        ):
            with p.corpus_lock(reader) as held:
                assert held == ()
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system (tmpfs): where mounting is not allowed, skipped."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_keeps_the_committed_tiles(
    small_disk: Path, server: TileServer
) -> None:
    corpus = small_disk / "c.mbtiles"
    tiles = [(16, 39_000 + x, 22_000 + y) for x in range(8) for y in range(8)]
    options = DownloadOptions(failing_share=1.0)
    with pytest.raises(CacheIOError) as info:
        download_tiles(corpus, tiles, TileSource(server.template), options)
    message = str(info.value)
    assert "no space left on its device" in message and str(corpus) in message
    assert "\n" not in message and info.value.exit_code == 1
    with open_corpus(corpus):  # what was committed before is a corpus every reader opens
        pass
    assert os.statvfs(small_disk).f_bfree * os.statvfs(small_disk).f_frsize < 256 << 10
