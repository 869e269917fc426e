"""The demo data: synthetic MBTiles corpus and analytic ONNX backbones."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from takeoff_cache import demo
from takeoff_cache.core.tilemath import tile_range, tms_row
from takeoff_cache.demo import make_demo_data, synthetic
from takeoff_cache.demo.models import (
    KEYPOINTS,
    KEYPOINTS_SIZE,
    VPR_DIM,
    build_keypoints_model,
    build_vpr_model,
)
from takeoff_cache.demo.synthetic import (
    CorpusLayout,
    encode_jpeg,
    render_tile,
    replace_tile_bytes,
    write_corpus,
)
from takeoff_cache.errors import InvalidRequestError
from tests.support.cli import run_cli

SIZE = 128
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _rows(path: Path) -> list[tuple[int, int, int, bytes]]:
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles ORDER BY 1, 2, 3"
        ).fetchall()
    return [(int(z), int(x), int(r), bytes(d)) for z, x, r, d in rows]


def _metadata(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT name, value FROM metadata").fetchall())


def _normalise(image: Image.Image) -> np.ndarray:
    """An RGB image -> normalised (3, SIZE, SIZE) float32, as the pipeline feeds a backbone."""
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(((pixels - MEAN) / STD).transpose(2, 0, 1))


def _decode(data: bytes) -> np.ndarray:
    """JPEG bytes -> network input; ``draft`` downscales in the DCT domain like the pipeline."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (SIZE, SIZE))
    return _normalise(image.convert("RGB"))


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _perturbed_query(data: bytes, shift: int = 8) -> np.ndarray:
    """Re-encode at JPEG quality 60, shift ``shift`` px right and down (edge-padded), then
    feed it at full size (plain bilinear downscaling, unlike the database's DCT path)."""
    pixels = _pixels(encode_jpeg(_pixels(data), quality=60))
    padded = np.pad(pixels, ((shift, 0), (shift, 0), (0, 0)), mode="edge")
    return _normalise(Image.fromarray(np.ascontiguousarray(padded[:256, :256])))


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> CorpusLayout:
    # n_tiles=100 -> s = 5: a 5 x 5 block at z16 and its 10 x 10 children.
    return write_corpus(tmp_path_factory.mktemp("corpus") / "demo.mbtiles", n_tiles=100, seed=7)


@pytest.fixture(scope="module")
def vpr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "vpr.onnx"
    build_vpr_model(path, SIZE)
    return path


# --------------------------------------------------------------------------- tiles
def test_render_tile_is_deterministic_per_seed() -> None:
    a = render_tile(16, 39144, 22653, seed=3)
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_tile(16, 39144, 22653, seed=3))
    assert not np.array_equal(a, render_tile(16, 39144, 22653, seed=4))
    # Structure everywhere, not a flat colour.
    assert a.reshape(-1, 3).std(axis=0).min() > 10


def test_same_seed_same_bytes_different_seed_different_tiles(tmp_path: Path) -> None:
    first = write_corpus(tmp_path / "a.mbtiles", n_tiles=5, seed=1)
    again = write_corpus(tmp_path / "b.mbtiles", n_tiles=5, seed=1)
    other = write_corpus(tmp_path / "c.mbtiles", n_tiles=5, seed=2)
    assert first.tile_count == again.tile_count == other.tile_count == 5
    assert _rows(first.path) == _rows(again.path)
    for (za, xa, ra, da), (zc, xc, rc, dc) in zip(
        _rows(first.path), _rows(other.path), strict=True
    ):
        assert (za, xa, ra) == (zc, xc, rc)
        assert da != dc
    # Only the finished files: no temporary left beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mbtiles", "b.mbtiles", "c.mbtiles"]


def test_corpus_layout_and_schema(corpus: CorpusLayout) -> None:
    rows = _rows(corpus.path)
    assert corpus.tile_count == len(rows) == 5 * 5**2
    assert corpus.zoom_levels == (16, 17)
    meta = _metadata(corpus.path)
    assert meta["format"] == "jpg"
    assert (meta["minzoom"], meta["maxzoom"]) == ("16", "17")
    lon_min, lat_min, lon_max, lat_max = (float(v) for v in meta["bounds"].split(","))
    assert lat_min < corpus.bbox[0] < corpus.bbox[2] < lat_max
    assert lon_min < corpus.bbox[1] < corpus.bbox[3] < lon_max
    with sqlite3.connect(corpus.path) as db:
        index_sql = db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'tiles'"
        ).fetchone()[0]
    assert "UNIQUE" in index_sql.upper()

    # The bbox selects exactly the stored tiles at both zooms (rows are TMS).
    stored = {(z, x, tms_row(z, r)) for z, x, r, _ in rows}
    expected = set()
    for z in corpus.zoom_levels:
        x0, x1, y0, y1 = tile_range(corpus.bbox, z)
        expected |= {(z, x, y) for x in range(x0, x1 + 1) for y in range(y0, y1 + 1)}
    assert stored == expected
    x0, x1, y0, y1 = tile_range(corpus.bbox, 16)
    assert (x1 - x0 + 1, y1 - y0 + 1) == (5, 5)
    assert tile_range(corpus.bbox, 17) == (2 * x0, 2 * x1 + 1, 2 * y0, 2 * y1 + 1)
    # The block is centred on the requested point.
    lat_c = (corpus.bbox[0] + corpus.bbox[2]) / 2
    lon_c = (corpus.bbox[1] + corpus.bbox[3]) / 2
    assert abs(lat_c - 48.455) < 0.01 and abs(lon_c - 35.045) < 0.01

    # A stored row holds the tile its TMS row names (a flipped row would not match).
    z, x, r, data = rows[0]
    assert data == encode_jpeg(render_tile(z, x, tms_row(z, r), seed=7))


def test_replace_tile_bytes(tmp_path: Path) -> None:
    layout = write_corpus(tmp_path / "c.mbtiles", n_tiles=5, seed=0)
    x0, _, y0, _ = tile_range(layout.bbox, 16)
    replace_tile_bytes(layout.path, 16, x0, y0, b"changed")
    changed = [(z, x, r) for z, x, r, d in _rows(layout.path) if d == b"changed"]
    assert changed == [(16, x0, tms_row(16, y0))]
    with pytest.raises(KeyError):
        replace_tile_bytes(layout.path, 16, x0 + 5, y0, b"nowhere")


def test_killed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0

    def failing(z: int, x: int, y: int, seed: int) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("killed")
        return np.zeros((256, 256, 3), dtype=np.uint8)

    monkeypatch.setattr(synthetic, "render_tile", failing)
    with pytest.raises(RuntimeError, match="killed"):
        write_corpus(tmp_path / "c.mbtiles", n_tiles=5)
    assert list(tmp_path.iterdir()) == []


def test_child_tile_is_its_parents_quadrant(corpus: CorpusLayout) -> None:
    tiles = {
        (z, x, tms_row(z, r)): _pixels(d).astype(np.float64) for z, x, r, d in _rows(corpus.path)
    }
    x0, _, y0, _ = tile_range(corpus.bbox, 16)

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    for px, py in ((x0, y0), (x0 + 2, y0 + 1), (x0 + 4, y0 + 3)):
        parent = tiles[(16, px, py)]
        elsewhere = tiles[(16, px + 1 if px < x0 + 4 else px - 1, py)]
        for dx in (0, 1):
            for dy in (0, 1):
                child = tiles[(17, 2 * px + dx, 2 * py + dy)]
                down = child.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
                quadrant = parent[dy * 128 : (dy + 1) * 128, dx * 128 : (dx + 1) * 128]
                same = corr(down, quadrant)
                assert same > 0.9
                assert (
                    same
                    > corr(down, elsewhere[dy * 128 : (dy + 1) * 128, dx * 128 : (dx + 1) * 128])
                    + 0.2
                )


# --------------------------------------------------------------------------- models
def test_models_are_byte_identical_and_valid(tmp_path: Path, vpr: Path) -> None:
    build_vpr_model(tmp_path / "vpr.onnx", SIZE)
    assert (tmp_path / "vpr.onnx").read_bytes() == vpr.read_bytes()
    build_keypoints_model(tmp_path / "k1.onnx", SIZE)
    build_keypoints_model(tmp_path / "k2.onnx", SIZE)
    assert (tmp_path / "k1.onnx").read_bytes() == (tmp_path / "k2.onnx").read_bytes()
    for path in (vpr, tmp_path / "k1.onnx"):
        model = onnx.load(path)
        onnx.checker.check_model(model)
        assert model.producer_name == "takeoff-cache-demo"
        assert model.opset_import[0].version == 17
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1.onnx", "k2.onnx", "vpr.onnx"]


def test_vpr_model_runs(vpr: Path) -> None:
    session = _session(vpr)
    (inp,) = session.get_inputs()
    assert inp.name == "image" and inp.shape[1:] == [3, SIZE, SIZE]
    assert session.get_outputs()[0].name == "descriptor"
    batch = np.random.default_rng(0).standard_normal((5, 3, SIZE, SIZE), dtype=np.float32)
    (out,) = session.run(None, {"image": batch})
    assert out.shape == (5, VPR_DIM)
    assert np.isfinite(out).all()
    # A flat grey image has no texture at all: still finite.
    (flat,) = session.run(None, {"image": np.zeros((1, 3, SIZE, SIZE), dtype=np.float32)})
    assert np.isfinite(flat).all()


def test_vpr_retrieves_perturbed_tiles(corpus: CorpusLayout, vpr: Path) -> None:
    session = _session(vpr)
    rows = _rows(corpus.path)

    def embed(batch: np.ndarray) -> np.ndarray:
        (d,) = session.run(None, {"image": batch})
        unit: np.ndarray = d / np.linalg.norm(d, axis=1, keepdims=True)
        return unit

    database = embed(np.stack([_decode(d) for *_, d in rows]))
    queries = embed(np.stack([_perturbed_query(d) for *_, d in rows]))
    nearest = (queries @ database.T).argmax(axis=1)
    accuracy = float((nearest == np.arange(len(rows))).mean())
    assert accuracy >= 0.95, f"top-1 retrieval {accuracy:.1%} over {len(rows)} tiles"


def test_vpr_descriptor_ignores_the_heading(corpus: CorpusLayout, vpr: Path) -> None:
    session = _session(vpr)
    rows = _rows(corpus.path)[:40]
    tiles = np.stack([_decode(d) for *_, d in rows])
    # Quarter turns move every pixel exactly. An oblique turn resamples them and
    # leaves blank corners, so there both sides are the centre 176 px of the tile.
    turned = [np.ascontiguousarray(np.rot90(tiles, k, axes=(2, 3))) for k in (1, 2, 3)]

    def centre(data: bytes, angle: float) -> np.ndarray:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return _normalise(image.rotate(angle, Image.Resampling.BILINEAR).crop((40, 40, 216, 216)))

    upright = np.stack([centre(d, 0.0) for *_, d in rows])
    oblique = np.stack([centre(d, 37.0) for *_, d in rows])

    def embed(batch: np.ndarray) -> np.ndarray:
        (d,) = session.run(None, {"image": batch})
        unit: np.ndarray = d / np.linalg.norm(d, axis=1, keepdims=True)
        return unit

    database = embed(tiles)
    for view in turned:
        same = (embed(view) * database).sum(axis=1)
        assert same.min() > 0.99
    nearest = (embed(oblique) @ embed(upright).T).argmax(axis=1)
    assert float((nearest == np.arange(len(rows))).mean()) >= 0.9


def test_keypoints_model_gives_the_local_features_contract(tmp_path: Path) -> None:
    path = tmp_path / "keypoints.onnx"
    build_keypoints_model(path, KEYPOINTS_SIZE)
    session = _session(path)
    assert [o.name for o in session.get_outputs()] == ["keypoints", "scores", "descriptors"]
    tiles = [render_tile(16, 39144 + i, 22653, seed=0) for i in range(2)]
    batch = np.stack(
        [((t.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1) for t in tiles]
    )
    keypoints, scores, descriptors = session.run(None, {"image": batch})
    assert keypoints.shape == (2, KEYPOINTS, 2) and scores.shape == (2, KEYPOINTS)
    assert descriptors.shape[:2] == (2, KEYPOINTS)
    assert np.isfinite(descriptors).all()
    assert (keypoints >= 0).all() and (keypoints < KEYPOINTS_SIZE).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all() and scores[:, 0].min() > 0  # corners, best first
    assert np.allclose(np.linalg.norm(descriptors, axis=2), 1.0, atol=1e-3)


def test_keypoint_descriptors_ignore_a_quarter_turn(tmp_path: Path) -> None:
    path = tmp_path / "keypoints.onnx"
    build_keypoints_model(path, KEYPOINTS_SIZE)
    session = _session(path)
    tile = render_tile(16, 39144, 22653, seed=0)
    pixels = np.stack([tile, np.ascontiguousarray(np.rot90(tile))])
    batch = np.ascontiguousarray(((pixels / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2), np.float32)
    keypoints, _, descriptors = session.run(None, {"image": batch})
    # rot90 (counter-clockwise) takes pixel (x, y) to (y, size - 1 - x).
    turned = np.c_[keypoints[0][:, 1], KEYPOINTS_SIZE - 1 - keypoints[0][:, 0]]
    index = {tuple(p): i for i, p in enumerate(keypoints[1].astype(int).tolist())}
    pairs = [
        (i, index[tuple(p)]) for i, p in enumerate(turned.astype(int).tolist()) if tuple(p) in index
    ]
    assert len(pairs) > KEYPOINTS // 2  # the same corners are found turned
    same = [float(descriptors[0][i] @ descriptors[1][j]) for i, j in pairs]
    assert np.median(same) > 0.98


# --------------------------------------------------------------------------- the folder
def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def operators_folder(tmp_path: Path) -> Path:
    """A folder an operator owns: their signing key and a colleague's public key."""
    root = tmp_path / "mine"
    (root / "trust").mkdir(parents=True)
    (root / "operator.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nmine\n")
    (root / "operator.key").chmod(0o600)
    (root / "trust" / "colleague.pub").write_bytes(b"-----BEGIN PUBLIC KEY-----\ntheirs\n")
    return root


def test_demo_data_refuses_a_folder_it_did_not_make_and_names_what_is_there(
    capsys: pytest.CaptureFixture[str], operators_folder: Path
) -> None:
    before = _tree(operators_folder)
    result = run_cli(capsys, "demo-data", str(operators_folder), "--tiles", "5")
    assert result.code == 2, result.err
    (line,) = result.err_lines
    assert "not empty" in line and "operator.key" in line and "trust" in line and "--force" in line
    assert _tree(operators_folder) == before
    assert sorted(p.name for p in operators_folder.iterdir()) == ["operator.key", "trust"]


def test_force_never_replaces_a_key_or_trust_store_it_did_not_write(
    capsys: pytest.CaptureFixture[str], operators_folder: Path
) -> None:
    before = _tree(operators_folder)
    result = run_cli(capsys, "demo-data", str(operators_folder), "--tiles", "5", "--force")
    assert result.code == 2, result.err
    (line,) = result.err_lines
    assert "operator.key" in line and "trust/" in line and "refusing to replace" in line
    assert _tree(operators_folder) == before
    assert sorted(p.name for p in operators_folder.iterdir()) == ["operator.key", "trust"]


def test_force_adds_the_demo_inputs_beside_files_it_does_not_write(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = tmp_path / "notes"
    root.mkdir()
    (root / "README.txt").write_bytes(b"my notes\n")
    assert run_cli(capsys, "demo-data", str(root), "--tiles", "5").code == 2
    result = run_cli(capsys, "demo-data", str(root), "--tiles", "5", "--force")
    assert result.code == 0, result.err
    assert (root / "README.txt").read_bytes() == b"my notes\n"
    assert (root / "request.toml").is_file() and (root / "trust" / "operator.pub").is_file()
    # Made by demo-data now: a re-run needs no --force.
    assert run_cli(capsys, "demo-data", str(root), "--tiles", "5", "--seed", "1").code == 0
    assert (root / "README.txt").read_bytes() == b"my notes\n"


def test_demo_data_onto_a_file_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"keep me")
    for extra in ([], ["--force"]):
        result = run_cli(capsys, "demo-data", str(target), "--tiles", "5", *extra)
        assert result.code == 2, result.err
        (line,) = result.err_lines
        assert "not a folder" in line
        assert target.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_rerun_of_its_own_folder_keeps_or_refreshes_only_its_own_outputs(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    first = make_demo_data(root, tiles=5, seed=0)
    made = _tree(root)
    # A colleague's key added to the demo's trust store, and a build's work folder.
    (root / "trust" / "colleague.pub").write_bytes(b"theirs")
    (root / "work").mkdir()
    (root / "work" / "x").write_bytes(b"work")

    again = make_demo_data(root, tiles=5, seed=0)
    assert again == first
    assert {k: v for k, v in _tree(root).items() if k in made} == made

    # Other settings: its own unchanged files are replaced, nothing else is touched.
    make_demo_data(root, tiles=5, seed=1)
    assert (root / "operator.key").read_bytes() != made["operator.key"]
    assert (root / "trust" / "colleague.pub").read_bytes() == b"theirs"
    assert (root / "work" / "x").read_bytes() == b"work"


def test_a_demo_output_changed_since_it_was_written_is_never_replaced(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    make_demo_data(root, tiles=5, seed=0)
    (root / "operator.key").write_bytes(b"the operator's own key now")
    with pytest.raises(InvalidRequestError, match=r"operator\.key"):
        make_demo_data(root, tiles=5, seed=1, force=True)
    assert (root / "operator.key").read_bytes() == b"the operator's own key now"


def test_a_run_killed_while_writing_can_be_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "demo"

    def killed(path: Path, size: int) -> None:
        path.write_bytes(b"half a model")
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(demo, "build_keypoints_model", killed)
        with pytest.raises(RuntimeError, match="killed"):
            make_demo_data(root, tiles=5)
    inputs = make_demo_data(root, tiles=5)
    assert inputs.tile_count == 5
    assert (root / "models" / "keypoints.onnx").read_bytes() != b"half a model"
