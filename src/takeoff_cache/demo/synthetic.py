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
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from takeoff_cache.tilemath import lonlat_to_fractional_tile, tile_bounds, tms_row

TILE_SIZE = 256
JPEG_QUALITY = 85
# Width of the Web Mercator square in metres (2 * pi * 6378137).
WORLD_M = 2.0 * math.pi * 6378137.0
# Tiles per executemany; keeps only one batch of JPEGs in memory at a time.
_BATCH = 256
# How far CorpusLayout.bbox is pulled inside the block, in degrees: enough that
# tile_range() never picks a neighbour through rounding, far below a tile.
_BBOX_INSET_DEG = 1e-7

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
    """Hash integer coordinates (broadcast together) under ``key``."""
    arrays = [np.asarray(v, dtype=np.int64) for v in ints]
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    h: U64 = np.full(shape, key, dtype=np.uint64)
    # Wrap-around is the point of the multiplications; 0-d inputs would warn.
    with np.errstate(over="ignore"):
        for a in arrays:
            # int64 -> uint64 wraps negatives, which is exactly what a hash wants.
            h = _mix(h ^ (a.astype(np.uint64) * _GOLDEN))
    return h


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
    "light", "mottle", "forest", "crown", "village", "grass",
    "macro", "band", "parcel", "road0", "road1", "river", "lot",
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
    """Weight of a feature of size ``cell_px`` pixels: 0 below 1 px, 1 from ``full`` px.

    Dropping detail the pixel grid cannot carry (instead of aliasing it) is what
    keeps a downsampled child tile equal to its parent's quadrant.
    """
    return min(1.0, max(0.0, (cell_px - 1.0) / (full - 1.0)))


def _interp_weights(g: F64, lo: int, n: int) -> F32:
    """Row i: smoothstep weights of sample ``g[i]`` on lattice points ``lo .. lo+n-1``."""
    t = g - lo
    i = np.floor(t).astype(np.intp)
    f = (t - i).astype(np.float32)
    f = f * f * (3.0 - 2.0 * f)
    w = np.zeros((g.size, n), dtype=np.float32)
    rows = np.arange(g.size)
    w[rows, i] = 1.0 - f
    w[rows, i + 1] = f
    return w


def _value_noise(key: np.uint64, xs: F64, ys: F64, cell: float) -> F32:
    """Value noise in [0, 1] with lattice spacing ``cell`` metres.

    Smoothstep value noise is a tensor product, so a whole tile is
    ``Wy @ G @ Wx.T``: two small matrix products instead of per-pixel lookups.
    """
    gx, gy = xs / cell, ys / cell
    x0, y0 = math.floor(gx[0]), math.floor(gy[0])
    nx, ny = math.floor(gx[-1]) - x0 + 2, math.floor(gy[-1]) - y0 + 2
    lattice = _unit(
        _hash(key, np.arange(y0, y0 + ny)[:, None], np.arange(x0, x0 + nx)[None, :])
    ).astype(np.float32)
    out: F32 = _interp_weights(gy, y0, ny) @ lattice @ _interp_weights(gx, x0, nx).T
    return out


def _fbm(
    key: np.uint64, xs: F64, ys: F64, px: float, octaves: tuple[tuple[float, float], ...]
) -> F32:
    """Sum of value-noise octaves ``(cell, amplitude)``, mean 0.5, octaves finer
    than the pixel faded out (normalised by the nominal amplitudes, so fading
    changes detail but not the mean or the coarse pattern)."""
    total = sum(a for _, a in octaves)
    acc = np.zeros((ys.size, xs.size), dtype=np.float32)
    for i, (cell, amp) in enumerate(octaves):
        weight = amp * _fade(cell / px) / total
        if weight > 0.0:
            acc += np.float32(weight) * (_value_noise(key + np.uint64(i), xs, ys, cell) - 0.5)
    return acc + np.float32(0.5)


def _aa(half_width: float | F32, dist: F32, px: float) -> F32:
    """Anti-aliased coverage of a band ``|dist| < half_width`` (one-pixel ramp)."""
    cover: F32 = np.clip((half_width - dist) / np.float32(px) + 0.5, 0.0, 1.0)
    return cover


def _blend(img: F32, colour: F32 | NDArray[np.float32], alpha: F32) -> None:
    """In place: ``img = img * (1 - alpha) + colour * alpha``."""
    a = alpha[..., None]
    img += (colour - img) * a


# --------------------------------------------------------------------------- palette
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
_GRASS = np.array([0.46, 0.51, 0.31], dtype=np.float32)
_GRASS_DRY = np.array([0.60, 0.58, 0.42], dtype=np.float32)
_BORDER = np.array([0.55, 0.55, 0.40], dtype=np.float32)
_TRACK = np.array([0.64, 0.58, 0.47], dtype=np.float32)
_TREE = np.array([0.15, 0.24, 0.11], dtype=np.float32)
_WATER = np.array([0.16, 0.24, 0.27], dtype=np.float32)
_SAND = np.array([0.66, 0.62, 0.52], dtype=np.float32)
_ASPHALT = np.array([0.40, 0.40, 0.41], dtype=np.float32)
_SHOULDER = np.array([0.58, 0.55, 0.48], dtype=np.float32)
_ROOFS = np.array(
    [
        [0.62, 0.30, 0.22],  # terracotta
        [0.55, 0.56, 0.58],  # galvanised
        [0.80, 0.80, 0.78],  # white
        [0.30, 0.31, 0.34],  # dark slate
        [0.40, 0.50, 0.60],  # blue-grey
        [0.52, 0.22, 0.20],  # red metal
    ],
    dtype=np.float32,
)
_GARDENS = np.array(
    [
        [0.30, 0.42, 0.20],
        [0.44, 0.40, 0.30],
        [0.36, 0.46, 0.24],
        [0.52, 0.50, 0.36],
    ],
    dtype=np.float32,
)


# --------------------------------------------------------------------------- layers
_MACRO_M = 2400.0  # size of a field system (one grid orientation and parcel size)


def _paint_fields(
    img: F32, w: _World, xs: F64, ys: F64, macro: tuple[int, int], px: float,
    mottle: F32, crown: F32,
) -> None:
    """Crop parcels of one field system into ``img`` (a view of the tile)."""
    mx, my = macro
    m = _unit(_hash(w.keys["macro"], mx, my, np.arange(4)))
    theta = float(m[0]) * math.pi / 2.0  # a rectangular grid repeats every 90 degrees
    band_h = 110.0 + 170.0 * float(m[1])
    wmin = 60.0 + 60.0 * float(m[2])
    wmax = wmin + 80.0 + 180.0 * float(m[3])
    c, s = math.cos(theta), math.sin(theta)
    # Coordinates from the system's own corner: parcel indices stay small
    # (a band's parcel count depends on its width, so world-origin indices
    # of neighbouring bands would differ by millions and explode the table).
    lx, ly = xs - mx * _MACRO_M, ys - my * _MACRO_M
    along = lx[None, :] * c + ly[:, None] * s
    across = ly[:, None] * c - lx[None, :] * s

    # Bands of height band_h; each band is cut into parcels of its own width
    # and offset, so parcel edges do not line up from band to band.
    kf = np.floor(across / band_h)
    k = kf.astype(np.int64)
    v = (across - kf * band_h).astype(np.float32)
    k0, k1 = int(k.min()), int(k.max())
    # One extra row: a band's upper edge is the next band's lower edge.
    bands = _table(w.keys["band"], (mx, mx), (my, my), (k0, k1 + 1), n_attr=5)
    kk = k - k0
    b_lo, b_hi = bands[kk], bands[kk + 1]
    width = wmin + b_lo[..., 1].astype(np.float64) * (wmax - wmin)
    shifted = along + b_lo[..., 0] * wmax
    cf = np.floor(shifted / width)
    u = (shifted - cf * width).astype(np.float32)
    width32 = width.astype(np.float32)
    split = (np.float32(0.3) + np.float32(0.4) * b_lo[..., 2]) * np.float32(band_h)
    sub = v > split
    ci = cf.astype(np.int64)
    c0, c1 = int(ci.min()), int(ci.max())
    parcels = _table(w.keys["parcel"], (mx, mx), (my, my), (k0, k1), (c0, c1), (0, 1), n_attr=7)
    at = parcels[(kk * (c1 - c0 + 1) + (ci - c0)) * 2 + sub]

    colour = _CROPS[(at[..., 0] * len(_CROPS)).astype(np.intp)]
    colour += (at[..., 4:7] - 0.5) * np.float32(0.08)  # per-parcel hue jitter

    # Plough / drill stripes along, across or diagonal to the parcel.
    o = at[..., 1]
    coord = np.where(o < 0.45, u, np.where(o < 0.9, v, (u + v) * np.float32(0.7071)))
    period = np.float32(6.0) + np.float32(14.0) * at[..., 2]
    stripe_amp = np.float32(0.28 * _fade(6.0 / px, 4.0)) * at[..., 3]
    bright = (
        np.float32(1.0)
        + stripe_amp * np.sin(coord * (np.float32(2.0 * math.pi) / period))
        + (mottle - np.float32(0.5)) * np.float32(0.9)
    )
    colour *= bright[..., None]

    # Unplanted strips between parcels.
    du = np.minimum(u, width32 - u)
    dv = np.minimum(np.minimum(v, np.float32(band_h) - v), np.abs(v - split))
    _blend(colour, _BORDER, _aa(1.5, np.minimum(du, dv), px))

    # Some band edges carry a tree line, some a dirt track.
    edge_lo, edge_hi = v, np.float32(band_h) - v
    inf = np.float32(np.inf)
    d_tree = np.minimum(
        np.where(b_lo[..., 4] < 0.22, edge_lo, inf), np.where(b_hi[..., 4] < 0.22, edge_hi, inf)
    )
    tree_col = _TREE * (np.float32(0.55) + np.float32(0.9) * crown)[..., None]
    _blend(colour, tree_col, _aa(7.0, d_tree, px))
    d_track = np.minimum(
        np.where(b_lo[..., 3] < 0.3, edge_lo, inf), np.where(b_hi[..., 3] < 0.3, edge_hi, inf)
    )
    _blend(colour, _TRACK, _aa(2.5, d_track, px))
    img[...] = colour


def _paint_river(img: F32, w: _World, xs: F64, ys: F64, px: float, crown: F32) -> None:
    """Meandering rivers, 5 km apart, with sandy banks and riparian woods."""
    spacing, amps, waves = 5000.0, (380.0, 130.0, 45.0), (2700.0, 930.0, 310.0)
    c, s = math.cos(w.river_angle), math.sin(w.river_angle)
    # Cheap early exit: most tiles are nowhere near a river.
    cx = np.array([xs[0], xs[-1], xs[0], xs[-1]])
    cy = np.array([ys[0], ys[0], ys[-1], ys[-1]])
    across_c = cy * c - cx * s
    reach = sum(amps) + 120.0
    m_lo = math.floor((across_c.min() - reach) / spacing)
    m_hi = math.ceil((across_c.max() + reach) / spacing)
    alive = [mi for mi in range(m_lo, m_hi + 1)
             if _unit(_hash(w.keys["river"], mi))[()] < 0.8]
    if not alive:
        return
    along = xs[None, :] * c + ys[:, None] * s
    across = ys[:, None] * c - xs[None, :] * s
    phase = [2.0 * math.pi * along / wl + p for wl, p in zip(waves, w.river_phases, strict=True)]
    centre = sum(a * np.sin(ph) for a, ph in zip(amps, phase, strict=True))
    slope = sum(a * 2.0 * math.pi / wl * np.cos(ph)
                for a, wl, ph in zip(amps, waves, phase, strict=True))
    rel = across - centre
    mi = np.floor(rel / spacing + 0.5)
    exists = np.isin(mi.astype(np.int64), alive)
    # Perpendicular distance to the centre line, to first order in its slope.
    dist = (np.abs(rel - mi * spacing) / np.sqrt(1.0 + slope * slope)).astype(np.float32)
    dist = np.where(exists, dist, np.float32(np.inf))
    half = np.float32(11.0) + np.float32(5.0) * np.sin(along / 1700.0).astype(np.float32)
    tree_col = _TREE * (np.float32(0.5) + np.float32(1.0) * crown)[..., None]
    _blend(img, tree_col, _aa(half + 40.0, dist, px) * np.float32(0.9))
    _blend(img, _SAND, _aa(half + 3.0, dist, px))
    _blend(img, _WATER, _aa(half, dist, px))


def _paint_roads(
    img: F32, w: _World, xs: F64, ys: F64, px: float, family: int, village: F32
) -> None:
    """One family of long straight roads, with houses and gardens in villages."""
    spacing, half, setback, lot = (1100.0, 1500.0)[family], 3.5, 4.0, 24.0
    key = w.keys[f"road{family}"]
    angle = w.road_angles[family]
    c, s = math.cos(angle), math.sin(angle)
    along = xs[None, :] * c + ys[:, None] * s
    across = ys[:, None] * c - xs[None, :] * s
    mf = np.floor(across / spacing + 0.5)
    mi = mf.astype(np.int64)
    m0, m1 = int(mi.min()), int(mi.max())
    lines = _table(key, (m0, m1), n_attr=2)
    at = lines[mi - m0]
    exists = at[..., 0] < 0.7
    if not exists.any():
        return
    # Lines wander up to +-15 % of the spacing so the grid is not regular.
    d = (across - (mf + (at[..., 1] - 0.5) * 0.3) * spacing).astype(np.float32)
    dist = np.where(exists, np.abs(d), np.float32(np.inf))
    _blend(img, _SHOULDER, _aa(half + 1.5, dist, px))
    _blend(img, _ASPHALT, _aa(half, dist, px))

    # Village lots on both sides: gardens, a house with its shadow.
    depth_max = 70.0
    near = (dist < half + setback + depth_max) & (village > 0.5)
    idx = np.flatnonzero(near)
    if idx.size == 0:
        return
    a = along.reshape(-1)[idx]
    dd = d.reshape(-1)[idx]
    side = (dd > 0).astype(np.int64)
    qf = np.floor(a / lot)
    s_along = (a - qf * lot).astype(np.float32)
    e = np.abs(dd) - np.float32(half + setback)
    attrs = _unit(_hash(key ^ w.keys["lot"], mi.reshape(-1)[idx], qf.astype(np.int64), side,
                        np.arange(6)[:, None])).astype(np.float32)
    garden_depth = np.float32(35.0) + np.float32(35.0) * attrs[0]
    flat = img.reshape(-1, 3)
    px_cols = flat[idx]
    garden = _GARDENS[(attrs[1] * len(_GARDENS)).astype(np.intp)]
    beds = np.float32(0.9) + np.float32(0.2 * _fade(3.0 / px, 4.0)) * np.sign(
        np.sin(s_along * np.float32(2.0 * math.pi / 3.0)))
    _blend(px_cols, garden * beds[:, None], _aa(garden_depth / 2, np.abs(e - garden_depth / 2), px))

    # Houses are kept 5 m from the lot ends so their shadows stay in the lot.
    bw = np.float32(8.0) + np.float32(6.0) * attrs[2]
    bd = np.float32(7.0) + np.float32(5.0) * attrs[3]
    s0 = np.float32(5.0) + (np.float32(lot - 10.0) - bw) * attrs[4]
    has_house = attrs[5] < 0.85

    def inside(sa: F32, ee: F32) -> F32:
        in_s = _aa(bw / 2, np.abs(sa - (s0 + bw / 2)), px)
        in_e = _aa(bd / 2, np.abs(ee - bd / 2), px)
        cover: F32 = in_s * in_e * has_house
        return cover

    # Sun from the north-west: the shadow falls 3 m south-east in world axes.
    sx, sy = 3.0, 3.0
    shift_a = np.float32(sx * c + sy * s)
    shift_b = np.float32(sy * c - sx * s)
    e_shadow = np.abs(dd - shift_b) - np.float32(half + setback)
    shadow = inside(s_along - shift_a, e_shadow)
    px_cols *= (np.float32(1.0) - np.float32(0.55) * shadow)[:, None]
    roof = _ROOFS[(attrs[1] * 7.0 % 1.0 * len(_ROOFS)).astype(np.intp)]
    _blend(px_cols, roof, inside(s_along, e))
    flat[idx] = px_cols


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

    mottle = _fbm(k["mottle"], xs, ys, px, ((60.0, 1.0), (18.0, 0.6), (6.0, 0.4)))
    crown = _fbm(k["crown"], xs, ys, px, ((14.0, 1.0), (5.0, 0.8)))
    village = _fbm(k["village"], xs, ys, px, ((2600.0, 1.0), (800.0, 0.5)))
    forest = _fbm(k["forest"], xs, ys, px, ((1800.0, 1.0), (600.0, 0.5), (190.0, 0.3)))
    light = _fbm(k["light"], xs, ys, px, ((900.0, 1.0), (300.0, 0.7), (90.0, 0.5), (30.0, 0.4)))

    img = np.empty((TILE_SIZE, TILE_SIZE, 3), dtype=np.float32)
    # Field systems are axis-aligned squares, so inside a tile each is a block
    # of rows x columns and is painted on a slice (no per-pixel masks).
    mxs = np.floor(xs / _MACRO_M).astype(np.int64)
    mys = np.floor(ys / _MACRO_M).astype(np.int64)
    for my in np.unique(mys):
        rows = np.flatnonzero(mys == my)
        r = slice(int(rows[0]), int(rows[-1]) + 1)
        for mx in np.unique(mxs):
            cols = np.flatnonzero(mxs == mx)
            cs = slice(int(cols[0]), int(cols[-1]) + 1)
            _paint_fields(img[r, cs], w, xs[cs], ys[r], (int(mx), int(my)), px,
                          mottle[r, cs], crown[r, cs])

    # Meadows between field systems' fields and woods.
    grass = _fbm(k["grass"], xs, ys, px, ((400.0, 1.0), (40.0, 0.5)))
    meadow = np.clip((np.float32(0.40) - grass) * np.float32(25.0) + np.float32(0.5), 0.0, 1.0)
    meadow_col = _GRASS + (_GRASS_DRY - _GRASS) * mottle[..., None]
    _blend(img, meadow_col, meadow)
    woods = np.clip((forest - np.float32(0.6)) * np.float32(14.0), 0.0, 1.0)
    _blend(img, _TREE * (np.float32(0.5) + np.float32(1.0) * crown)[..., None], woods)

    _paint_river(img, w, xs, ys, px, crown)
    for family in (0, 1):
        _paint_roads(img, w, xs, ys, px, family, village)

    img *= (np.float32(0.8) + np.float32(0.4) * light)[..., None]
    out: NDArray[np.uint8] = np.clip(img * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    return out


def encode_jpeg(rgb: NDArray[np.uint8], quality: int = JPEG_QUALITY) -> bytes:
    """Baseline JPEG; no optimisation pass, so bytes depend only on pixels and quality."""
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- MBTiles
def _block(n_tiles: int, center: tuple[float, float], z: int) -> tuple[int, int, int]:
    """``(x0, y0, s)``: the s x s base-zoom block nearest to centred on ``center``."""
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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            # No journal: atomicity comes from the rename, not from SQLite.
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            db.execute("BEGIN")
            db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
            db.execute(
                "CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER,"
                " tile_row INTEGER, tile_data BLOB)"
            )
            db.execute(
                "CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)"
            )
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
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
