"""The build flow end to end through the CLI, on the real Prefect API (test harness)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import pytest
from prefect.artifacts import Artifact

from takeoff_cache.demo.synthetic import replace_tile_bytes
from takeoff_cache.localize.selftest import view_space
from takeoff_cache.trust.keys import load_trust_store
from takeoff_cache.trust.verify import verify_cache
from takeoff_cache_prefect.artifacts import artifact_key
from tests.conftest import Demo
from tests.support.cli import run_cli
from tests.support.procs import change_one_tile

pytestmark = pytest.mark.usefixtures("prefect_harness")

PHASES = {
    "validate",
    "lock",
    "select",
    "identity",
    "noop",
    "staging",
    "engines",
    "descriptors",
    "features",
    "self_test",
    "readiness",
    "manifest",
    "coverage",
    "commit",
    "prune",
}


def build(capsys: pytest.CaptureFixture[str], demo: Demo, *extra: str) -> dict:
    result = run_cli(capsys, *demo.build_args("--json", *extra))
    assert result.code == 0, result.err
    return result.json()


def manifest_of(demo: Demo) -> dict:
    return json.loads((demo.cache / "Manifest.json").read_text())["signed"]


def test_first_build_succeeds_and_verifies(capsys: pytest.CaptureFixture[str], demo: Demo) -> None:
    report = build(capsys, demo)
    assert report["outcome"] == "success"
    assert report["engines_built"] == 2 and report["engines_reused"] == 0
    assert report["tiles"] == 80
    assert report["descriptors_generated"] == 80 and report["descriptors_reused"] == 0
    assert set(report["phases"]) == PHASES
    assert report["manifest_path"] == str(demo.cache / "Manifest.json")
    manifest = verify_cache(demo.cache, load_trust_store(demo.trust))
    assert manifest.build_identity == report["build_identity"] == report["manifest_hash"]
    kinds = sorted(a.kind for a in manifest.artifacts)
    assert kinds == ["engine", "engine", "faiss_index", "local_features", "tile_map"]
    assert report["local_features"]["generated"] == 80
    assert 0 < report["local_features"]["bytes_per_tile"] <= 256 * 100
    assert not (demo.cache / ".staging").exists()


def test_second_build_is_a_noop_that_writes_nothing(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    build(capsys, demo)
    path = demo.cache / "Manifest.json"
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    report = build(capsys, demo)
    assert report["outcome"] == "idempotent_no_op"
    assert report["engines_built"] == 0 and report["descriptors_generated"] == 0
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_every_run_files_its_report_before_the_run_ends(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    key = artifact_key("build-report", demo.cache.resolve())
    for outcome in ("success", "idempotent_no_op"):
        report = build(capsys, demo)
        assert report["outcome"] == outcome
        # Submitted at the end of the run, written by the time the CLI returns.
        filed = cast(Any, Artifact.get(key))
        assert filed is not None and filed.flow_run_id is not None
        assert f"| outcome | {outcome} |" in filed.data
        assert f"| elapsed_s | {report['elapsed_s']} |" in filed.data


def test_each_tile_descriptor_retrieves_its_own_tile(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    build(capsys, demo)
    artifacts = {a["kind"]: a for a in manifest_of(demo)["artifacts"]}
    index = faiss.read_index(str(demo.cache / artifacts["faiss_index"]["path"]))
    rows = json.loads((demo.cache / artifacts["tile_map"]["path"]).read_text())["rows"]
    assert index.ntotal == len(rows) == 80
    vectors = index.reconstruct_n(0, index.ntotal)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    _, found = index.search(vectors, 1)
    assert (found[:, 0] == np.arange(len(rows))).all()


def test_deleted_artifact_is_rebuilt_not_served_from_prefect_cache(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    build(capsys, demo)
    index = next(a for a in manifest_of(demo)["artifacts"] if a["kind"] == "faiss_index")
    (demo.cache / index["path"]).unlink()
    for stored in (demo.work / "indexes").iterdir():
        stored.unlink()
    report = build(capsys, demo)
    assert report["outcome"] == "success"
    assert report["descriptors_reused"] == 80  # from the descriptor store, not recomputed
    verify_cache(demo.cache, load_trust_store(demo.trust))


def tile_space(store: Any) -> str:
    """The store's space of tile descriptors: the one whose views' space it also holds
    (the self-test keeps its views' embeddings beside the tiles')."""
    keys = {key for (key,) in store._db.execute("SELECT key FROM spaces")}
    (space,) = (key for key in keys if view_space(key) in keys)
    return space


def test_an_index_taken_from_prefects_cache_dates_its_descriptor_space(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    from takeoff_cache.core.workdir import store_path
    from takeoff_cache.descriptors.store import DescriptorStore

    build(capsys, demo)
    index = next(a for a in manifest_of(demo)["artifacts"] if a["kind"] == "faiss_index")
    (indexed,) = (demo.work / "indexes").glob("*.faiss")
    inode = indexed.stat().st_ino
    # Work to do, but the work folder's index is whole: the very next build takes it
    # from Prefect's cache, filed under the key computed from the files written.
    (demo.cache / index["path"]).unlink()
    report = build(capsys, demo)
    assert report["outcome"] == "success" and report["descriptors_reused"] == 80
    assert indexed.stat().st_ino == inode
    store = DescriptorStore(store_path(demo.work))
    space = tile_space(store)
    store.mark_used(space, 1.0)  # as if last used long ago
    store.close()
    (demo.cache / index["path"]).unlink()
    before = time.time()
    report = build(capsys, demo)
    assert report["outcome"] == "success" and report["descriptors_reused"] == 80
    assert indexed.stat().st_ino == inode  # taken from Prefect's cache, not written again
    store = DescriptorStore(store_path(demo.work))
    ((used,),) = store._db.execute("SELECT used FROM spaces WHERE key = ?", (space,))
    store.close()
    assert used >= before


def test_the_build_after_a_cold_one_takes_the_engines_from_prefects_cache(
    capsys: pytest.CaptureFixture[str], demo: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    from takeoff_cache.engines import store as engine_store

    build(capsys, demo)
    hashed: list[str] = []
    real = engine_store.sha256_file

    def counting(path: Path) -> str:
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(engine_store, "sha256_file", counting)
    change_one_tile(demo.root)
    report = build(capsys, demo)
    assert report["outcome"] == "success" and report["engines_reused"] == 2
    # Each engine is hashed once, by its cache key: the compile task itself, which
    # would look the engine up (and hash it) again, is taken from Prefect's cache.
    assert len(hashed) == 2 and len(set(hashed)) == 2


def test_corrupted_engine_is_replaced_from_the_store_and_cache_verifies(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    build(capsys, demo)
    engine = next(a for a in manifest_of(demo)["artifacts"] if a["kind"] == "engine")
    path = demo.cache / engine["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # in place: the cache's own copy, not the store's file
    report = build(capsys, demo)
    assert report["outcome"] == "success"
    assert report["engines_built"] == 0 and report["engines_reused"] == 2
    verify_cache(demo.cache, load_trust_store(demo.trust))


def test_changed_tile_reembeds_only_that_tile_and_retires_old_index(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    build(capsys, demo)
    old_index = next(
        a["path"] for a in manifest_of(demo)["artifacts"] if a["kind"] == "faiss_index"
    )
    import io

    from PIL import Image

    from takeoff_cache.demo.synthetic import render_tile

    buf = io.BytesIO()
    Image.fromarray(render_tile(17, 0, 0, seed=99)).save(buf, "JPEG", quality=85)
    z, x, y = [
        int(v)
        for v in json.loads((demo.cache / old_index.replace(".faiss", ".tiles.json")).read_text())[
            "rows"
        ][5]
    ]
    replace_tile_bytes(demo.corpus, z, x, y, buf.getvalue())
    report = build(capsys, demo)
    assert report["outcome"] == "success"
    assert report["descriptors_generated"] == 1 and report["descriptors_reused"] == 79
    assert report["engines_built"] == 0
    signed = manifest_of(demo)
    assert signed["version"] == 2
    assert not (demo.cache / old_index).exists()
    verify_cache(demo.cache, load_trust_store(demo.trust))


def test_request_flags_override_the_request_file(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    report = build(capsys, demo, "--zoom", "16")
    assert report["tiles"] == 16
    assert manifest_of(demo)["request"]["zoom_levels"] == [16]


def test_an_area_builds_only_its_tiles_and_is_recorded(
    capsys: pytest.CaptureFixture[str], demo: Demo, tmp_path: Path
) -> None:
    from takeoff_cache.tiles.area import load_area

    lat0, lon0, lat1, lon1 = manifest_of_request(demo)["bbox"]
    ring = [[lon0, lat0], [lon1, lat0], [lon1, lat1], [lon0, lat0]]
    area = tmp_path / "area.geojson"
    area.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    report = build(capsys, demo, "--area", str(area))
    whole = build(capsys, demo)
    assert 0 < report["tiles"] < whole["tiles"]
    assert whole["outcome"] == "success"  # another identity: not a no-op
    assert build(capsys, demo, "--area", str(area))["outcome"] == "success"
    assert build(capsys, demo, "--area", str(area))["outcome"] == "idempotent_no_op"
    assert manifest_of(demo)["request"]["area"] == load_area(area).geojson
    verify_cache(demo.cache, load_trust_store(demo.trust))


def manifest_of_request(demo: Demo) -> dict[str, Any]:
    from takeoff_cache.build.request import parse_request, read_request_file

    return parse_request(read_request_file(demo.request)).to_json()


def test_build_runs_as_a_subprocess_with_json_report(demo: Demo) -> None:
    """The installed console script, in a fresh process with its own ephemeral Prefect API."""
    import subprocess
    import sys

    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "takeoff_cache.cli.main", *demo.build_args("--json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["outcome"] == "success"
    assert "Traceback" not in proc.stderr
    assert Path(report["manifest_path"]).is_file()


@pytest.fixture
def final_state_update_retried(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every final state of a flow run is sent twice, the first answer lost: what
    Prefect's client does when a request times out or the server answers 503 after
    it has taken the update. The API then answers the retry with its own copy of
    the state, which carries no unpersisted result."""
    from prefect.client.base import PrefectHttpxSyncClient

    send = PrefectHttpxSyncClient.send
    retried: list[bool] = []

    def send_twice(self: PrefectHttpxSyncClient, request: Any, *args: Any, **kwargs: Any) -> Any:
        path = request.url.path
        final = (
            request.method == "POST"
            and "/flow_runs/" in path
            and path.endswith("/set_state")
            and json.loads(request.content)["state"]["type"] in ("COMPLETED", "FAILED")
        )
        if not final:
            return send(self, request, *args, **kwargs)
        send(self, request, *args, **kwargs)
        response = send(self, request, *args, **kwargs)
        retried.append(response.json()["status"] == "REJECT")
        return response

    monkeypatch.setattr(PrefectHttpxSyncClient, "send", send_twice)
    return retried


@pytest.mark.parametrize(
    ("extra", "code", "outcome"),
    [
        ((), 0, "success"),
        (("--zoom", "3"), 3, "failure"),  # no tiles at that zoom: a soft failure
        ((), 5, None),  # a stray file in the cache root: a typed error inside the run
    ],
)
def test_the_report_survives_a_final_state_the_api_returns_without_its_data(
    capsys: pytest.CaptureFixture[str],
    demo: Demo,
    final_state_update_retried: list[bool],
    extra: tuple[str, ...],
    code: int,
    outcome: str | None,
) -> None:
    if outcome is None:
        (demo.cache / "stray.txt").write_text("not listed")
    result = run_cli(capsys, *demo.build_args("--json", *extra))
    assert final_state_update_retried == [True]  # the retry was answered with the API's copy
    assert result.code == code, result.err
    assert "internal error" not in result.err
    if outcome is not None:
        assert result.json()["outcome"] == outcome
    else:
        assert len(result.err_lines) == 1 and "stray.txt" in result.err


def test_a_changed_corpus_build_prunes_the_work_folder_and_a_pruned_index_is_rebuilt(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    import shutil

    from takeoff_cache.core.workdir import KEEP_INDEXES, store_path
    from takeoff_cache.descriptors.store import KEEP_SPACES, SPACE_IDLE_S, DescriptorStore

    first = build(capsys, demo)
    folder = demo.work / "indexes"
    (original,) = {p.name.removesuffix(".faiss") for p in folder.glob("*.faiss")}
    # Indexes of earlier corpora, two hours old and older; this build's is the oldest.
    hours_ago = time.time() - 2 * 3600
    for i in range(KEEP_INDEXES + 1):
        for suffix in (".faiss", ".tiles.json"):
            shutil.copy(folder / f"{original}{suffix}", folder / f"vpr.old{i}{suffix}")
            os.utime(folder / f"vpr.old{i}{suffix}", (hours_ago - i, hours_ago - i))
    for suffix in (".faiss", ".tiles.json"):
        os.utime(folder / f"{original}{suffix}", (hours_ago - 99, hours_ago - 99))
    killed = folder / f".{original}.faiss.tmp-999999"
    killed.write_bytes(b"partial")
    os.utime(killed, (hours_ago, hours_ago))
    # Descriptor spaces of engines no longer used, the newest unused for over the idle time.
    store = DescriptorStore(store_path(demo.work))
    space = tile_space(store)
    stale = [f"retired-engine-{i}" for i in range(KEEP_SPACES)]
    for i, key in enumerate(stale):
        store.put(key, ["ab" * 32], np.eye(8, dtype=np.float32)[:1])
        store.mark_used(key, time.time() - SPACE_IDLE_S - 60 - i)
    store.close()

    shutil.copy(demo.corpus, demo.root / "corpus-before.mbtiles")
    change_one_tile(demo.root)
    changed = build(capsys, demo)
    assert changed["outcome"] == "success" and changed["descriptors_generated"] == 1
    kept = {p.name.removesuffix(".faiss") for p in folder.glob("*.faiss")}
    assert len(kept) == KEEP_INDEXES
    assert {f"vpr.old{i}" for i in range(KEEP_INDEXES - 1)} < kept
    assert original not in kept and f"vpr.old{KEEP_INDEXES}" not in kept
    assert not killed.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{s}{suffix}" for s in kept for suffix in (".faiss", ".tiles.json")
    )
    store = DescriptorStore(store_path(demo.work))
    spaces = {
        key: n
        for key, n in store._db.execute(
            "SELECT key, COUNT(vector) FROM spaces LEFT JOIN vectors ON space = id GROUP BY key"
        )
    }
    store.close()
    # This build's spaces (its tiles', and its self-test views') and the two most
    # recently used others stay; the older ones go.
    views = view_space(space)
    assert spaces.pop(views) > 0
    assert spaces == {space: 81, **{key: 1 for key in stale[: KEEP_SPACES - 2]}}
    verify_cache(demo.cache, load_trust_store(demo.trust))

    # The corpus as it was: its index is gone from the work folder, so it is
    # written again from the stored descriptors (none embedded) and matches.
    shutil.copy(demo.root / "corpus-before.mbtiles", demo.corpus)
    again = build(capsys, demo)
    assert again["outcome"] == "success"
    assert again["descriptors_generated"] == 0 and again["descriptors_reused"] == 80
    assert again["build_identity"] == first["build_identity"]
    assert (folder / f"{original}.faiss").is_file()
    verify_cache(demo.cache, load_trust_store(demo.trust))


def _recorded_progress(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, float]]) -> Any:
    """tasks.descriptors with its progress artifact's API calls recorded, not sent."""
    from takeoff_cache_prefect.tasks import descriptors as td

    def create(key: str, value: float) -> str:
        calls.append(("create", value))
        return "artifact-id"

    def update(self: Any, value: float) -> None:
        assert self._artifact.result() == "artifact-id"
        calls.append(("update", value))

    monkeypatch.setattr(td._Progress, "_create", staticmethod(create))
    monkeypatch.setattr(td._Progress, "_update", update)
    return td


def test_a_short_phase_creates_its_progress_artifact_once_at_its_final_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, float]] = []
    td = _recorded_progress(monkeypatch, calls)
    progress = td._Progress("descriptors-key")
    for done in (0, 40, 80):
        progress(done, 80)
    assert calls == []  # nothing is sent in the phase's first half second
    progress.close()
    td.settle_progress()
    assert calls == [("create", 100.0)]


def test_a_long_phase_creates_its_progress_artifact_early_and_updates_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, float]] = []
    td = _recorded_progress(monkeypatch, calls)
    monkeypatch.setattr(td._Progress, "every_s", 0.0)  # every value is due at once
    progress = td._Progress("descriptors-key")
    for done in (0, 40, 40, 80):
        progress(done, 80)
    progress.close()  # the last value was sent: nothing more to send
    td.settle_progress()
    assert calls == [("create", 0.0), ("update", 50.0), ("update", 100.0)]


def test_a_shown_progress_artifact_gets_the_end_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, float]] = []
    td = _recorded_progress(monkeypatch, calls)
    monkeypatch.setattr(td._Progress, "every_s", 0.0)
    progress = td._Progress("descriptors-key")
    progress(0, 80)  # created
    monkeypatch.setattr(td._Progress, "every_s", 3600.0)
    progress(40, 80)  # not due
    progress(80, 80)  # the end: due at once, before the index is written and close
    deadline = time.monotonic() + 30
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls == [("create", 0.0), ("update", 100.0)]
    progress.close()
    td.settle_progress()
    assert calls == [("create", 0.0), ("update", 100.0)]


def test_a_closed_progress_artifact_gets_its_last_update_behind_the_build_and_is_settled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    calls: list[tuple[str, float]] = []
    td = _recorded_progress(monkeypatch, calls)
    recorded = td._Progress._create

    def slow_create(key: str, value: float) -> str:
        release.wait(30)
        return cast(str, recorded(key, value))

    monkeypatch.setattr(td._Progress, "_create", staticmethod(slow_create))
    progress = td._Progress("descriptors-key")
    progress(80, 80)
    progress.close()  # returns with the artifact's one call still in flight
    assert calls == []
    settling = threading.Thread(target=td.settle_progress)
    settling.start()
    settling.join(0.2)
    assert settling.is_alive()  # waits for the call
    release.set()
    settling.join(30)
    assert not settling.is_alive() and calls == [("create", 100.0)]
