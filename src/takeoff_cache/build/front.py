"""What a build checks before any work, without Prefect: validate, lock, select,
identity and the no-op check, as the flow's first phases do.

The command line runs this first, so a typo in a flag is refused, a held lock
is reported and (without a configured Prefect API) a no-op re-run is answered
in well under a second, before Prefect is started. When there is work, the
flow runs its own phases and adopts the lock taken here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from takeoff_cache.build import commit, identity, noop
from takeoff_cache.build.lock import held_early
from takeoff_cache.build.options import BuildOptions
from takeoff_cache.build.report import BuildReport
from takeoff_cache.build.validate import ValidatedRequest, validate
from takeoff_cache.core import workdir
from takeoff_cache.core.layout import MANIFEST_NAME
from takeoff_cache.tiles import selection as selection_cache


@dataclass(frozen=True)
class Precheck:
    validated: ValidatedRequest
    # The report a no-op run ends with; None when there is work to do (or no tiles:
    # the flow reports that, as a failed run).
    noop_report: BuildReport | None


@contextmanager
def prechecked(raw: dict[str, Any], options: BuildOptions) -> Iterator[Precheck]:
    """Validate the request and hold the cache's lock within; say whether it is a no-op."""
    started = time.perf_counter()
    phases: dict[str, float] = {}
    mark = started
    validated = validate(raw, options.backend, options.work_dir)
    phases["validate"], mark = _lap(mark)
    root = validated.request.cache_root
    with held_early(root):
        # A build killed mid-commit left staging behind; settle it before reading the cache.
        commit.recover(root, validated.trusted)
        phases["lock"], mark = _lap(mark)
        req = validated.request
        remembered = workdir.selections_dir(options.work_dir)
        selection = selection_cache.select_tiles_cached(
            req.corpus, req.bbox.as_tuple(), req.zoom_levels, remembered, area=req.area
        )
        phases["select"], mark = _lap(mark)
        build_id = identity.build_identity(validated, selection.fingerprint)
        phases["identity"], mark = _lap(mark)
        current = noop.current_manifest(root, validated.trusted)
        is_noop = bool(selection.tiles) and noop.is_noop(root, current, build_id, validated.trusted)
        phases["noop"], mark = _lap(mark)
        report = None
        if is_noop:
            report = BuildReport(
                outcome="idempotent_no_op",
                engines_reused=len(validated.backbones),
                descriptors_reused=len(selection.tiles),
                tiles=len(selection.tiles),
                build_identity=build_id,
                manifest_path=str(root / MANIFEST_NAME),
                elapsed_s=round(time.perf_counter() - started, 4),
                phases=phases,
            )
        yield Precheck(validated, report)


def _lap(mark: float) -> tuple[float, float]:
    now = time.perf_counter()
    return round(now - mark, 4), now
