"""The self-test's views are cut from the selection's tiles only, and their embeddings are
kept in the descriptor store: a rerun reuses them, a changed tile re-embeds only the
views over it."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from takeoff_cache.core.tilemath import tms_row
from takeoff_cache.demo.synthetic import encode_jpeg, render_tile, replace_tile_bytes
from takeoff_cache.descriptors.store import DescriptorStore
from takeoff_cache.localize.locate import Localizer
from takeoff_cache.localize.selftest import (
    SelfTestResult,
    ViewReuse,
    draw_views,
    run_self_test,
    view_seed,
)
from takeoff_cache.tiles.corpus import open_corpus
from tests.support.caches import build_demo_cache, localizer_of

pytestmark = pytest.mark.usefixtures("prefect_harness")

TileKey = tuple[int, int, int]
VIEWS = 40
SPACE = "the engine's descriptor space"


@pytest.fixture(scope="module")
def built(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_cache(
        demo_source, tmp_path_factory.mktemp("reuse") / "demo", "--self-test", "0"
    )


@pytest.fixture(scope="module")
def localizer(built: Path) -> Localizer:
    return localizer_of(built)[1]


def neighbours(tile: TileKey) -> list[TileKey]:
    z, x, y = tile
    return [(z, x + dx, y + dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]


def shas_of(corpus: Path, tiles: tuple[TileKey, ...]) -> dict[TileKey, str]:
    with open_corpus(corpus) as source:
        return {t: hashlib.sha256(source.read(*t)).hexdigest() for t in tiles}


def run(
    localizer: Localizer, corpus: Path, store: DescriptorStore, space: str = SPACE
) -> SelfTestResult:
    reuse = ViewReuse(store, space, shas_of(corpus, localizer.tiles))
    return run_self_test(localizer, corpus, k=VIEWS, reuse=reuse)


def figures(result: SelfTestResult) -> tuple[object, ...]:
    return (result.recall_at_1, result.recall_at_5, result.median_error_m, result.queries)


def test_tiles_outside_the_selection_change_no_view(
    built: Path, localizer: Localizer, tmp_path: Path
) -> None:
    grown = Path(shutil.copy(built / "corpus.mbtiles", tmp_path / "grown.mbtiles"))
    held = set(localizer.tiles)
    ring = {n for t in held for n in neighbours(t) if n not in held}
    db = sqlite3.connect(grown)
    with db:
        db.executemany(
            "INSERT INTO tiles VALUES (?, ?, ?, ?)",
            [(z, x, tms_row(z, y), encode_jpeg(render_tile(z, x, y, 7))) for z, x, y in ring],
        )
    db.close()
    before = run_self_test(localizer, built / "corpus.mbtiles", k=VIEWS)
    after = run_self_test(localizer, grown, k=VIEWS)
    # Views along the area's edge have new tiles among their neighbours, yet read none.
    views = draw_views(localizer.tiles, VIEWS, view_seed(localizer.tiles))
    assert any(neighbour in ring for v in views for neighbour in neighbours(v.tile))
    assert figures(after) == figures(before)


def test_a_rerun_reuses_every_view_and_gives_the_same_figures(
    built: Path, localizer: Localizer, tmp_path: Path
) -> None:
    store = DescriptorStore(tmp_path / "store.sqlite")
    try:
        first = run(localizer, built / "corpus.mbtiles", store)
        again = run(localizer, built / "corpus.mbtiles", store)
        other_engine = run(localizer, built / "corpus.mbtiles", store, space="another engine")
    finally:
        store.close()
    assert first.views_reused == 0
    assert again.views_reused == VIEWS
    assert figures(again) == figures(first)
    assert other_engine.views_reused == 0
    plain = run_self_test(localizer, built / "corpus.mbtiles", k=VIEWS)
    assert [q.rank for q in plain.queries] == [q.rank for q in first.queries]


def test_a_changed_tile_re_embeds_only_the_views_over_it(
    built: Path, localizer: Localizer, tmp_path: Path
) -> None:
    corpus = Path(shutil.copy(built / "corpus.mbtiles", tmp_path / "corpus.mbtiles"))
    views = draw_views(localizer.tiles, VIEWS, view_seed(localizer.tiles))
    changed = views[len(views) // 2].tile
    over = [v for v in views if changed in neighbours(v.tile)]
    store = DescriptorStore(tmp_path / "store.sqlite")
    try:
        run(localizer, corpus, store)
        z, x, y = changed
        replace_tile_bytes(corpus, z, x, y, encode_jpeg(render_tile(z, x, y, 99)))
        rebuilt = run(localizer, corpus, store)
    finally:
        store.close()
    assert 1 <= len(over) < VIEWS
    assert rebuilt.views_reused == VIEWS - len(over)
    # What was re-embedded is what a cold run over the changed corpus computes.
    cold = run_self_test(localizer, corpus, k=VIEWS)
    assert [q.rank for q in rebuilt.queries] == [q.rank for q in cold.queries]
