"""How a build runs, beside what it builds: work folder, backend, coverage mode, expiry.

The request (``request.py``) decides the cache's content and its build
identity; these options do not. They arrive as one value, validated once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .engines import BACKENDS
from .errors import InvalidRequestError
from .request import Field
from .workdir import resolve_work_dir

COVERAGE_MODES = ("strict", "lenient")
# A manifest lifetime beyond this cannot be written as a date (datetime's year 9999).
MAX_EXPIRES_IN_S = 100 * 365 * 86400

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
)


@dataclass(frozen=True)
class BuildOptions:
    work_dir: Path
    backend: str = "auto"
    coverage: str = "strict"
    expires_in_s: float | None = None
    dask_address: str | None = None

    @property
    def strict(self) -> bool:
        return self.coverage == "strict"


def build_options(
    work_dir: str | Path | None = None,
    backend: str | None = "auto",
    coverage: str | None = "strict",
    expires_in_s: float | None = None,
    dask_address: str | None = None,
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
    return BuildOptions(
        work_dir=resolve_work_dir(str(work_dir) if work_dir is not None else None),
        backend=backend,
        coverage=coverage,
        expires_in_s=float(expires_in_s) if expires_in_s is not None else None,
        dask_address=dask_address or None,
    )


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
