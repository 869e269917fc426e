"""What the companion's build needs, made small: the selected tiles, the models, a request.

The companion gets an MBTiles holding exactly the selected tiles, not the
workstation's corpus, which may span a country. Files are written so the same
inputs give the same bytes: a second run finds every SHA-256 already there
and sends nothing.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from takeoff_cache.build.request import REQUEST_FIELDS, BuildRequest
from takeoff_cache.companion.bringup import CompanionPaths
from takeoff_cache.core.fsutil import atomic_output
from takeoff_cache.core.tilemath import tile_bounds, tms_row
from takeoff_cache.errors import BackboneError, CorpusError
from takeoff_cache.tiles.corpus import Tile, open_corpus
from takeoff_cache.tiles.mbtiles import create_schema

_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"RIFF", "webp"))
# Room a build needs besides its inputs: per tile its copy and descriptors, per model an
# engine about its size, plus a margin for indexes and staging (checked, not exact).
_PER_TILE_OVERHEAD = 16 * 1024
_MARGIN = 64 * 2**20

# How each path field of the request reaches the companion; every other field
# travels as its value. A file sent there takes this name in its inputs folder:
INPUT_NAMES = {
    "corpus": "tiles.mbtiles",
    "backbones": "backbones.toml",
    "calibration": "calibration.npz",
}
# the cache root, signing key and trust store are the companion's own (CompanionPaths):
COMPANION_OWN = ("cache_root", "key", "trust")
# and the area and route travel inline: the request holds their geometry, not their files.
INLINE = ("area", "route")


@dataclass(frozen=True)
class Upload:
    """One file to send: where it is here, and its name in the companion's inputs folder."""

    local: Path
    name: str


def write_tile_subset(corpus: Path, tiles: Sequence[Tile], out: Path) -> int:
    """Write an MBTiles holding exactly ``tiles`` of ``corpus``; return how many.

    Rows go in sorted order into a fresh file, so equal selections give equal bytes.
    """
    coords = sorted((t.z, t.x, t.y) for t in tiles)
    with open_corpus(corpus) as source:
        blobs = source.read_many(coords)
    missing = [f"{z}/{x}/{y}" for (z, x, y), b in zip(coords, blobs, strict=True) if b is None]
    if missing:
        raise CorpusError(f"corpus: {len(missing)} selected tile(s) gone, e.g. {missing[0]}")
    with atomic_output(out) as tmp:
        db = sqlite3.connect(tmp)
        try:
            create_schema(db)
            rows = [
                (z, x, tms_row(z, y), blob) for (z, x, y), blob in zip(coords, blobs, strict=True)
            ]
            db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", rows)
            db.executemany("INSERT INTO metadata VALUES (?, ?)", _metadata(coords, blobs))
            db.commit()
        finally:
            db.close()
    return len(coords)


def _metadata(
    coords: Sequence[tuple[int, int, int]], blobs: Sequence[bytes | None]
) -> list[tuple[str, str]]:
    first = next((b for b in blobs if b), b"")
    fmt = next((name for magic, name in _MAGIC if first.startswith(magic)), "jpg")
    meta = [("name", "takeoff-cache selection"), ("format", fmt), ("type", "baselayer")]
    meta.append(("version", "1"))
    if coords:
        south = west = math.inf
        north = east = -math.inf
        for z, x, y in coords:
            s, w, n, e = tile_bounds(z, x, y)
            south, west, north, east = min(south, s), min(west, w), max(north, n), max(east, e)
        meta.append(("bounds", f"{west!r},{south!r},{east!r},{north!r}"))
        meta.append(("minzoom", str(min(c[0] for c in coords))))
        meta.append(("maxzoom", str(max(c[0] for c in coords))))
    return meta


def companion_backbones(backbones: Path) -> tuple[str, list[Upload]]:
    """The backbones file as the companion reads it, its ONNX files named by content."""
    try:
        doc = tomllib.loads(backbones.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BackboneError(f"backbones: cannot read {backbones}: {exc}") from exc
    uploads: list[Upload] = []
    entries = doc.get("backbone")
    if not isinstance(entries, list):
        raise BackboneError(f"backbones: {backbones} lists no [[backbone]]")
    for entry in entries:
        onnx = entry.get("onnx") if isinstance(entry, dict) else None
        if not isinstance(onnx, str):
            raise BackboneError(f"backbones: an entry of {backbones} names no onnx file")
        local = (backbones.parent / Path(onnx).expanduser()).resolve()
        # The name carries the entry's, so two backbones never share a remote file.
        label = re.sub(r"[^A-Za-z0-9._-]", "_", str(entry.get("name", "model")))
        name = f"models/{label}-{local.name}"
        entry["onnx"] = name
        uploads.append(Upload(local, name))
    return toml_dumps(doc), uploads


def remote_paths(there: CompanionPaths) -> dict[str, str]:
    """Where each path field points on the companion (see :data:`INPUT_NAMES`)."""
    sent = {name: f"{there.inputs_dir}/{file}" for name, file in INPUT_NAMES.items()}
    return {**sent, **{name: getattr(there, name) for name in COMPANION_OWN}}


def companion_request(request: BuildRequest, remote: Mapping[str, str]) -> str:
    """The request TOML for the companion: the same build, with paths there.

    ``remote`` maps path fields to the companion's absolute paths (:func:`remote_paths`).
    """
    return toml_dumps(companion_fields(request, remote))


def companion_fields(request: BuildRequest, remote: Mapping[str, str]) -> dict[str, Any]:
    """The companion's request as fields: every field of ``REQUEST_FIELDS`` that is
    set, a path replaced by the companion's (:func:`companion_request`'s, for a flow)."""
    here = request.to_json()
    doc: dict[str, Any] = {}
    for field in REQUEST_FIELDS:
        value = here[field.name]
        if value is None:
            continue
        doc[field.name] = remote[field.name] if field.path and field.name not in INLINE else value
    return doc


def estimate_build_bytes(tile_bytes: int, model_bytes: int, tiles: int) -> int:
    """Free disk a build of these inputs needs on the companion beyond the inputs."""
    return tile_bytes + 2 * model_bytes + tiles * _PER_TILE_OVERHEAD + _MARGIN


def total_bytes(paths: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def toml_dumps(doc: dict[str, Any]) -> str:
    """TOML for plain values (what requests and backbones files hold); arrays of tables
    become ``[[name]]`` sections, other tables inline ones."""
    lines: list[str] = []
    sections: list[str] = []
    for key, value in doc.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for table in value:
                sections += ["", f"[[{_key(key)}]]"]
                sections += [f"{_key(k)} = {_value(v)}" for k, v in table.items()]
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    return "\n".join(lines + sections).strip() + "\n"


def _key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"TOML cannot hold {value!r}")
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string: the same escapes.
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise ValueError(f"TOML cannot hold {type(value).__name__}")
