"""How a build runs, beside what it builds: work folder, backend, coverage mode, expiry.

The request (``request.py``) decides the cache's content and its build
identity; these options do not. They arrive as one value, validated once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from takeoff_cache.build.request import Field
from takeoff_cache.core.workdir import resolve_work_dir
from takeoff_cache.engines import BACKENDS
from takeoff_cache.errors import InvalidRequestError

COVERAGE_MODES = ("strict", "lenient")
# A manifest lifetime beyond this cannot be written as a date (datetime's year 9999).
MAX_EXPIRES_IN_S = 100 * 365 * 86400

# prepare's protective defaults for the readiness verdict (SPEC §11); build's are off.
PREPARE_MIN_COVERAGE = 0.98
PREPARE_MIN_RECALL = 0.5

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
        "fail the build when the self-test's Recall@1 is below R, in [0, 1] (default: none;"
        " prepare: 0.5, and its verdict judges Recall@1 along the route; 0 turns it off)",
    ),
    Field(
        "min_coverage",
        "--min-coverage",
        "not ready when a zoom level holds less than F of the area's tiles, in [0, 1]"
        " (prepare: default 0.98; build: judged only when given)",
    ),
    Field(
        "allow_gaps",
        "--allow-gaps",
        "accept missing tiles under the route and below --min-coverage knowingly:"
        " the verdict is 'ready with gaps' and names them",
        switch=True,
    ),
    Field(
        "require_ready",
        "--require-ready",
        "build: stop with exit 12, the previous cache in force, when the readiness"
        " verdict is not ready (prepare always does)",
        switch=True,
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
    min_coverage: float | None = None
    allow_gaps: bool = False
    require_ready: bool = False

    @property
    def strict(self) -> bool:
        return self.coverage == "strict"

    @property
    def gated(self) -> bool:
        """Whether a not-ready verdict stops the build (SPEC §11): when asked for."""
        return self.require_ready or self.min_coverage is not None


def build_options(
    work_dir: str | Path | None = None,
    backend: str | None = "auto",
    coverage: str | None = "strict",
    expires_in_s: float | None = None,
    dask_address: str | None = None,
    self_test: float | str | None = DEFAULT_SELF_TEST,
    min_recall: float | str | None = None,
    min_coverage: float | str | None = None,
    allow_gaps: bool | str | None = None,
    require_ready: bool | str | None = None,
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
    threshold = _fraction("min-recall", min_recall)
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
        min_coverage=_fraction("min-coverage", min_coverage),
        allow_gaps=_switch("allow-gaps", allow_gaps),
        require_ready=_switch("require-ready", require_ready),
    )


def for_prepare(options: dict[str, Any]) -> dict[str, Any]:
    """``prepare``'s options: the build's, with the verdict's protective defaults (a
    value given, ``0`` included, is kept) and the verdict always required."""
    out = dict(options)
    if out.get("min_coverage") in (None, ""):
        out["min_coverage"] = PREPARE_MIN_COVERAGE
    self_test = out.get("self_test")
    if out.get("min_recall") in (None, "") and self_test not in (0, "0"):
        out["min_recall"] = PREPARE_MIN_RECALL
    out["require_ready"] = True
    return out


def _switch(name: str, value: bool | str | None) -> bool:
    # A flow parameter arrives as a bool, a flag as text ("yes" when given alone).
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("yes", "true", "on", "1"):
        return True
    if text in ("no", "false", "off", "0"):
        return False
    raise InvalidRequestError(f"{name}: expected yes or no, got {value!r}")


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


def _fraction(name: str, value: float | str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        threshold = float(value)
    except ValueError:
        raise InvalidRequestError(f"{name}: expected a number in [0, 1], got {value!r}") from None
    if not 0.0 <= threshold <= 1.0:  # also refuses NaN
        raise InvalidRequestError(f"{name}: {value!r} is outside [0, 1]")
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
