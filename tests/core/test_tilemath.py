"""Web Mercator tile math: known coordinates, inverses, ranges and clamping."""

from __future__ import annotations

import math

import pytest

from takeoff_cache.core.tilemath import (
    MAX_LAT,
    lonlat_to_fractional_tile,
    tile_bounds,
    tile_range,
    tms_row,
)


def test_equator_prime_meridian_is_the_centre_of_the_z1_grid() -> None:
    fx, fy = lonlat_to_fractional_tile(0.0, 0.0, 1)
    assert fx == pytest.approx(1.0)
    assert fy == pytest.approx(1.0)
    assert tile_range((0.0, 0.0, 10.0, 10.0), 1) == (1, 1, 0, 0)
    assert tile_range((-10.0, -10.0, -1.0, -1.0), 1) == (0, 0, 1, 1)


def test_berlin_at_z10_is_tile_550_335() -> None:
    fx, fy = lonlat_to_fractional_tile(52.52, 13.405, 10)
    assert (math.floor(fx), math.floor(fy)) == (550, 335)
    assert tile_range((52.519, 13.404, 52.521, 13.406), 10) == (550, 550, 335, 335)


def test_z0_is_one_tile_covering_the_world() -> None:
    assert lonlat_to_fractional_tile(0.0, -180.0, 0) == pytest.approx((0.0, 0.5))
    assert tile_range((-MAX_LAT, -180.0, MAX_LAT, 180.0), 0) == (0, 0, 0, 0)


def test_rows_count_from_the_north() -> None:
    _, north = lonlat_to_fractional_tile(60.0, 0.0, 5)
    _, south = lonlat_to_fractional_tile(-60.0, 0.0, 5)
    assert north < south


@pytest.mark.parametrize(
    ("z", "x", "y"), [(0, 0, 0), (1, 1, 0), (5, 17, 11), (10, 550, 335), (16, 38000, 22000)]
)
def test_tile_bounds_corners_map_back_to_the_tile_corners(z: int, x: int, y: int) -> None:
    lat_min, lon_min, lat_max, lon_max = tile_bounds(z, x, y)
    assert lat_min < lat_max and lon_min < lon_max
    assert lonlat_to_fractional_tile(lat_max, lon_min, z) == pytest.approx((x, y), abs=1e-9)
    assert lonlat_to_fractional_tile(lat_min, lon_max, z) == pytest.approx((x + 1, y + 1), abs=1e-9)


def test_tile_bounds_of_the_world_reach_the_mercator_limit() -> None:
    lat_min, lon_min, lat_max, lon_max = tile_bounds(0, 0, 0)
    assert (lon_min, lon_max) == (-180.0, 180.0)
    assert lat_max == pytest.approx(MAX_LAT)
    assert lat_min == pytest.approx(-MAX_LAT)


def test_tile_range_includes_every_tile_the_bbox_intersects() -> None:
    # A bbox from the centre of tile (550, 335) to the centre of (552, 337) at z10.
    a = tile_bounds(10, 550, 335)
    b = tile_bounds(10, 552, 337)
    bbox = ((b[0] + b[2]) / 2, (a[1] + a[3]) / 2, (a[0] + a[2]) / 2, (b[1] + b[3]) / 2)
    assert tile_range(bbox, 10) == (550, 552, 335, 337)
    # One zoom up: column 1105 starts exactly at lon_max (the centre of 552) and is left out.
    assert tile_range(bbox, 11) == (1101, 1104, 671, 675)


def test_tile_range_excludes_neighbours_that_only_touch_a_meridian_edge() -> None:
    # Meridians between tiles are exact in floating point: lon 0 and lon 90 at z2.
    lat_mid = 30.0
    assert tile_range((lat_mid - 1, 0.0, lat_mid + 1, 90.0), 2) == (2, 2, 1, 1)


def test_tile_range_excludes_neighbours_that_only_touch_the_equator() -> None:
    assert tile_range((0.0, 1.0, 10.0, 2.0), 1) == (1, 1, 0, 0)
    assert tile_range((-10.0, 1.0, 0.0, 2.0), 1) == (1, 1, 1, 1)


@pytest.mark.parametrize(("z", "x", "y"), [(2, 2, 1), (10, 550, 334), (10, 550, 338)])
def test_tile_range_of_exact_tile_bounds_is_that_single_tile(z: int, x: int, y: int) -> None:
    assert tile_range(tile_bounds(z, x, y), z) == (x, x, y, y)


def test_tile_range_clamps_at_the_antimeridian_and_mercator_limit() -> None:
    last = 2**4 - 1
    assert tile_range((-MAX_LAT, -180.0, MAX_LAT, 180.0), 4) == (0, last, 0, last)
    # Latitudes beyond Web Mercator clamp to the first/last row.
    assert tile_range((84.0, 179.0, 89.9, 180.0), 4) == (last, last, 0, 0)
    assert tile_range((-89.9, -180.0, -84.0, -179.0), 4) == (0, 0, last, last)
    assert tile_range((-90.0, -180.0, 90.0, 180.0), 3) == (0, 7, 0, 7)


def test_fractional_tile_latitude_is_clamped_to_mercator_limit() -> None:
    assert lonlat_to_fractional_tile(90.0, 0.0, 3) == lonlat_to_fractional_tile(MAX_LAT, 0.0, 3)
    assert lonlat_to_fractional_tile(-90.0, 0.0, 3) == lonlat_to_fractional_tile(-MAX_LAT, 0.0, 3)


@pytest.mark.parametrize("z", [0, 1, 5, 16, 22])
def test_tms_row_is_its_own_inverse(z: int) -> None:
    for row in {0, 1, (1 << z) // 2, (1 << z) - 1}:
        assert tms_row(z, tms_row(z, row)) == row
    assert tms_row(z, 0) == (1 << z) - 1


def test_tms_row_flips_known_rows() -> None:
    assert tms_row(10, 335) == 688
    assert tms_row(1, 0) == 1
    assert tms_row(0, 0) == 0
