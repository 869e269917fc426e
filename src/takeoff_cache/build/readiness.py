"""The readiness verdict (SPEC §11): is this cache fit for this flight?

A pure function of plain figures, so it is tested without a build: the tile
coverage (build/coverage.py), the self-test's summary (its ``route`` figures
when the views were drawn along the route, else its overall Recall@1) and the
thresholds. Not ready when

- any tile under the route is missing at a requested zoom (a hole there blinds
  the drone);
- a zoom level's share of the area's tiles is below ``min_coverage``;
- Recall@1 is below ``min_recall`` (along the route where there is one).

``allow_gaps`` accepts the first two knowingly: the verdict is then "ready with
gaps" and names them. A low Recall@1 is never a gap. Whether a not-ready verdict
stops the build (``gated``) is the caller's: ``prepare`` always, ``build`` when
asked (``--require-ready`` or ``--min-coverage``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from takeoff_cache.build.coverage import (
    RouteHole,
    TileCoverage,
    TileKey,
    tile_coverage,
    tile_name,
)
from takeoff_cache.build.options import BuildOptions
from takeoff_cache.build.request import BuildRequest

# Tiles a reason line names before "and N more".
_NAMED = 5


@dataclass(frozen=True)
class Thresholds:
    min_coverage: float | None = None  # None: the area's coverage is reported, not judged
    min_recall: float | None = None  # None: Recall@1 is reported, not judged
    allow_gaps: bool = False


def _more(shown: int, total: int) -> str:
    return f", and {total - shown} more" if total > shown else ""


def _holes_line(holes: Sequence[RouteHole]) -> str:
    named = ", ".join(f"{tile_name(h.tile)} (km {h.km:.1f})" for h in holes[:_NAMED])
    zooms = sorted({h.tile[0] for h in holes})
    per_zoom = ", ".join(f"z{z}: {sum(h.tile[0] == z for h in holes)}" for z in zooms)
    span = f"km {holes[0].km:.1f}-{holes[-1].km:.1f}" if len(holes) > 1 else f"km {holes[0].km:.1f}"
    return (
        f"route: {len(holes)} tile(s) under the route missing ({per_zoom}; {span}):"
        f" {named}{_more(min(len(holes), _NAMED), len(holes))}"
    )


def _localization(self_test: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The figures the verdict judges: the route's where the self-test gives them."""
    if not self_test:
        return None
    route = self_test.get("route")
    if isinstance(route, Mapping) and route.get("recall_at_1") is not None:
        return {
            "source": "route",
            "recall_at_1": route["recall_at_1"],
            "recall_at_5": route.get("recall_at_5"),
            "median_error_m": route.get("median_error_m"),
            "views": route.get("views"),
            "weakest": route.get("weakest"),
        }
    return {
        "source": "area",
        "recall_at_1": self_test.get("recall_at_1"),
        "recall_at_5": self_test.get("recall_at_5"),
        "median_error_m": self_test.get("median_error_m"),
        "views": self_test.get("k"),
        "weakest": None,
    }


def verdict(
    coverage: TileCoverage,
    self_test: Mapping[str, Any] | None,
    thresholds: Thresholds,
    *,
    gated: bool = True,
) -> dict[str, Any]:
    """The verdict as JSON: ``ok``, one line per ``reasons`` (why not ready) and ``gaps``
    (holes accepted under ``allow_gaps``), ``notes``, and the figures it rests on."""
    reasons: list[str] = []
    gaps: list[str] = []
    notes: list[str] = []
    route = coverage.route
    if route is not None and route.holes:
        (gaps if thresholds.allow_gaps else reasons).append(
            _holes_line(route.holes)
            + ("" if thresholds.allow_gaps else "; fetch them, or accept them with --allow-gaps")
        )
    elif route is None:
        notes.append("route: the flight gives no path; the verdict rests on the area alone")
    if route is not None and route.outside_area:
        notes.append(
            f"route: {route.outside_area} tile(s) within {route.footprint_m:g} m of the route"
            " lie outside the area and are not in the cache (a wider area takes them)"
        )
    if thresholds.min_coverage is not None:
        for z in coverage.per_zoom:
            if z.fraction >= thresholds.min_coverage:
                continue
            named = ", ".join(tile_name(t) for t in z.holes[:_NAMED])
            line = (
                f"coverage: zoom {z.zoom} holds {z.present} of the area's {z.needed} tiles"
                f" ({z.fraction:.1%}), below --min-coverage {thresholds.min_coverage:g};"
                f" missing {named}{_more(min(len(z.holes), _NAMED), len(z.holes))}"
            )
            (gaps if thresholds.allow_gaps else reasons).append(line)
    localization = _localization(self_test)
    if localization is None:
        notes.append("localization: not tested (the self-test did not run)")
    elif thresholds.min_recall is not None and thresholds.min_recall > 0:
        recall = float(localization["recall_at_1"] or 0.0)
        if recall < thresholds.min_recall:
            where = "route" if localization["source"] == "route" else "self-test"
            weakest = localization.get("weakest")
            worst = (
                f" (weakest: km {weakest['from_km']:.1f}-{weakest['to_km']:.1f},"
                f" Recall@1 {weakest['recall_at_1']:.2f})"
                if isinstance(weakest, Mapping)
                else ""
            )
            reasons.append(
                f"localization: {where} Recall@1 {recall:.2f} is below --min-recall"
                f" {thresholds.min_recall:g}{worst}; the backbone cannot place this area"
            )
    ok = not reasons
    return {
        "ok": ok,
        "verdict": ("ready with gaps" if gaps else "ready") if ok else "not ready",
        "reasons": reasons,
        "gaps": gaps,
        "notes": notes,
        "gated": gated,
        "allow_gaps": thresholds.allow_gaps,
        "min_coverage": thresholds.min_coverage,
        "min_recall": thresholds.min_recall,
        "coverage": coverage.to_json(),
        "route": route.to_json() if route is not None else None,
        "localization": localization,
    }


def judge(
    request: BuildRequest,
    present: Iterable[TileKey],
    options: BuildOptions,
    self_test: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The verdict on a build of ``request`` whose selection holds ``present``, with the
    self-test's summary (or the signed figures of the cache a no-op keeps)."""
    return verdict(
        covered_by(request, present),
        self_test,
        Thresholds(options.min_coverage, options.min_recall, options.allow_gaps),
        gated=options.gated,
    )


def not_ready_reason(ready: Mapping[str, Any]) -> str:
    """The build's failure reason for a not-ready verdict (the report's
    ``ready.reasons`` keeps them one by one)."""
    return "not ready: " + "; ".join(ready["reasons"])


def covered_by(request: BuildRequest, present: Iterable[TileKey]) -> TileCoverage:
    """The request's tile coverage (area and route) by the tiles ``present``."""
    return tile_coverage(
        request.bbox.as_tuple(),
        request.zoom_levels,
        present,
        area=request.area,
        route=request.route,
    )


def headline(ready: Mapping[str, Any]) -> str:
    """The verdict in one line: READY, READY WITH GAPS or NOT READY, and why."""
    if not ready.get("ok"):
        return f"NOT READY: {len(ready.get('reasons', []))} reason(s)"
    if ready.get("gaps"):
        return "READY WITH GAPS (accepted with --allow-gaps)"
    return "READY"


def readiness_lines(ready: Mapping[str, Any]) -> list[str]:
    """The verdict for a person, first in a report: the headline, each reason, gap and
    note on its own line, then coverage per zoom, the route's and the localization's."""
    lines = [f"ready:    {headline(ready)}"]
    lines += [f"  reason: {r}" for r in ready.get("reasons", [])]
    lines += [f"  gap:    {g}" for g in ready.get("gaps", [])]
    lines += [f"  note:   {n}" for n in ready.get("notes", [])]
    cov = ready.get("coverage") or {}
    zooms = ", ".join(
        f"z{z} {c['present']}/{c['needed']} ({c['fraction']:.1%})"
        for z, c in (cov.get("per_zoom") or {}).items()
    )
    floor = ready.get("min_coverage")
    lines.append(
        f"  area:   {zooms}" + (f" (minimum {floor:.0%} a zoom)" if floor is not None else "")
    )
    route = ready.get("route")
    if route:
        holes = route["holes_count"]
        lines.append(
            f"  route:  {route['length_km']:.1f} km, {route['tiles']} tiles within"
            f" {route['footprint_m']:g} m of it, "
            + (f"{holes} missing" if holes else "none missing")
        )
    loc = ready.get("localization")
    if loc:
        where = "along the route" if loc["source"] == "route" else "over the area"
        figures = f"Recall@1 {float(loc['recall_at_1'] or 0):.2f}"
        if loc.get("recall_at_5") is not None:
            figures += f", Recall@5 {float(loc['recall_at_5']):.2f}"
        if loc.get("median_error_m") is not None:
            figures += f", median error {float(loc['median_error_m']):.0f} m"
        if loc.get("views"):
            figures += f" ({loc['views']} views)"
        weakest = loc.get("weakest")
        if isinstance(weakest, Mapping):
            figures += (
                f"; weakest km {weakest['from_km']:.1f}-{weakest['to_km']:.1f}:"
                f" Recall@1 {weakest['recall_at_1']:.2f}"
            )
        floor = ready.get("min_recall")
        lines.append(
            f"  self-test {where}: {figures}"
            + (f" (minimum {floor:g})" if floor else " (not judged)")
        )
    return lines
