"""The descriptor store: keys, lookups, batched writes, reads into given rows, pruning."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.descriptors import store as descriptor_store


def _digests(prefix: str, n: int) -> list[str]:
    return [hashlib.sha256(f"{prefix}{i}".encode()).hexdigest() for i in range(n)]


def test_descriptor_space_changes_with_the_input_spec_not_only_the_model() -> None:
    spec = InputSpec("image", 128, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    moved = InputSpec(spec.name, spec.size, spec.channels, spec.mean, (0.5, 0.5, 0.5))
    space = descriptor_store.descriptor_space
    assert space("k", spec) != space("k", moved)
    assert space("k", spec) != space("k2", spec)


def test_the_store_copies_its_log_into_its_file_while_it_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = descriptor_store.DescriptorStore(path)
    digests = _digests("log", 300)
    vectors = np.eye(336, dtype=np.float32)[:300]
    store.put("space", digests, vectors)
    before = path.stat().st_size  # the new rows are in the write-ahead log
    store.checkpoint_behind()
    deadline = time.monotonic() + 10
    while path.stat().st_size < before + vectors.nbytes and time.monotonic() < deadline:
        assert len(store.get("space", digests[:5], 336)) == 5  # reads go on meanwhile
        time.sleep(0.01)
    assert path.stat().st_size >= before + vectors.nbytes
    got = store.get("space", digests, 336)
    store.close()
    assert len(got) == 300 and np.array_equal(got[digests[7]], vectors[7])


def test_store_lookup_returns_exactly_the_absent_digests(tmp_path: Path) -> None:
    store = descriptor_store.DescriptorStore(tmp_path / "store.sqlite")
    digests = _digests("", 9000)
    vectors = np.eye(8, dtype=np.float32)[np.arange(3000) % 8]
    store.put("space-a", digests[:3000], vectors)
    store.put("space-b", digests[3000:6000], vectors)
    # More digests than one query takes, duplicates, and another space's rows.
    asked = digests + digests[:10]
    assert store.missing("space-a", asked) == set(digests[3000:])
    assert store.missing("space-b", asked) == set(digests[:3000] + digests[6000:])
    assert store.missing("space-c", digests[:5]) == set(digests[:5])
    assert store.missing("space-a", []) == set()
    assert store.missing("space-a", digests[2990:3010]) == set(digests[3000:3010])
    store.close()


def test_a_batch_is_stored_by_one_statement_row_for_row(tmp_path: Path) -> None:
    store = descriptor_store.DescriptorStore(tmp_path / "store.sqlite")
    digests = _digests("put", 6)
    rows = np.eye(6, dtype=np.float32)
    store.put("other", digests, rows[::-1])
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    store.put("space", digests[:5], rows[:5])
    assert sum("INTO vectors" in sql for sql in statements) == 1
    store._db.set_trace_callback(None)
    # Stored again: the new rows replace the old, the others stay.
    store.put("space", digests[1:3], rows[[4, 5]])
    store.put("space", [], rows[:0])
    matrix, ok = store.vectors("space", digests, 6)
    assert ok.tolist() == [True] * 5 + [False]
    np.testing.assert_array_equal(matrix[:5], rows[[0, 4, 5, 3, 4]])
    other, _ = store.vectors("other", digests, 6)
    np.testing.assert_array_equal(other, rows[::-1])
    with pytest.raises(ValueError, match="3 digests for 2 vectors"):
        store.put("space", digests[:3], rows[:2])
    store.close()


def test_stored_vectors_are_read_straight_into_the_rows_given(tmp_path: Path) -> None:
    store = descriptor_store.DescriptorStore(tmp_path / "store.sqlite")
    digests = _digests("row", 5)
    store.put("space", digests[:4], np.eye(4, dtype=np.float32))
    db = sqlite3.connect(tmp_path / "store.sqlite")
    with db:  # a row of another size: damaged
        db.execute(
            "UPDATE vectors SET vector = ? WHERE tile = ?", (b"\0" * 12, bytes.fromhex(digests[3]))
        )
    db.close()
    storage = np.zeros((7, 4), dtype=np.float32)
    asked: list[int] = []

    def rows(dim: int) -> np.ndarray:
        asked.append(dim)
        return storage[2:7]

    matrix, ok = store.vectors("space", digests[::-1], None, rows)
    assert asked == [4] and np.shares_memory(matrix, storage)
    assert ok.tolist() == [False, False, True, True, True]
    np.testing.assert_array_equal(storage[2:4], 0.0)  # absent, damaged
    np.testing.assert_array_equal(storage[4:7], np.eye(4, dtype=np.float32)[2::-1])
    np.testing.assert_array_equal(storage[:2], 0.0)  # outside the rows given
    # Nothing whole to read: no rows are asked for.
    _, ok = store.vectors("space", digests[3:], 4, rows)
    assert asked == [4] and not ok.any()
    store.close()


@pytest.mark.parametrize("dim", [None, 4])
def test_rows_of_one_size_read_at_once_are_still_checked_one_by_one(
    tmp_path: Path, dim: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.sqlite"
    store = descriptor_store.DescriptorStore(path)
    digests = _digests("row", 7)
    unit = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1]]
    store.put("space", digests[:6], unit)
    db = sqlite3.connect(path)
    with db:  # every row still a blob of 16 bytes: the statement's one blob is used
        for i, value in ((1, np.nan), (2, 3.0)):  # not finite; finite, not unit length
            vector = np.full(4, value, np.float32).tobytes()
            db.execute(
                "UPDATE vectors SET vector = ? WHERE tile = ?", (vector, bytes.fromhex(digests[i]))
            )
    db.close()
    storage = np.full((9, 4), 7.0, dtype=np.float32)

    def rows(size: int) -> np.ndarray:
        storage[1:8] = 0.0  # zeroed, as ExactRows' storage is
        return storage[1:8]

    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    order = [6, 5, 0, 2, 4, 1, 3]  # scattered; digests[6] was never stored
    matrix, ok = store.vectors("space", [digests[i] for i in order], dim, rows)
    assert not any("SELECT k.i / 32, v.vector" in sql for sql in statements)
    assert np.shares_memory(matrix, storage)
    assert ok.tolist() == [False, True, True, False, True, False, True]
    np.testing.assert_array_equal(storage[1:8][ok], unit[[5, 0, 4, 3]])
    np.testing.assert_array_equal(storage[1:8][~ok], 0.0)
    np.testing.assert_array_equal(storage[[0, 8]], 7.0)  # outside the rows given
    # A row that is text of a vector's length is not a vector: read one row at a time.
    db = sqlite3.connect(path)
    with db:
        db.execute(
            "UPDATE vectors SET vector = ? WHERE tile = ?", ("x" * 16, bytes.fromhex(digests[0]))
        )
    db.close()
    matrix, ok = store.vectors("space", digests[:6], dim)
    assert any("SELECT k.i / 32, v.vector" in sql for sql in statements)
    assert ok.tolist() == [False, False, False, True, True, True]
    np.testing.assert_array_equal(matrix[3:], unit[3:])
    # Rows too wide to join within the budget: one at a time too, with the same result.
    monkeypatch.setattr(descriptor_store, "_GATHER_MAX_BYTES", 16 * 2)
    statements.clear()
    matrix, ok = store.vectors("space", digests[3:6], dim)
    assert ok.all() and not any("group_concat" in sql for sql in statements)
    np.testing.assert_array_equal(matrix, unit[3:])
    store.close()


def test_store_prunes_spaces_neither_recent_nor_among_the_last_used(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    day = 24 * 3600.0
    store = descriptor_store.DescriptorStore(tmp_path / "store.sqlite")
    vectors = np.eye(8, dtype=np.float32)[np.arange(20) % 8]
    # Used 1, 2, ... 6 days ago and 10, 20 days ago.
    ages = {"d1": 1, "d2": 2, "d3": 3, "d4": 4, "d5": 5, "d6": 6, "d10": 10, "d20": 20}
    for space, age in ages.items():
        store.put(space, _digests(space, 20), vectors)
        store.mark_used(space, now - age * day)
    # The four most recent stay however old; the rest only while used within the week.
    assert store.prune_spaces(keep=4, idle_s=7 * day, now=now) == ["d10", "d20"]
    for space in ages:
        kept = space not in ("d10", "d20")
        assert store.missing(space, _digests(space, 20)) == (
            set() if kept else set(_digests(space, 20))
        )
    assert store.prune_spaces(keep=4, idle_s=7 * day, now=now) == []
    # A week on, only the four most recent remain; a space used now is one of them.
    store.mark_used("d6", now + 7 * day)
    assert store.prune_spaces(keep=4, idle_s=7 * day, now=now + 7 * day) == ["d4", "d5"]
    left = dict(
        store._db.execute(
            "SELECT key, COUNT(*) FROM spaces JOIN vectors ON space = id GROUP BY key"
        )
    )
    assert left == {"d6": 20, "d1": 20, "d2": 20, "d3": 20}
    # A pruned space starts afresh.
    store.put("d20", _digests("d20", 3), vectors[:3])
    assert store.missing("d20", _digests("d20", 20)) == set(_digests("d20", 20)[3:])
    store.close()


def test_a_store_written_before_spaces_were_dated_counts_them_as_used_now(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE spaces (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE)")
        db.execute(
            "CREATE TABLE vectors (space INTEGER NOT NULL, tile BLOB NOT NULL,"
            " vector BLOB NOT NULL, UNIQUE (space, tile))"
        )
        db.execute("INSERT INTO spaces (key) VALUES ('old')")
        unit = np.eye(8, dtype=np.float32)[0].tobytes()
        db.executemany(
            "INSERT INTO vectors VALUES (1, ?, ?)",
            [(bytes.fromhex(d), unit) for d in _digests("old", 5)],
        )
    db.close()
    before = time.time()
    store = descriptor_store.DescriptorStore(path)
    assert store.missing("old", _digests("old", 5)) == set()
    # Dated at the upgrade: nothing goes until it has been unused for the idle time.
    assert store.prune_spaces(keep=0, idle_s=3600.0, now=before + 60) == []
    assert store.prune_spaces(keep=0, idle_s=3600.0, now=before + 7200) == ["old"]
    store.close()
    descriptor_store.DescriptorStore(path).close()  # opening a dated store changes nothing
