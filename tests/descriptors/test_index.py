"""The descriptor index: exact below the threshold, IVF with measured recall above it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pytest

from takeoff_cache.descriptors import index as descriptor_index
from takeoff_cache.descriptors.store import DescriptorStore, l2_normalize
from takeoff_cache.errors import MissingDescriptorsError
from takeoff_cache.tiles.corpus import Tile, TileSelection

SPACE = "space"
DIM = 64


@dataclass
class Stored:
    selection: TileSelection
    vectors: np.ndarray  # row i: the stored vector of tile i
    store: DescriptorStore


def _tiles(n: int, salt: str = "") -> tuple[Tile, ...]:
    return tuple(
        Tile(16, i % 64, i // 64, hashlib.sha256(f"{salt}{i}".encode()).hexdigest())
        for i in range(n)
    )


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    """2,000 tiles whose vectors lie in 60 clusters, as places that look alike do."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((60, DIM)).astype(np.float32)
    vectors = l2_normalize(
        centres[rng.integers(0, 60, 2000)] + 0.4 * rng.standard_normal((2000, DIM))
    )
    tiles = _tiles(2000)
    store = DescriptorStore(tmp_path_factory.mktemp("index") / "store.sqlite")
    store.put(SPACE, [t.sha256 for t in tiles], vectors)
    yield Stored(TileSelection(tiles, "fingerprint"), vectors, store)
    store.close()


def test_index_is_exact_below_the_threshold(stored: Stored, tmp_path: Path) -> None:
    assert len(stored.selection.tiles) <= descriptor_index.EXACT_INDEX_MAX
    files = descriptor_index.write_index(stored.selection, stored.store, SPACE, tmp_path, "exact")
    assert (files.index_type, files.nprobe, files.recall_at_1) == ("Flat", None, 1.0)
    assert (files.dimension, files.count) == (DIM, 2000)
    index = descriptor_index.read_index(Path(files.index_path))
    assert isinstance(index, faiss.IndexFlatIP) and index.ntotal == 2000
    np.testing.assert_array_equal(index.reconstruct_n(0, 2000), stored.vectors)
    rows = json.loads(Path(files.map_path).read_text())["rows"]
    assert rows == [[t.z, t.x, t.y] for t in stored.selection.tiles]


def test_index_is_approximate_above_the_threshold_with_measured_recall(
    stored: Stored, tmp_path: Path
) -> None:
    files = descriptor_index.write_index(
        stored.selection, stored.store, SPACE, tmp_path, "approx", exact_max=1999
    )
    assert files.index_type == "IVF51,Flat"  # min(4·sqrt(N), N / 39) lists
    assert files.nprobe is not None and 1 <= files.nprobe <= 51
    assert files.recall_at_1 >= descriptor_index.RECALL_TARGET and files.recall_queries == 500
    index = descriptor_index.read_index(Path(files.index_path))
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nprobe == files.nprobe  # stored in the file: a reader searches as measured
    _, found = index.search(stored.vectors, 1)
    assert (found[:, 0] == np.arange(2000)).all()


def test_large_index_uses_scalar_codes_and_still_meets_the_recall_target(
    stored: Stored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(descriptor_index, "FLAT_CODES_MAX_BYTES", 0)  # as if beyond memory
    files = descriptor_index.write_index(
        stored.selection, stored.store, SPACE, tmp_path, "sq8", exact_max=0
    )
    # SQ8 when it meets the target on its own; full vectors otherwise, never less recall.
    assert files.index_type in ("IVF51,SQ8", "IVF51,Flat")
    assert files.recall_at_1 >= descriptor_index.RECALL_TARGET


@pytest.mark.parametrize("exact_max", [descriptor_index.EXACT_INDEX_MAX, 0])
def test_index_refuses_tiles_without_a_descriptor(
    stored: Stored, tmp_path: Path, exact_max: int
) -> None:
    extra = _tiles(1, salt="never stored")[0]
    tiles = (*stored.selection.tiles[:1200], extra, *stored.selection.tiles[1200:])
    with pytest.raises(MissingDescriptorsError, match="1 tile") as caught:
        descriptor_index.write_index(
            TileSelection(tiles, "other"), stored.store, SPACE, tmp_path, "gap", exact_max=exact_max
        )
    assert caught.value.shas == [extra.sha256]
    assert not list(tmp_path.iterdir())  # nothing written
