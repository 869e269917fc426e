"""Demo data: a synthetic tile corpus and analytic ONNX backbones, made without downloads.

Everything is deterministic from the seed, the signing key included — it is
a demo key derived from the seed, never one to fly with.

The folder is often one the operator owns, so nothing in it is replaced that
this module did not write: ``.demo-data`` lists every file it wrote with its
SHA-256, and only a listed file whose bytes are still those may be replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from takeoff_cache.core.fsutil import atomic_write_bytes, sha256_file
from takeoff_cache.demo.models import KEYPOINTS_SIZE, build_keypoints_model, build_vpr_model
from takeoff_cache.demo.synthetic import write_corpus
from takeoff_cache.errors import InvalidRequestError
from takeoff_cache.trust.keys import write_keypair

VPR_SIZE = 128
_MEAN = "[0.485, 0.456, 0.406]"
_STD = "[0.229, 0.224, 0.225]"
MARKER = ".demo-data"
_MARKER_FORMAT = "takeoff-cache-demo-data"
# Everything make_demo_data writes, relative to its folder.
FOLDERS = ("models", "trust", "cache")
FILES = (
    "corpus.mbtiles",
    "models/vpr.onnx",
    "models/keypoints.onnx",
    "backbones.toml",
    "operator.key",
    "operator.key.pub",
    "trust/operator.pub",
    "request.toml",
)


@dataclass(frozen=True)
class DemoInputs:
    root: Path
    corpus: Path
    backbones: Path
    key: Path
    trust: Path
    request: Path
    tile_count: int


def _backbones_toml() -> str:
    return f"""# Demo backbones: analytic ONNX graphs (no trained weights).
[[backbone]]
name = "vpr"
role = "place_recognition"
onnx = "models/vpr.onnx"
input = {{ name = "image", size = {VPR_SIZE}, channels = 3, mean = {_MEAN}, std = {_STD} }}
output = "descriptor"

[[backbone]]
name = "keypoints"
role = "local_features"
onnx = "models/keypoints.onnx"
input = {{ name = "image", size = {KEYPOINTS_SIZE}, channels = 3, mean = {_MEAN}, std = {_STD} }}
"""


def _request_toml(bbox: tuple[float, float, float, float], zoom_levels: tuple[int, ...]) -> str:
    lat_min, lon_min, lat_max, lon_max = bbox
    zooms = ", ".join(str(z) for z in zoom_levels)
    return f"""# Demo build request (SPEC §2); relative paths are relative to this file.
corpus = "corpus.mbtiles"
bbox = [{lat_min!r}, {lon_min!r}, {lat_max!r}, {lon_max!r}]
zoom_levels = [{zooms}]
sector_class = "stable_rear"
backbones = "backbones.toml"
precision = "fp32"
cache_root = "cache"
key = "operator.key"
trust = "trust"
takeoff_origin = [{(lat_min + lat_max) / 2:.6f}, {(lon_min + lon_max) / 2:.6f}, 120.0]
"""


@dataclass
class _Marker:
    """What ``.demo-data`` records: the settings of the last complete run, the folders
    it made, and each file it wrote with its SHA-256 (``None`` while being written)."""

    settings: dict[str, int] | None
    tile_count: int
    folders: list[str]
    files: dict[str, str | None]

    def write(self, out: Path) -> None:
        doc = {
            "format": _MARKER_FORMAT,
            "settings": self.settings,
            "tile_count": self.tile_count,
            "folders": sorted(self.folders),
            "files": dict(sorted(self.files.items())),
        }
        atomic_write_bytes(out / MARKER, (json.dumps(doc, indent=2) + "\n").encode())


def _read_marker(out: Path) -> _Marker | None:
    """The folder's marker, or None when it has none this module wrote."""
    path = out / MARKER
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != _MARKER_FORMAT:
        return None
    settings, count = doc.get("settings"), doc.get("tile_count")
    folders, files = doc.get("folders"), doc.get("files")
    if not (
        (settings is None or isinstance(settings, dict))
        and isinstance(count, int)
        and isinstance(folders, list)
        and all(f in FOLDERS for f in folders)
        and isinstance(files, dict)
        and all(k in FILES and (v is None or isinstance(v, str)) for k, v in files.items())
    ):
        return None
    return _Marker(settings, count, folders, files)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _foreign(out: Path, marker: _Marker) -> list[str]:
    """Outputs already in ``out`` that this module did not write, or that changed since."""
    found = []
    for rel in FOLDERS:
        st = _lstat(out / rel)
        if st is not None and not (stat.S_ISDIR(st.st_mode) and rel in marker.folders):
            found.append(f"{rel}/")
    for rel in FILES:
        st = _lstat(out / rel)
        if st is None or (rel in marker.files and marker.files[rel] is None):
            continue  # absent, or ours and interrupted while being written
        if not stat.S_ISREG(st.st_mode) or marker.files.get(rel) != sha256_file(out / rel):
            found.append(rel)
    return found


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    return ", ".join(names[:8]) + more


def _complete(out: Path, marker: _Marker, settings: dict[str, int]) -> bool:
    return marker.settings == settings and all(
        (st := _lstat(out / rel)) is not None and stat.S_ISREG(st.st_mode) for rel in FILES
    )


def _claim_folder(out: Path, force: bool) -> _Marker:
    """Check ``out`` may take the demo inputs; return its marker (a new one if it had none)."""
    try:
        st: os.stat_result | None = out.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise InvalidRequestError(f"demo-data: cannot use {out}: {exc.strerror}") from exc
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise InvalidRequestError(f"demo-data: {out} exists and is not a folder")
    marker = _read_marker(out) if st is not None else None
    if marker is None:
        there = sorted(p.name for p in out.iterdir()) if st is not None else []
        if there and not force:
            raise InvalidRequestError(
                f"demo-data: {out} is not empty and was not made by demo-data"
                f" (it holds {_shown(there)}); choose an empty or new folder,"
                " or pass --force to add the demo inputs beside what is there"
            )
        marker = _Marker(None, 0, [], {})
        if (out / MARKER).exists() or (out / MARKER).is_symlink():
            raise InvalidRequestError(
                f"demo-data: {out / MARKER} was not written by demo-data; refusing to replace it"
            )
    foreign = _foreign(out, marker)
    if foreign:
        raise InvalidRequestError(
            f"demo-data: {out} already holds {_shown(foreign)}, not written by demo-data"
            " (or changed since); refusing to replace them: move them away or choose another folder"
        )
    return marker


def make_demo_data(
    out: Path, *, tiles: int = 320, seed: int = 0, force: bool = False
) -> DemoInputs:
    """Write the demo inputs into ``out``; inputs already there from the same settings are kept.

    A folder that is not empty and was not made here is refused unless ``force``;
    even then, no file or folder this module did not write is replaced.
    """
    settings = {"tiles": tiles, "seed": seed}
    marker = _read_marker(out) if out.is_dir() else None
    paths = DemoInputs(
        out.resolve(),
        out / "corpus.mbtiles",
        out / "backbones.toml",
        out / "operator.key",
        out / "trust",
        out / "request.toml",
        0,
    )
    if marker is not None and _complete(out, marker, settings):
        (out / "cache").mkdir(exist_ok=True)
        return DemoInputs(**{**paths.__dict__, "tile_count": marker.tile_count})

    marker = _claim_folder(out, force)
    out.mkdir(parents=True, exist_ok=True)
    marker.settings = None
    for rel in FOLDERS:
        if rel not in marker.folders:
            (out / rel).mkdir()
            marker.folders.append(rel)
            marker.write(out)

    def writing(rel: str) -> Path:
        marker.files[rel] = None  # a run killed now may still replace it next time
        marker.write(out)
        return out / rel

    def written(*rels: str) -> None:
        for rel in rels:
            marker.files[rel] = sha256_file(out / rel)
        marker.write(out)

    layout = write_corpus(writing("corpus.mbtiles"), n_tiles=tiles, seed=seed)
    written("corpus.mbtiles")
    build_vpr_model(writing("models/vpr.onnx"), VPR_SIZE)
    build_keypoints_model(writing("models/keypoints.onnx"), KEYPOINTS_SIZE)
    written("models/vpr.onnx", "models/keypoints.onnx")
    atomic_write_bytes(writing("backbones.toml"), _backbones_toml().encode())
    written("backbones.toml")

    # The key is written exclusively (never over a file): remove our own old one first.
    key, pub = writing("operator.key"), writing("operator.key.pub")
    key.unlink(missing_ok=True)
    pub.unlink(missing_ok=True)
    seed_bytes = hashlib.sha256(f"takeoff-cache demo key {seed}".encode()).digest()
    write_keypair(Ed25519PrivateKey.from_private_bytes(seed_bytes), key, None)
    written("operator.key", "operator.key.pub")
    atomic_write_bytes(writing("trust/operator.pub"), pub.read_bytes())
    written("trust/operator.pub")

    request = _request_toml(layout.bbox, layout.zoom_levels)
    atomic_write_bytes(writing("request.toml"), request.encode())
    written("request.toml")
    marker.settings, marker.tile_count = settings, layout.tile_count
    marker.write(out)
    return DemoInputs(**{**paths.__dict__, "tile_count": layout.tile_count})
