"""Documents from outside, read within a size and parsed within a nesting depth.

Flight plans, flight files, the flights API's answers, ``--area`` GeoJSON, request
and backbones TOML all go through here. Python's parsers recurse: JSON nested
100 000 deep stops them with a RecursionError, and one nested 900 deep parses but
breaks whatever walks it next (hashing, shapely). No document we read needs more
than a handful of levels, so :data:`MAX_DEPTH` is far above any real one and far
below the interpreter's limit. Each parser names the error class its callers
document (a flight's exit 9, a request's exit 2), and every refusal is one line.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from takeoff_cache.core.fsutil import read_regular
from takeoff_cache.errors import TakeoffCacheError

MAX_DEPTH = 64  # a GeoJSON MultiPolygon in a FeatureCollection is 8 levels deep

# The largest document of each kind read from a file.
MAX_FLIGHT_BYTES = 8 << 20  # decoded; a flight of thousands of waypoints is a few MB
MAX_AREA_BYTES = 16 << 20  # a 2,000 km corridor's outline, densified every 200 m, is ~1 MB
MAX_REQUEST_BYTES = MAX_AREA_BYTES  # a request may hold its area as an inline table
MAX_BACKBONES_BYTES = 1 << 20

Error = type[TakeoffCacheError]


def read_document(path: Path, max_bytes: int, error: Error, what: str) -> bytes:
    """The bytes of the regular file ``path`` (``fsutil.read_regular``); any problem is
    one ``error`` line starting ``what:``."""
    try:
        return read_regular(path, max_bytes)
    except (FileNotFoundError, NotADirectoryError):
        raise error(f"{what}: {path} does not exist") from None
    except OSError as exc:
        raise error(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise error(f"{what}: {path} {exc}") from None


def load_json(data: bytes | str, source: str, error: Error, what: str) -> Any:
    """Parsed JSON, refused as one ``error`` line when invalid or deeper than :data:`MAX_DEPTH`."""
    try:
        obj = json.loads(data)
    except RecursionError:
        raise error(_too_deep(source, what)) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise error(f"{what}: {source} is not valid JSON: {exc}") from None
    check_depth(obj, source, error, what)
    return obj


def load_toml(text: str, source: str, error: Error, what: str) -> dict[str, Any]:
    """Parsed TOML, refused as one ``error`` line when invalid or deeper than :data:`MAX_DEPTH`."""
    try:
        doc = tomllib.loads(text)
    except RecursionError:
        raise error(_too_deep(source, what)) from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what}: {source} is not valid TOML: {exc}") from None
    check_depth(doc, source, error, what)
    return doc


def check_depth(obj: Any, source: str, error: Error, what: str) -> None:
    """Refuse ``obj`` (parsed JSON or TOML, or a value handed over as such) when its lists
    and tables nest deeper than :data:`MAX_DEPTH`; walked without recursion."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list | tuple):
            children = value
        else:
            continue
        if depth > MAX_DEPTH:
            raise error(_too_deep(source, what))
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def _too_deep(source: str, what: str) -> str:
    return f"{what}: {source} nests lists or tables deeper than {MAX_DEPTH} levels"
