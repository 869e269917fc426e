"""Demo data: a synthetic tile corpus and analytic ONNX backbones, made without downloads.

Everything is deterministic from the seed, the signing key included — it is
a demo key derived from the seed, never one to fly with.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..fsutil import atomic_write_bytes
from ..keys import write_keypair
from .models import build_keypoints_model, build_vpr_model
from .synthetic import write_corpus

VPR_SIZE = 128
_MEAN = "[0.485, 0.456, 0.406]"
_STD = "[0.229, 0.224, 0.225]"


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
input = {{ name = "image", size = {VPR_SIZE}, channels = 3, mean = {_MEAN}, std = {_STD} }}
"""


def make_demo_data(out: Path, *, tiles: int = 320, seed: int = 0) -> DemoInputs:
    """Write the demo inputs into ``out``; inputs already there from the same settings are kept."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / ".demo-data"
    settings = f"tiles={tiles} seed={seed}\n"
    complete = stamp.is_file() and stamp.read_text() == settings
    paths = DemoInputs(
        out.resolve(),
        out / "corpus.mbtiles",
        out / "backbones.toml",
        out / "operator.key",
        out / "trust",
        out / "request.toml",
        0,
    )
    if complete:
        (out / "cache").mkdir(exist_ok=True)
        count = int((out / ".tile-count").read_text())
        return DemoInputs(**{**paths.__dict__, "tile_count": count})
    stamp.unlink(missing_ok=True)
    layout = write_corpus(paths.corpus, n_tiles=tiles, seed=seed)
    (out / "models").mkdir(exist_ok=True)
    build_vpr_model(out / "models" / "vpr.onnx", VPR_SIZE)
    build_keypoints_model(out / "models" / "keypoints.onnx", VPR_SIZE)
    atomic_write_bytes(paths.backbones, _backbones_toml().encode())

    for stale in (paths.key, paths.key.with_name(paths.key.name + ".pub")):
        stale.unlink(missing_ok=True)
    shutil.rmtree(paths.trust, ignore_errors=True)
    seed_bytes = hashlib.sha256(f"takeoff-cache demo key {seed}".encode()).digest()
    pub = write_keypair(Ed25519PrivateKey.from_private_bytes(seed_bytes), paths.key, None)
    paths.trust.mkdir()
    shutil.copyfile(pub, paths.trust / "operator.pub")

    lat_min, lon_min, lat_max, lon_max = layout.bbox
    zooms = ", ".join(str(z) for z in layout.zoom_levels)
    request = f"""# Demo build request (SPEC §2); relative paths are relative to this file.
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
    atomic_write_bytes(paths.request, request.encode())
    atomic_write_bytes(out / ".tile-count", f"{layout.tile_count}\n".encode())
    # The request's cache root; a real build never creates one, the demo places its own.
    (out / "cache").mkdir(exist_ok=True)
    atomic_write_bytes(stamp, settings.encode())
    return DemoInputs(**{**paths.__dict__, "tile_count": layout.tile_count})
