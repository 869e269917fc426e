"""A rebuild registers again only the self-test views whose outcome may have changed:
the rest are taken from the work folder, with the same figures."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from takeoff_cache.demo.synthetic import encode_jpeg, render_tile, replace_tile_bytes
from takeoff_cache.descriptors.store import DescriptorStore
from takeoff_cache.localize.locate import Localizer
from takeoff_cache.localize.register import open_features
from takeoff_cache.localize.registered import RegisteredResult, evaluate_registered, self_test_views
from takeoff_cache.localize.selftest import View, ViewReuse
from takeoff_cache.tiles.corpus import open_corpus
from tests.support.caches import build_demo_cache, localizer_of

pytestmark = pytest.mark.usefixtures("prefect_harness")

TileKey = tuple[int, int, int]
VIEWS = 16


@pytest.fixture(scope="module")
def built(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_cache(
        demo_source, tmp_path_factory.mktemp("registered") / "demo", "--self-test", "0"
    )


def shas_of(corpus: Path, tiles: tuple[TileKey, ...]) -> dict[TileKey, str]:
    with open_corpus(corpus) as source:
        return {t: hashlib.sha256(source.read(*t)).hexdigest() for t in tiles}


class Registering:
    def __init__(self, root: Path, corpus: Path, store: DescriptorStore, kept: Path | None):
        manifest, self.localizer = localizer_of(root)
        opened = open_features(root / "cache", manifest)
        assert opened is not None, "the demo cache has local features"
        self.extractor, self.features = opened
        self.corpus, self.store, self.kept = corpus, store, kept
        self.views: list[View] = self_test_views(self.localizer, 200)[:VIEWS]

    def run(self) -> RegisteredResult:
        localizer: Localizer = self.localizer
        reuse = ViewReuse(self.store, "the engine's space", shas_of(self.corpus, localizer.tiles))
        return evaluate_registered(
            localizer,
            self.corpus,
            self.views,
            self.extractor,
            self.features,
            reuse=reuse,
            remembered=self.kept,
        )


def test_a_rerun_registers_no_view_again_and_gives_the_same_figures(
    built: Path, tmp_path: Path
) -> None:
    store = DescriptorStore(tmp_path / "store.sqlite")
    try:
        registering = Registering(built, built / "corpus.mbtiles", store, tmp_path / "kept")
        first, again = registering.run(), registering.run()
    finally:
        store.close()
    assert (first.reused, again.reused) == (0, VIEWS)
    assert again.outcomes == first.outcomes
    assert any(o.registered for o in first.outcomes)


def test_a_changed_tile_registers_again_only_the_views_it_can_change(
    built: Path, tmp_path: Path
) -> None:
    corpus = Path(shutil.copy(built / "corpus.mbtiles", tmp_path / "corpus.mbtiles"))
    store = DescriptorStore(tmp_path / "store.sqlite")
    try:
        registering = Registering(built, corpus, store, tmp_path / "kept")
        registering.run()
        z, x, y = changed = registering.views[VIEWS // 2].tile
        replace_tile_bytes(corpus, z, x, y, encode_jpeg(render_tile(z, x, y, 99)))
        rebuilt = registering.run()
        registering.kept = None
        cold = registering.run()
    finally:
        store.close()
    assert 1 <= VIEWS - rebuilt.reused < VIEWS, changed
    # What was kept is what registering every view again over the changed corpus gives.
    assert rebuilt.outcomes == cold.outcomes


def test_an_unreadable_kept_outcome_is_registered_again(built: Path, tmp_path: Path) -> None:
    store = DescriptorStore(tmp_path / "store.sqlite")
    kept = tmp_path / "kept"
    try:
        registering = Registering(built, built / "corpus.mbtiles", store, kept)
        first = registering.run()
        entries = sorted(kept.iterdir())
        entries[0].write_text("{not json")
        entries[1].write_text('{"key": "another", "tile": [1, 2, 3]}')
        again = registering.run()
    finally:
        store.close()
    assert again.reused == VIEWS - 2
    assert again.outcomes == first.outcomes


def test_new_bytes_under_a_place_a_view_tried_register_it_again(
    built: Path, tmp_path: Path
) -> None:
    corpus = Path(shutil.copy(built / "corpus.mbtiles", tmp_path / "corpus.mbtiles"))
    store = DescriptorStore(tmp_path / "store.sqlite")
    kept = tmp_path / "kept"
    try:
        registering = Registering(built, corpus, store, kept)
        registering.run()
        # A tile some view's registration read, under no view's own pixels: only the
        # views that read it can change with it.
        under_views = {
            (z, x + dx, y + dy)
            for z, x, y in (v.tile for v in registering.views)
            for dx in (-1, 0, 1)
            for dy in (-1, 0, 1)
        }
        reads = [{tuple(t[:3]) for t in json.loads(e.read_text())["read"]} for e in kept.iterdir()]
        held = set(registering.localizer.tiles)
        tile = next(t for r in reads for t in sorted(r) if t not in under_views and t in held)
        z, x, y = tile
        replace_tile_bytes(corpus, z, x, y, encode_jpeg(render_tile(z, x, y, 99)))
        again = registering.run()
    finally:
        store.close()
    assert VIEWS - again.reused == sum(tile in r for r in reads) >= 1


def test_a_retrieval_that_ranks_the_places_otherwise_registers_again(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DescriptorStore(tmp_path / "store.sqlite")
    try:
        registering = Registering(built, built / "corpus.mbtiles", store, tmp_path / "kept")
        first = registering.run()
        search = registering.localizer.search

        def swapped(vectors: Any, k: int) -> list[tuple[Any, ...]]:
            return [(m[1], m[0], *m[2:]) for m in search(vectors, k)]

        monkeypatch.setattr(registering.localizer, "search", swapped)
        again = registering.run()
    finally:
        store.close()
    assert first.reused == 0 and again.reused == 0
