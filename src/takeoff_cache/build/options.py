"""How a build runs, beside what it builds: work folder, backend, coverage mode, expiry.

The request (``request.py``) decides the cache's content and its build
identity; these options do not. They arrive as one value, validated once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from takeoff_cache.build.request import Field
from takeoff_cache.core.workdir import resolve_work_dir
from takeoff_cache.engines import BACKENDS
from takeoff_cache.errors import InvalidRequestError

COVERAGE_MODES = ("strict", "lenient")
# A manifest lifetime beyond this cannot be written as a date (datetime's year 9999).
MAX_EXPIRES_IN_S = 100 * 365 * 86400

# Views the self-test draws by default (SPEC §11).
DEFAULT_SELF_TEST = 200
MAX_SELF_TEST = 100_000

# The options' flow parameters, as REQUEST_FIELDS lists the request's.
OPTION_FIELDS = (
    Field("work_dir", "--work-dir", "work folder (default $XDG_CACHE_HOME/takeoff-cache)"),
    Field("backend", "--backend", "auto (default) | onnxruntime | tensorrt"),
    Field("coverage", "--coverage", "strict (default) | lenient"),
    Field("expires_in_s", "--expires-in", "manifest lifetime, e.g. 36h, 7d (default: none)"),
    Field(
        "dask_address",
        "--dask-address",
        "embed descriptors on the Dask cluster whose scheduler is here (tcp://HOST:PORT);"
        " workers need the work folder at the same path",
    ),
    Field(
        "self_test",
        "--self-test",
        "synthetic drone views the self-test queries the new index with (default 200; 0 skips it)",
    ),
    Field(
        "min_recall",
        "--min-recall",
        "fail the build when the self-test's Recall@1 is below R, in [0, 1] (default: none)",
    ),
)


@dataclass(frozen=True)
class BuildOptions:
    work_dir: Path
    backend: str = "auto"
    coverage: str = "strict"
    expires_in_s: float | None = None
    dask_address: str | None = None
    self_test: int = DEFAULT_SELF_TEST
    min_recall: float | None = None

    @property
    def strict(self) -> bool:
        return self.coverage == "strict"


def build_options(
    work_dir: str | Path | None = None,
    backend: str | None = "auto",
    coverage: str | None = "strict",
    expires_in_s: float | None = None,
    dask_address: str | None = None,
    self_test: float | str | None = DEFAULT_SELF_TEST,
    min_recall: float | str | None = None,
) -> BuildOptions:
    """Validate the options as a flow or the command line received them."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise InvalidRequestError(f"backend: must be one of {', '.join(BACKENDS)}; got {backend!r}")
    coverage = coverage or "strict"
    if coverage not in COVERAGE_MODES:
        raise InvalidRequestError(f"coverage: must be strict or lenient; got {coverage!r}")
    if expires_in_s is not None:
        if isinstance(expires_in_s, bool) or not isinstance(expires_in_s, int | float):
            raise InvalidRequestError(f"expires-in: expected seconds, got {expires_in_s!r}")
        if not math.isfinite(expires_in_s) or expires_in_s <= 0:
            raise InvalidRequestError(f"expires-in: {expires_in_s} must be positive and finite")
        if expires_in_s > MAX_EXPIRES_IN_S:
            raise InvalidRequestError(
                f"expires-in: {expires_in_s:.0f} s is more than 100 years; give a shorter lifetime"
            )
    views = _self_test_views(self_test)
    threshold = _min_recall(min_recall)
    if threshold is not None and views == 0:
        raise InvalidRequestError("min-recall: needs the self-test, which --self-test 0 turns off")
    return BuildOptions(
        work_dir=resolve_work_dir(str(work_dir) if work_dir is not None else None),
        backend=backend,
        coverage=coverage,
        expires_in_s=float(expires_in_s) if expires_in_s is not None else None,
        dask_address=dask_address or None,
        self_test=views,
        min_recall=threshold,
    )


def _self_test_views(value: float | str | None) -> int:
    # A flow parameter arrives as a number, a flag as text.
    if value is None or value == "":
        return DEFAULT_SELF_TEST
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        views = int(value)
    except (ValueError, OverflowError):
        raise InvalidRequestError(
            f"self-test: expected a whole number of views, got {value!r}"
        ) from None
    if not 0 <= views <= MAX_SELF_TEST:
        raise InvalidRequestError(f"self-test: {views} views is outside [0, {MAX_SELF_TEST}]")
    return views


def _min_recall(value: float | str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        threshold = float(value)
    except ValueError:
        raise InvalidRequestError(
            f"min-recall: expected a number in [0, 1], got {value!r}"
        ) from None
    if not 0.0 <= threshold <= 1.0:  # also refuses NaN
        raise InvalidRequestError(f"min-recall: {value!r} is outside [0, 1]")
    return threshold


def parse_duration(text: str | None) -> float | None:
    """``36h``, ``7d``, ``90m``, ``30s`` or plain seconds; None for none."""
    if not text:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise InvalidRequestError(
            f"expires-in: {text!r} is not a duration like 36h or 7d"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise InvalidRequestError(f"expires-in: {text!r} must be positive")
    if value > MAX_EXPIRES_IN_S:
        raise InvalidRequestError(
            f"expires-in: {text!r} is more than 100 years; give a shorter lifetime"
        )
    return value
