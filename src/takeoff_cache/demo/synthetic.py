"""A deterministic synthetic aerial-imagery corpus (no downloads).

Every pixel is a function of its Web Mercator position and the seed, never of
the tile it lands in: a tile is the world sampled at its pixel centres. So a
zoom ``z+1`` tile is the zoomed-in quarter of its ``z`` parent, neighbouring
tiles join seamlessly, and any tile can be rendered alone, in any order, which
is what lets :func:`write_corpus` stream 50,000 tiles with bounded memory.

Lengths below are Web Mercator metres (equatorial metres); at the default
centre (48.5 deg N) one of them is about 0.66 m on the ground.

The scene mixes several scales on purpose, because a place-recognition
descriptor must tell tiles apart: km-scale field systems, forests and rivers;
100 m-scale crop parcels, roads and villages; 10 m-scale buildings, tree lines
and tracks; metre-scale plough stripes and tree crowns.
"""

from __future__ import annotations

import functools
import io
import math
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from takeoff_cache.core.fsutil import atomic_output
from takeoff_cache.core.tilemath import lonlat_to_fractional_tile, tile_bounds, tms_row
from takeoff_cache.tiles.mbtiles import create_schema

TILE_SIZE = 256
JPEG_QUALITY = 85
# Width of the Web Mercator square in metres (2 * pi * 6378137).
WORLD_M = 2.0 * math.pi * 6378137.0
# Tiles per executemany; keeps only one batch of JPEGs in memory at a time.
_BATCH = 256
# How far CorpusLayout.bbox is pulled inside the block, in degrees: enough that
# tile_range() never picks a neighbour through rounding, far below a tile.
_BBOX_INSET_DEG = 1e-7
_MACRO_M = 2400.0  # size of a field system (one grid orientation and parcel size)
_STREET_M = 720.0  # road stretch that is or is not a village (30 lots of 24 m)

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
U64 = NDArray[np.uint64]


@dataclass(frozen=True)
class CorpusLayout:
    """Where :func:`write_corpus` put its tiles.

    ``bbox`` is ``(lat_min, lon_min, lat_max, lon_max)``: the base-zoom block
    shrunk inward by 1e-7 degrees, so selecting it returns exactly the block
    at both zoom levels.
    """

    path: Path
    bbox: tuple[float, float, float, float]
    zoom_levels: tuple[int, int]
    tile_count: int


# --------------------------------------------------------------------------- hashing
# A counter-based hash (splitmix64 finaliser) instead of a stored random field:
# any lattice point anywhere in the world gets its value in O(1), so rendering
# a tile never depends on which other tiles were rendered before it.
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(h: U64) -> U64:
    h = (h ^ (h >> np.uint64(30))) * _MUL1
    h = (h ^ (h >> np.uint64(27))) * _MUL2
    return h ^ (h >> np.uint64(31))


def _hash(key: np.uint64, *ints: I64 | int) -> U64:
    """Hash integer coordinates (broadcast together) under ``key``.

    The coordinates are folded in multiplicatively (cheap: two operations
    each) and the result goes through one strong finaliser.
    """
    h: U64 = np.asarray(key, dtype=np.uint64)
    # Wrap-around is the point of the multiplications; 0-d inputs would warn.
    with np.errstate(over="ignore"):
        for v in ints:
            # int64 -> uint64 wraps negatives, which is exactly what a hash wants.
            h = (h ^ np.asarray(v, dtype=np.int64).astype(np.uint64)) * _GOLDEN
        return _mix(_mix(h))


def _unit(h: U64) -> F64:
    """Map hashes to floats uniform in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2.0**53)


def _table(key: np.uint64, *ranges: tuple[int, int], n_attr: int) -> F32:
    """Uniform attributes for every cell of a small integer box, flattened.

    Cells overlapping one tile are few (tens), so hashing the box once and
    gathering per pixel is far cheaper than hashing 65,536 pixels.
    Row ``((i0 - lo0) * n1 + (i1 - lo1)) * ...`` holds the cell's attributes.
    """
    axes = [np.arange(lo, hi + 1, dtype=np.int64) for lo, hi in ranges] + [
        np.arange(n_attr, dtype=np.int64)
    ]
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    return _unit(_hash(key, *grids)).astype(np.float32).reshape(-1, n_attr)


# --------------------------------------------------------------------------- world
_KEY_NAMES = (
    "detail",
    "forest",
    "street",
    "macro",
    "band",
    "parcel",
    "road0",
    "road1",
    "river",
    "lot",
)


@dataclass(frozen=True)
class _World:
    """Everything the seed decides; the rest is hashed from these keys."""

    keys: dict[str, np.uint64]
    road_angles: tuple[float, float]
    river_angle: float
    river_phases: tuple[float, float, float]


@functools.lru_cache(maxsize=8)
def _world(seed: int) -> _World:
    rng = np.random.default_rng(seed)
    raw = rng.integers(1, 2**63 - 1, size=len(_KEY_NAMES), dtype=np.int64)
    keys = {name: np.uint64(int(k)) for name, k in zip(_KEY_NAMES, raw, strict=True)}
    a0 = float(rng.uniform(0.0, math.pi))
    # The second road family crosses the first at 70-110 degrees, like a road grid.
    a1 = a0 + float(rng.uniform(1.22, 1.92))
    river = float(rng.uniform(0.0, math.pi))
    p0, p1, p2 = (float(p) for p in rng.uniform(0.0, 2.0 * math.pi, size=3))
    return _World(keys, (a0, a1), river, (p0, p1, p2))


# --------------------------------------------------------------------------- noise
def _fade(cell_px: float, full: float = 3.0) -> float:
    """Weight of a feature ``cell_px`` pixels across: 0 at 1 px, 1 from ``full`` px.

    Dropping detail the pixel grid cannot carry (instead of aliasing it) is what
    keeps a downsampled child tile equal to its parent's quadrant.
    """
    return min(1.0, max(0.0, (cell_px - 1.0) / (full - 1.0)))


def _lattice_coords(g: F64, lo: int) -> tuple[NDArray[np.intp], F32]:
    """Cell index (from lattice point ``lo``) and smoothstep weight of each sample."""
    t = g - lo
    i = np.floor(t).astype(np.intp)
    f = (t - i).astype(np.float32)
    f = f * f * (np.float32(3.0) - np.float32(2.0) * f)
    return i, f


def _fbm(
    key: np.uint64, xs: F64, ys: F64, px: float, octaves: tuple[tuple[float, float], ...]
) -> F32:
    """Fractal value noise: octaves ``(cell metres, amplitude)``, mean 0.5.

    Smoothstep value noise is separable: each octave is interpolated along x
    on its small lattice, then along y by gathering whole rows (contiguous
    copies). No BLAS on purpose: OpenBLAS threads even these small products
    and then runs several times slower than one core when cores are shared.
    Octaves finer than the pixel are faded out; the normalisation uses the
    nominal amplitudes so fading removes detail without shifting the coarse
    pattern.
    """
    total = sum(a for _, a in octaves)
    acc = np.full((ys.size, xs.size), 0.5, dtype=np.float32)
    for i, (cell, amp) in enumerate(octaves):
        weight = amp * _fade(cell / px) / total
        if weight <= 0.0:
            continue
        gx, gy = xs / cell, ys / cell
        x0, y0 = math.floor(gx[0]), math.floor(gy[0])
        nx, ny = math.floor(gx[-1]) - x0 + 2, math.floor(gy[-1]) - y0 + 2
        lattice = _unit(
            _hash(
                key + np.uint64(i), np.arange(y0, y0 + ny)[:, None], np.arange(x0, x0 + nx)[None, :]
            )
        )
        lattice = ((lattice - 0.5) * weight).astype(np.float32)
        ix, fx = _lattice_coords(gx, x0)
        iy, fy = _lattice_coords(gy, y0)
        rows = lattice[:, ix]
        rows += (lattice[:, ix + 1] - rows) * fx
        top = rows[iy]
        top += (rows[iy + 1] - top) * fy[:, None]
        acc += top
    return acc


# --------------------------------------------------------------------------- painting
def _paint_band(
    img: F32,
    colour: F32,
    dist: F32,
    half: float,
    ramp: float,
    *,
    opacity: float = 1.0,
    texture: tuple[F32, float, float] | None = None,
) -> None:
    """Blend ``colour`` into a contiguous (3, H, W) image where ``dist < half``.

    The edge is a linear ramp ``ramp`` wide (one pixel for shapes, which
    anti-aliases them so a child tile averages to its parent). ``texture``
    ``(field, scale, offset)`` multiplies the colour by ``field * scale + offset``.
    Most layers (roads, borders, tree lines) touch few pixels, so the
    coverage and the blend are computed only on the pixels inside the band.
    """
    d = dist.reshape(-1)
    idx = np.flatnonzero(d < np.float32(half + 0.5 * ramp))
    if idx.size == 0:
        return
    alpha = np.clip(
        (np.float32(half) - d[idx]) * np.float32(1.0 / ramp) + np.float32(0.5), 0.0, 1.0
    )
    if opacity != 1.0:
        alpha *= np.float32(opacity)
    flat = img.reshape(3, -1)
    # Mostly covered (a wood, a meadow): a dense pass beats gather/scatter.
    dense = idx.size > d.size // 2
    where: NDArray[np.intp] | slice = idx
    if dense:
        full = np.zeros_like(d)
        full[idx] = alpha
        alpha, where = full, slice(None)
    col: F32 = colour[:, None]
    if texture is not None:
        field, scale, offset = texture
        col = col * (field.reshape(-1)[where] * np.float32(scale) + np.float32(offset))
    if dense:
        flat += (col - flat) * alpha
        return
    sub = flat[:, idx]
    sub += (col - sub) * alpha
    flat[:, idx] = sub


def _cover(half_width: F32, dist: F32, px: float) -> F32:
    """Anti-aliased coverage of ``dist < half_width`` (a one-pixel ramp)."""
    cover: F32 = np.clip((half_width - dist) * np.float32(1.0 / px) + np.float32(0.5), 0.0, 1.0)
    return cover


def _rgb(*values: float) -> F32:
    return np.array(values, dtype=np.float32)


# Colours of a chernozem steppe landscape in summer (sRGB in [0, 1]).
_CROPS = np.array(
    [
        [0.33, 0.45, 0.20],  # winter wheat, green
        [0.43, 0.54, 0.25],  # young maize / sunflower
        [0.74, 0.66, 0.42],  # ripe cereal
        [0.82, 0.76, 0.34],  # rapeseed in flower
        [0.30, 0.25, 0.20],  # fresh-ploughed chernozem
        [0.50, 0.43, 0.34],  # dry tilled soil
        [0.62, 0.59, 0.47],  # stubble
        [0.24, 0.35, 0.17],  # dense crop
        [0.52, 0.55, 0.36],  # meadow / fallow
    ],
    dtype=np.float32,
)
_GRASS = _rgb(0.46, 0.51, 0.31)
_BORDER = _rgb(0.55, 0.55, 0.40)
_TRACK = _rgb(0.64, 0.58, 0.47)
_TREE = _rgb(0.15, 0.24, 0.11)
_WATER = _rgb(0.16, 0.24, 0.27)
_SAND = _rgb(0.66, 0.62, 0.52)
_ASPHALT = _rgb(0.40, 0.40, 0.41)
_SHOULDER = _rgb(0.58, 0.55, 0.48)
_ROOFS = np.array(
    [
        [0.62, 0.30, 0.22],  # terracotta
        [0.55, 0.56, 0.58],  # galvanised steel
        [0.80, 0.80, 0.78],  # white
        [0.30, 0.31, 0.34],  # dark slate
        [0.40, 0.50, 0.60],  # blue-grey
        [0.52, 0.22, 0.20],  # red metal
    ],
    dtype=np.float32,
)
_GARDENS = np.array(
    [[0.30, 0.42, 0.20], [0.44, 0.40, 0.30], [0.36, 0.46, 0.24], [0.52, 0.50, 0.36]],
    dtype=np.float32,
)


@dataclass(frozen=True)
class _Frame:
    """A tile seen in a frame rotated by ``angle``.

    Per-pixel coordinates are float32 and relative to the tile's first pixel
    centre; the float64 origins carry the rest, so float32 arithmetic stays
    exact to millimetres 2e7 m from the world origin.
    """

    rx: F32
    ry: F32
    cos: float
    sin: float
    across: F32
    along0: float
    across0: float
    across_min: float
    across_max: float

    @classmethod
    def make(cls, xs: F64, ys: F64, angle: float) -> _Frame:
        c, s = math.cos(angle), math.sin(angle)
        rx = (xs - xs[0]).astype(np.float32)
        ry = (ys - ys[0]).astype(np.float32)
        across = (ry * np.float32(c))[:, None] - (rx * np.float32(s))[None, :]
        # The frame's extremes are at the tile's corners.
        corners = [float(ry[j]) * c - float(rx[i]) * s for i in (0, -1) for j in (0, -1)]
        across0 = float(ys[0] * c - xs[0] * s)
        return cls(
            rx,
            ry,
            c,
            s,
            across,
            float(xs[0] * c + ys[0] * s),
            across0,
            across0 + min(corners),
            across0 + max(corners),
        )

    def along(self) -> F32:
        x_part = self.rx * np.float32(self.cos)
        y_part = self.ry * np.float32(self.sin)
        out: F32 = x_part[None, :] + y_part[:, None]
        return out

    def along_at(self, idx: NDArray[np.intp]) -> F32:
        """``along`` at flat pixel indices only (the village lots near a road)."""
        rows, cols = np.divmod(idx, self.rx.size)
        out: F32 = self.rx[cols] * np.float32(self.cos) + self.ry[rows] * np.float32(self.sin)
        return out


def _paint_fields(
    w: _World, xs: F64, ys: F64, macro: tuple[int, int], px: float, detail: F32
) -> F32:
    """Crop parcels of one field system; returns a (3, len(ys), len(xs)) block."""
    mx, my = macro
    m = _unit(_hash(w.keys["macro"], mx, my, np.arange(4)))
    theta = float(m[0]) * math.pi / 2.0  # a rectangular grid repeats every 90 degrees
    band_h = 110.0 + 170.0 * float(m[1])
    wmin = 60.0 + 60.0 * float(m[2])
    wmax = wmin + 80.0 + 180.0 * float(m[3])
    c, s = np.float32(math.cos(theta)), np.float32(math.sin(theta))
    # Coordinates from the system's own corner: float32 is exact enough over
    # 2.4 km, and parcel indices stay small (world-origin indices would differ
    # by millions between bands of different parcel widths).
    lx = (xs - mx * _MACRO_M).astype(np.float32)
    ly = (ys - my * _MACRO_M).astype(np.float32)
    along = (lx * c)[None, :] + (ly * s)[:, None]
    across = (ly * c)[:, None] - (lx * s)[None, :]
    h32 = np.float32(band_h)

    # Bands of height band_h; each band is cut into parcels of its own width
    # and offset, so parcel edges do not line up from band to band, and each
    # band is split lengthwise in two at its own fraction.
    kf = np.floor(across * np.float32(1.0 / band_h))
    v = across - kf * h32
    k0 = int(kf.min())
    kf -= np.float32(k0)
    kk = kf.astype(np.intp)
    nk = int(kk.max()) + 1
    # One extra band: a band's upper edge is the next band's lower edge.
    bands = _table(w.keys["band"], (mx, mx), (my, my), (k0, k0 + nk), n_attr=5)
    width = (np.float32(wmin) + bands[:-1, 1] * np.float32(wmax - wmin))[kk]
    split = ((np.float32(0.3) + np.float32(0.4) * bands[:-1, 2]) * h32)[kk]
    shifted = along + (bands[:-1, 0] * np.float32(wmax))[kk]
    cf = np.floor(shifted / width)
    u = shifted - cf * width
    c0 = int(cf.min())
    nc = int(cf.max()) - c0 + 1
    # Parcel row (band, parcel, half) computed in float32 (exact for these
    # small integers), converted to an index once.
    row_f = kf * np.float32(2 * nc) + (cf - np.float32(c0)) * np.float32(2.0)
    row_f += v > split
    row = row_f.astype(np.intp)

    # Per-parcel colour and stripe parameters, computed on the small table.
    p = _table(
        w.keys["parcel"], (mx, mx), (my, my), (k0, k0 + nk - 1), (c0, c0 + nc - 1), (0, 1), n_attr=7
    )
    rgb = _CROPS[(p[:, 0] * len(_CROPS)).astype(np.intp)] + (p[:, 4:7] - 0.5) * np.float32(0.08)
    # Plough / drill stripes along, across or diagonal to the parcel, 6-20 m
    # apart, faded where the pixel is too coarse to show them (as _fade).
    stripe = np.where(p[:, 1] < 0.45, 0.0, np.where(p[:, 1] < 0.9, 0.5 * math.pi, 0.25 * math.pi))
    period = 6.0 + 14.0 * p[:, 2]
    freq = 2.0 * math.pi / period
    fu = (freq * np.cos(stripe)).astype(np.float32)
    fv = (freq * np.sin(stripe)).astype(np.float32)
    amp = (0.28 * np.clip((period / px - 1.0) / 3.0, 0.0, 1.0) * p[:, 3]).astype(np.float32)

    # Brightness 1 + stripes + (detail - 0.5): soil mottling on top of stripes.
    bright = np.sin(u * fu[row] + v * fv[row])
    bright *= amp[row]
    bright += detail
    bright += np.float32(0.5)
    out = np.empty((3, *v.shape), dtype=np.float32)
    for ch in range(3):
        np.multiply(rgb[:, ch][row], bright, out=out[ch])

    # Unplanted strips between parcels.
    dist = np.minimum(np.minimum(u, width - u), np.minimum(v, h32 - v))
    np.minimum(dist, np.abs(v - split), out=dist)
    _paint_band(out, _BORDER, dist, 1.5, px)

    # Some band edges carry a tree line, some a dirt track, drawn on the
    # band's lower side of the edge (one comparison instead of two).
    for attr, limit, colour, half, textured in (
        (4, 0.2, _TREE, 9.0, True),
        (3, 0.3, _TRACK, 4.0, False),
    ):
        flagged = bands[:-1, attr] < limit
        if flagged.any():
            # +inf pushes unflagged bands out of reach of the band test.
            far = np.where(flagged, np.float32(0.0), np.float32(np.inf)).astype(np.float32)
            _paint_band(
                out, colour, v + far[kk], half, px, texture=(detail, 1.8, 0.0) if textured else None
            )
    return out


def _paint_river(img: F32, w: _World, xs: F64, ys: F64, px: float, detail: F32) -> None:
    """Meandering rivers about 5 km apart, with sandy banks and riparian woods."""
    spacing, amps, waves = 5000.0, (380.0, 130.0, 45.0), (2700.0, 930.0, 310.0)
    f = _Frame.make(xs, ys, w.river_angle)
    reach = sum(amps) + 120.0
    lo = math.ceil((f.across_min - reach) / spacing)
    hi = math.floor((f.across_max + reach) / spacing)
    # Most tiles are nowhere near a river: decide that from the corners.
    alive = [m for m in range(lo, hi + 1) if _unit(_hash(w.keys["river"], m))[()] < 0.8]
    if not alive:
        return
    along = f.along()
    centre = np.zeros_like(along)
    slope = np.zeros_like(along)
    for a, wl, ph in zip(amps, waves, w.river_phases, strict=True):
        k = 2.0 * math.pi / wl
        # Phase of the tile origin folded into [0, 2 pi) keeps float32 exact.
        phase = along * np.float32(k) + np.float32((f.along0 * k + ph) % (2.0 * math.pi))
        centre += np.float32(a) * np.sin(phase)
        slope += np.float32(a * k) * np.cos(phase)
    # Perpendicular distance to the centre line, to first order in its slope.
    stretch = np.sqrt(np.float32(1.0) + slope * slope)
    dist = np.full_like(along, np.inf)
    for m in alive:
        rel = f.across - np.float32(m * spacing - f.across0) - centre
        np.minimum(dist, np.abs(rel) / stretch, out=dist)
    half = 13.0
    _paint_band(img, _TREE, dist, half + 40.0, px, opacity=0.9, texture=(detail, 1.8, 0.0))
    _paint_band(img, _SAND, dist, half + 3.0, px)
    _paint_band(img, _WATER, dist, half, px, texture=(detail, 0.4, 0.8))


def _paint_roads(img: F32, w: _World, xs: F64, ys: F64, px: float, family: int) -> None:
    """One family of long straight roads, with houses and gardens in villages."""
    spacing, half, setback, lot, depth_max = (1100.0, 1500.0)[family], 3.5, 4.0, 24.0, 70.0
    key = w.keys[f"road{family}"]
    angle = w.road_angles[family]
    f = _Frame.make(xs, ys, angle)
    reach = half + setback + depth_max + 10.0
    lo = math.ceil((f.across_min - reach) / spacing - 0.15)
    hi = math.floor((f.across_max + reach) / spacing + 0.15)
    if hi < lo:
        return
    # Lines exist with probability 0.7 and wander +-15 % of the spacing.
    lines = _table(key, (lo, hi), n_attr=2)
    alive = [
        (lo + i, np.float32((lo + i + (float(at[1]) - 0.5) * 0.3) * spacing - f.across0))
        for i, at in enumerate(lines)
        if at[0] < 0.7
    ]
    if not alive:
        return
    # Signed offset from the nearest live line (usually the only one).
    m_first, pos = alive[0]
    d = f.across - pos
    line: I64 | int = m_first
    for m, pos in alive[1:]:
        dm = f.across - pos
        closer = np.abs(dm) < np.abs(d)
        line = np.where(closer, m, line)
        d = np.where(closer, dm, d)
    dist = np.abs(d)
    _paint_band(img, _SHOULDER, dist, half + 1.5, px)
    _paint_band(img, _ASPHALT, dist, half, px)

    # Lots of 24 m on both sides of the road: a garden and usually a house.
    idx = np.flatnonzero(dist.reshape(-1) < half + setback + depth_max)
    if idx.size == 0:
        return
    q0 = math.floor(f.along0 / lot)
    a = f.along_at(idx) + np.float32(f.along0 - q0 * lot)  # from the start of lot q0
    qf = np.floor(a * np.float32(1.0 / lot))
    m_lo, m_hi = alive[0][0], alive[-1][0]
    mi = np.asarray(line).reshape(-1)[idx] - m_lo if isinstance(line, np.ndarray) else line - m_lo
    # Street villages: some 720 m stretches of road are built up from a random
    # start to a random end. Each lot decides at its centre, so a village
    # edge never cuts a house in half.
    g0 = math.floor(q0 * lot / _STREET_M)
    gpos = ((qf + np.float32(0.5)) * np.float32(lot) + np.float32(q0 * lot - g0 * _STREET_M)) * (
        np.float32(1.0 / _STREET_M)
    )
    gf = np.floor(gpos)
    gi = gf.astype(np.intp)
    gmin = int(gi.min())
    ng = int(gi.max()) - gmin + 1
    streets = _table(
        key ^ w.keys["street"], (m_lo, m_hi), (g0 + gmin, g0 + gmin + ng - 1), n_attr=3
    )
    st = streets[mi * ng + (gi - gmin)].T
    frac = gpos - gf
    built = np.flatnonzero(
        (st[0] < 0.4)
        & (frac > np.float32(0.35) * st[1])
        & (frac < np.float32(1.0) - np.float32(0.35) * st[2])
    )
    if built.size == 0:
        return
    idx, a, qf = idx[built], a[built], qf[built]
    mi = mi[built] if isinstance(mi, np.ndarray) else mi
    dd = d.reshape(-1)[idx]
    s_along = a - qf * np.float32(lot)
    e = np.abs(dd) - np.float32(half + setback)
    # Lot attributes from a table over (line, lot, side), gathered per pixel.
    qi = qf.astype(np.intp)
    qmin, qmax = int(qi.min()), int(qi.max())
    table = _table(key ^ w.keys["lot"], (m_lo, m_hi), (q0 + qmin, q0 + qmax), (0, 1), n_attr=6)
    attrs = table[(mi * (qmax - qmin + 1) + (qi - qmin)) * 2 + (dd > 0)].T
    cols = img.reshape(3, -1)[:, idx]
    garden_depth = np.float32(35.0) + np.float32(35.0) * attrs[0]
    garden = _GARDENS[(attrs[1] * len(_GARDENS)).astype(np.intp)].T
    beds = np.float32(0.9) + np.float32(0.2 * _fade(3.0 / px, 4.0)) * np.sign(
        np.sin(s_along * np.float32(2.0 * math.pi / 3.0))
    )
    in_garden = _cover(garden_depth / 2, np.abs(e - garden_depth / 2), px)
    cols += (garden * beds - cols) * in_garden

    # Houses stay 5 m from the lot ends, so a shadow never leaves its lot.
    bw = np.float32(8.0) + np.float32(6.0) * attrs[2]
    bd = np.float32(7.0) + np.float32(5.0) * attrs[3]
    s0 = np.float32(5.0) + (np.float32(lot - 10.0) - bw) * attrs[4]
    has_house = (attrs[5] < 0.85).astype(np.float32)

    def house(sa: F32, ee: F32) -> F32:
        in_s = _cover(bw / 2, np.abs(sa - (s0 + bw / 2)), px)
        in_e = _cover(bd / 2, np.abs(ee - bd / 2), px)
        cover: F32 = in_s * in_e * has_house
        return cover

    # Sun from the north-west: shadows fall 3 m south-east (in world axes).
    c, s = math.cos(angle), math.sin(angle)
    shift_a, shift_b = np.float32(3.0 * c + 3.0 * s), np.float32(3.0 * c - 3.0 * s)
    shadow = house(s_along - shift_a, np.abs(dd - shift_b) - np.float32(half + setback))
    cols *= np.float32(1.0) - np.float32(0.55) * shadow
    roof = _ROOFS[(attrs[1] * 7.0 % 1.0 * len(_ROOFS)).astype(np.intp)].T
    cols += (roof - cols) * house(s_along, e)
    img.reshape(3, -1)[:, idx] = cols


# --------------------------------------------------------------------------- tiles


def render_tile(z: int, x: int, y: int, seed: int) -> NDArray[np.uint8]:
    """Render XYZ tile ``z/x/y`` of the synthetic world ``seed`` as (256, 256, 3) RGB."""
    if not (0 <= z <= 24 and 0 <= x < 2**z and 0 <= y < 2**z):
        raise ValueError(f"no tile {z}/{x}/{y}")
    w = _world(seed)
    px = WORLD_M / (2**z * TILE_SIZE)
    centres = (np.arange(TILE_SIZE, dtype=np.float64) + 0.5) * px
    xs = x * TILE_SIZE * px + centres
    ys = y * TILE_SIZE * px + centres
    k = w.keys

    # One multi-scale texture field serves as soil mottling, crop density,
    # tree crowns and illumination: 300 m down to 5 m.
    detail = _fbm(
        k["detail"], xs, ys, px, ((300.0, 0.6), (90.0, 0.6), (30.0, 0.6), (12.0, 0.6), (5.0, 0.6))
    )
    img = np.empty((3, TILE_SIZE, TILE_SIZE), dtype=np.float32)
    # Field systems are axis-aligned squares, so inside a tile each is a block
    # of rows x columns and is painted on a slice, without per-pixel masks.
    mxs = np.floor(xs / _MACRO_M).astype(np.int64)
    mys = np.floor(ys / _MACRO_M).astype(np.int64)
    for my in np.unique(mys):
        rows = np.flatnonzero(mys == my)
        r = slice(int(rows[0]), int(rows[-1]) + 1)
        for mx in np.unique(mxs):
            cols = np.flatnonzero(mxs == mx)
            cs = slice(int(cols[0]), int(cols[-1]) + 1)
            img[:, r, cs] = _paint_fields(w, xs[cs], ys[r], (int(mx), int(my)), px, detail[r, cs])

    # Meadows and woods come and go with one km-scale noise: woods where it is
    # high, meadows where it is low, fields in between.
    forest = _fbm(k["forest"], xs, ys, px, ((1800.0, 1.0), (600.0, 0.5), (190.0, 0.3)))
    # Meadows are abandoned fields: the parcel pattern still shows through, so
    # a tile inside a meadow keeps structure.
    _paint_band(img, _GRASS, forest, 0.31, 0.04, opacity=0.75, texture=(detail, 1.0, 0.5))
    # The texture field roughens the wood's edge and opens glades near it.
    canopy = forest + (detail - np.float32(0.5)) * np.float32(0.6)
    _paint_band(img, _TREE, -canopy, -0.63, 0.05, texture=(detail, 1.8, 0.0))

    _paint_river(img, w, xs, ys, px, detail)
    for family in (0, 1):
        _paint_roads(img, w, xs, ys, px, family)

    # Illumination and haze, folded into the 0-255 scaling.
    light = detail * np.float32(0.4 * 255.0)
    light += np.float32(0.8 * 255.0)
    img *= light
    np.clip(img, 0.0, 255.0, out=img)
    out = np.empty((TILE_SIZE, TILE_SIZE, 3), dtype=np.uint8)
    for ch in range(3):
        out[..., ch] = img[ch]  # casts while interleaving: one pass per channel
    return out


def encode_jpeg(rgb: NDArray[np.uint8], quality: int = JPEG_QUALITY) -> bytes:
    """Baseline JPEG; no optimisation pass, so bytes depend only on pixels and quality."""
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- MBTiles
def _block(n_tiles: int, center: tuple[float, float], z: int) -> tuple[int, int, int]:
    """``(x0, y0, s)``: the s x s block at zoom ``z`` whose centre is nearest ``center``."""
    if n_tiles < 1:
        raise ValueError(f"n_tiles must be >= 1, got {n_tiles}")
    s = math.ceil(math.sqrt(n_tiles / 5))
    fx, fy = lonlat_to_fractional_tile(center[0], center[1], z)
    x0 = min(max(0, round(fx - s / 2)), 2**z - s)
    y0 = min(max(0, round(fy - s / 2)), 2**z - s)
    return x0, y0, s


def _tiles(x0: int, y0: int, s: int, z: int) -> Iterator[tuple[int, int, int]]:
    """XYZ ``(z, x, y)`` of the block and its children, in index order."""
    for x in range(x0, x0 + s):
        for y in range(y0, y0 + s):
            yield z, x, y
    for x in range(2 * x0, 2 * x0 + 2 * s):
        for y in range(2 * y0, 2 * y0 + 2 * s):
            yield z + 1, x, y


def write_corpus(
    path: Path,
    *,
    n_tiles: int = 320,
    seed: int = 0,
    center: tuple[float, float] = (48.455, 35.045),
    base_zoom: int = 16,
) -> CorpusLayout:
    """Write an MBTiles corpus of at least ``n_tiles`` synthetic JPEG tiles.

    ``s = ceil(sqrt(n_tiles / 5))``: an s x s block at ``base_zoom`` centred on
    ``center`` (lat, lon) plus its 2s x 2s children, 5 s^2 tiles in all.
    """
    x0, y0, s = _block(n_tiles, center, base_zoom)
    z0, z1 = base_zoom, base_zoom + 1
    lat_min = tile_bounds(z0, x0, y0 + s - 1)[0]
    _, lon_min, lat_max, _ = tile_bounds(z0, x0, y0)
    lon_max = tile_bounds(z0, x0 + s - 1, y0)[3]
    meta = {
        "name": f"takeoff-cache synthetic demo (seed {seed})",
        "format": "jpg",
        "type": "baselayer",
        "version": "1",
        "description": "Deterministic synthetic aerial imagery for tests and demos.",
        "bounds": f"{lon_min!r},{lat_min!r},{lon_max!r},{lat_max!r}",
        "center": f"{center[1]!r},{center[0]!r},{z0}",
        "minzoom": str(z0),
        "maxzoom": str(z1),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name in the same directory, then rename: a run
    # killed half-way leaves only a stray temp file, never a short corpus.
    with atomic_output(path) as tmp:
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            # No journal: atomicity comes from the rename, not from SQLite.
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            db.execute("BEGIN")
            create_schema(db)
            db.executemany("INSERT INTO metadata VALUES (?, ?)", sorted(meta.items()))
            batch: list[tuple[int, int, int, bytes]] = []
            count = 0
            for z, x, y in _tiles(x0, y0, s, z0):
                batch.append((z, x, tms_row(z, y), encode_jpeg(render_tile(z, x, y, seed))))
                if len(batch) == _BATCH:
                    db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", batch)
                    count += len(batch)
                    batch.clear()
            db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", batch)
            count += len(batch)
            db.execute("COMMIT")
        finally:
            db.close()
        os.chmod(tmp, 0o644)  # a corpus is for reading, whatever the umask
    inset = _BBOX_INSET_DEG
    bbox = (lat_min + inset, lon_min + inset, lat_max - inset, lon_max - inset)
    return CorpusLayout(path, bbox, (z0, z1), count)


def replace_tile_bytes(path: Path, z: int, x: int, y: int, data: bytes) -> None:
    """Overwrite the bytes of XYZ tile ``z/x/y`` (north-origin row) in an MBTiles file."""
    db = sqlite3.connect(path)
    try:
        with db:
            cur = db.execute(
                "UPDATE tiles SET tile_data = ? WHERE zoom_level = ? AND tile_column = ?"
                " AND tile_row = ?",
                (data, z, x, tms_row(z, y)),
            )
            if cur.rowcount != 1:
                raise KeyError(f"tile {z}/{x}/{y} is not in {path}")
    finally:
        db.close()


def corridor_area(bbox: tuple[float, float, float, float]) -> dict[str, Any]:
    """A GeoJSON Feature crossing ``bbox`` (lat_min, lon_min, lat_max, lon_max) corner to
    corner, 30% of its width wide: an area request over the demo corpus, its ring not in
    the normalized form a build hashes (so a build must normalize it)."""
    lat0, lon0, lat1, lon1 = bbox
    dlat, dlon = (lat1 - lat0) * 0.15, (lon1 - lon0) * 0.15
    ring = [
        [lon0, lat0],
        [lon0, lat0 + dlat],
        [lon1 - dlon, lat1],
        [lon1, lat1],
        [lon1, lat1 - dlat],
        [lon0 + dlon, lat0],
        [lon0, lat0],
    ]
    return {
        "type": "Feature",
        "properties": {"name": "corridor"},
        "geometry": {"type": "Polygon", "coordinates": [ring]},
    }
