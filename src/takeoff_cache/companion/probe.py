"""The companion's side of bring-up: what this install says about itself.

``takeoff-cache companion-probe`` prints :func:`probe`'s answer as one JSON
line: the version and manifest format installed here, the interpreter, the
user's home and working folder, the backend it would build with and that
backend's host identity, and for each path the build needs where it is (a
leading ``~`` expanded here, on the companion), whether it exists, and the free
disk under it. It creates nothing. Asking the install itself, rather than
guessing its interpreter, is what lets any install answer: a console script, a
wrapper that activates a venv first, ``python -m takeoff_cache``, a container.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from takeoff_cache import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION, __version__

# The paths bring-up asks about, as CompanionPaths names them.
PROBE_PATHS = ("cache_root", "key", "trust", "work_dir", "inputs_dir")


def _existing(path: str) -> str:
    """The nearest folder of ``path`` that exists: where its free space is measured."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _paths(wanted: dict[str, str]) -> dict[str, dict[str, Any]]:
    paths = {}
    for name, path in wanted.items():
        full = os.path.abspath(os.path.expanduser(path))
        base = _existing(full)
        paths[name] = {
            "path": full,
            "exists": os.path.exists(full),
            "is_dir": os.path.isdir(full),
            "free": shutil.disk_usage(base).free,
            "device": os.stat(base).st_dev,
        }
    return paths


def probe(backend_name: str, wanted: dict[str, str]) -> dict[str, Any]:
    """What this machine's takeoff-cache says about itself and the paths in ``wanted``."""
    out: dict[str, Any] = {
        "version": __version__,
        "manifest_format": [MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION],
        "python": sys.executable,
        "home": os.path.expanduser("~"),
        "cwd": os.getcwd(),
    }
    try:
        from takeoff_cache.engines import get_backend

        backend = get_backend(backend_name)
        out["backend"] = backend.name
        out["backend_version"] = backend.version
        out["host_identity"] = backend.host_identity()
        out["host_tag"] = backend.host_tag()
    except Exception as exc:
        text = str(exc).strip().splitlines()
        out["backend_error"] = text[0] if text else type(exc).__name__
    out["paths"] = _paths(wanted)
    return out
