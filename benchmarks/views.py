"""Views of a demo corpus written as image files: what the locate benchmarks query.

Shared by ``benchmarks/confidence.py`` and ``benchmarks/registered.py``.
"""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import numpy as np
from PIL import Image

from takeoff_cache.localize.selftest import View, draw_views, render_view
from takeoff_cache.tiles.corpus import open_corpus


def write_views(corpus: Path, seed: str, n: int, out: Path) -> list[tuple[Path, View]]:
    """``n`` views of the corpus's tiles whose 8 neighbours it holds, as JPEG files."""
    db = sqlite3.connect(corpus)
    try:
        rows = db.execute("SELECT zoom_level, tile_column, tile_row FROM tiles").fetchall()
    finally:
        db.close()
    tiles = sorted((z, x, (1 << z) - 1 - r) for z, x, r in rows)
    held = set(tiles)
    inner = [
        t
        for t in tiles
        if all((t[0], t[1] + dx, t[2] + dy) in held for dx in (-1, 0, 1) for dy in (-1, 0, 1))
    ]
    out.mkdir(parents=True)
    written = []
    with open_corpus(corpus) as source:
        for i, view in enumerate(draw_views(inner, n, seed)):
            z, x, y = view.tile
            rows_px = [
                np.concatenate(
                    [
                        np.asarray(Image.open(io.BytesIO(source.read(z, x + dx, y + dy))))
                        for dx in (-1, 0, 1)
                    ],
                    axis=1,
                )
                for dy in (-1, 0, 1)
            ]
            mosaic = np.ascontiguousarray(np.concatenate(rows_px, axis=0))
            path = out / f"view{i:04d}.jpg"
            path.write_bytes(render_view(mosaic, view, mosaic.shape[0] // 3))
            written.append((path, view))
    return written
