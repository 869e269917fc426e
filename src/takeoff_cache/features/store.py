"""The feature store: per-tile local features kept in the work folder between builds.

Rows are keyed by feature space (:attr:`Extractor.space`: the extractor and
everything that changes its output) and tile SHA-256, so a rebuild after a
corpus change extracts only the tiles that changed, and every cache of a work
folder shares what was extracted. A row is one tile's :class:`Features`
packed by :func:`pack`; a row that does not unpack is treated as absent.
"""

from __future__ import annotations

import sqlite3
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from takeoff_cache.core.faults import checkpoint
from takeoff_cache.core.spaces import KEEP_SPACES, SPACE_IDLE_S, date_space, stale_spaces
from takeoff_cache.errors import DescriptorError
from takeoff_cache.features.extract import Features

_MAGIC = b"TCF1"
_HEADER = struct.Struct("<4sHH")  # magic, keypoints, descriptor bytes
# Keypoints are kept as fractions of the tile in 1/65535 steps (6 mm of a zoom-16 tile).
_STEPS = 65535.0
# Digests looked up per query: bounds a statement's size.
_CHUNK = 4096


def pack(features: Features) -> bytes:
    """One tile's features as bytes: a header, then keypoints (uint16 pairs),
    scores (float32) and descriptors (int8), each as one block."""
    n = len(features)
    d = features.descriptors.shape[1] if features.descriptors.ndim == 2 else 0
    kp = np.clip(np.rint(features.keypoints * _STEPS), 0, _STEPS).astype("<u2")
    return b"".join(
        (
            _HEADER.pack(_MAGIC, n, d),
            kp.tobytes(),
            features.scores.astype("<f4").tobytes(),
            features.descriptors.astype(np.int8).tobytes(),
        )
    )


def unpack(data: bytes) -> Features | None:
    """The features :func:`pack` wrote, or None for bytes that are not whole ones."""
    if not isinstance(data, bytes) or len(data) < _HEADER.size:
        return None
    magic, n, d = _HEADER.unpack_from(data)
    if magic != _MAGIC or len(data) != _HEADER.size + n * (4 + 4 + d):
        return None
    at = _HEADER.size
    kp = np.frombuffer(data, "<u2", 2 * n, at).reshape(n, 2).astype(np.float32) / _STEPS
    at += 4 * n
    scores = np.frombuffer(data, "<f4", n, at).astype(np.float32)
    at += 4 * n
    descriptors = np.frombuffer(data, np.int8, n * d, at).reshape(n, d).copy()
    if not np.isfinite(scores).all():
        return None
    return Features(kp, scores, descriptors)


class FeatureStore:
    """SQLite table of packed per-tile features, shared by every cache of a work folder.

    Each batch is one transaction in SQLite's write-ahead log, so a killed build
    never leaves half a row; ``synchronous=NORMAL`` may lose the last batches to a
    power cut (they are extracted again), never corrupt the table.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, timeout=60, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS features (space TEXT NOT NULL, tile BLOB NOT NULL,"
                " data BLOB NOT NULL, PRIMARY KEY (space, tile)) WITHOUT ROWID"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS spaces (key TEXT PRIMARY KEY, used REAL)")
            self._db.commit()
        except sqlite3.Error as exc:
            self._db.close()
            raise DescriptorError(f"feature store {path}: {exc}") from exc

    def missing(self, space: str, shas: Sequence[str]) -> set[str]:
        """Which of ``shas`` have no row in ``space`` (rows are not read)."""
        found = {tile.hex() for (tile,) in self._rows("tile", space, shas)}
        return set(shas) - found

    def _rows(self, columns: str, space: str, shas: Sequence[str]) -> Iterator[Any]:
        """``columns`` of the rows of ``shas`` in ``space``, queried :data:`_CHUNK` at a time."""
        unique = sorted(set(shas))
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            yield from self._db.execute(
                f"SELECT {columns} FROM features WHERE space = ? AND tile IN ({marks})",
                (space, *(bytes.fromhex(s) for s in chunk)),
            )

    def get(self, space: str, shas: Sequence[str]) -> dict[str, Features]:
        """The stored features of ``shas`` that unpack; damaged rows are left out."""
        out: dict[str, Features] = {}
        for tile, data in self._rows("tile, data", space, shas):
            features = unpack(data)
            if features is not None:
                out[tile.hex()] = features
        return out

    def packed(self, space: str, shas: Sequence[str]) -> dict[str, tuple[bytes, int, int]]:
        """The stored rows of ``shas`` that unpack, as they are stored (:func:`pack`), with
        their keypoints and descriptor bytes; damaged rows are left out."""
        out: dict[str, tuple[bytes, int, int]] = {}
        for sha, data in self.raw(space, shas).items():
            features = unpack(data)
            if features is not None:
                out[sha] = (data, len(features), features.descriptors.shape[1])
        return out

    def raw(self, space: str, shas: Sequence[str]) -> dict[str, bytes]:
        """The stored rows of ``shas`` as they are stored, unchecked (:meth:`packed`
        checks them)."""
        return {tile.hex(): bytes(data) for tile, data in self._rows("tile, data", space, shas)}

    def put(self, space: str, shas: Sequence[str], features: Sequence[Features]) -> None:
        """Store ``features[i]`` as the features of ``shas[i]``, in one transaction."""
        if len(shas) != len(features):
            raise ValueError(f"{len(shas)} digests for {len(features)} features")
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO features (space, tile, data) VALUES (?, ?, ?)",
                [(space, bytes.fromhex(s), pack(f)) for s, f in zip(shas, features, strict=True)],
            )
        checkpoint("features.batch_stored")

    def mark_used(self, space: str, now: float | None = None) -> None:
        """Date ``space`` as used now (a build read or wrote its features)."""
        date_space(self._db, space, now)

    def prune_spaces(
        self, *, keep: int = KEEP_SPACES, idle_s: float = SPACE_IDLE_S, now: float | None = None
    ) -> list[str]:
        """Delete the features of every space :func:`stale_spaces` names; return their
        keys. A space with rows that was never dated (a store older than the dating)
        counts as used now."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR IGNORE INTO spaces (key, used) SELECT DISTINCT space, ? FROM features",
                (time.time() if now is None else now,),
            )
            rows = [
                (key, key, used) for key, used in self._db.execute("SELECT key, used FROM spaces")
            ]
            gone = [key for key, _ in stale_spaces(rows, keep=keep, idle_s=idle_s, now=now)]
            for key in gone:
                self._db.execute("DELETE FROM features WHERE space = ?", (key,))
                self._db.execute("DELETE FROM spaces WHERE key = ?", (key,))
        return gone

    def forget(self, space: str, shas: Sequence[str]) -> None:
        with self._db:
            self._db.executemany(
                "DELETE FROM features WHERE space = ? AND tile = ?",
                [(space, bytes.fromhex(s)) for s in shas],
            )

    def close(self) -> None:
        self._db.close()


def prune_feature_store(path: Path) -> list[str]:
    """Prune the feature store at ``path`` (see :meth:`FeatureStore.prune_spaces`)."""
    if not path.is_file():
        return []
    store = FeatureStore(path)
    try:
        return store.prune_spaces()
    except sqlite3.Error as exc:
        raise DescriptorError(f"feature store {path}: {exc}") from exc
    finally:
        store.close()
