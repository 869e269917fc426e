"""The bring-up probe: the program ``bring_up`` runs on the companion.

It is sent as the standard input of the companion's own interpreter
(``python - ARGS``), so it uses the standard library and the companion's
takeoff_cache only, and prints one JSON line: the version and manifest format
installed there, the backend it would build with and that backend's host
identity, and for each path the build needs whether it exists, where it is and
the free disk under it. It creates nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any


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


def probe(args: dict[str, Any]) -> dict[str, Any]:
    """What this machine's takeoff-cache says about itself and the paths in ``args``."""
    try:
        import takeoff_cache
    except ImportError as exc:
        return {"import_error": str(exc)}
    out: dict[str, Any] = {
        "version": takeoff_cache.__version__,
        # Read loosely: an older or newer companion may name its format differently.
        "manifest_format": [
            getattr(takeoff_cache, "MANIFEST_FORMAT", None),
            getattr(takeoff_cache, "MANIFEST_FORMAT_VERSION", None),
        ],
        "python": sys.executable,
    }
    try:
        from takeoff_cache.engines import get_backend

        backend = get_backend(args["backend"])
        out["backend"] = backend.name
        out["backend_version"] = backend.version
        out["host_identity"] = backend.host_identity()
        out["host_tag"] = backend.host_tag()
    except Exception as exc:
        text = str(exc).strip().splitlines()
        out["backend_error"] = text[0] if text else type(exc).__name__
    out["paths"] = _paths(args["paths"])
    return out


def main(argv: list[str]) -> int:
    print(json.dumps(probe(json.loads(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
