"""``takeoff-cache locate`` as an operator runs it: answers per image, one line per refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from takeoff_cache.cli.main import build_parser
from takeoff_cache.tiles.corpus import open_corpus
from tests.support.caches import artifact_path, build_demo_cache, localizer_of
from tests.support.cli import CliResult, run_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def built(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_cache(demo_source, tmp_path_factory.mktemp("cli-locate") / "built")


def a_tile_image(root: Path, tmp_path: Path) -> tuple[str, Path]:
    tiles = localizer_of(root)[1].tiles
    z, x, y = tiles[len(tiles) // 3]
    with open_corpus(root / "corpus.mbtiles") as corpus:
        data = corpus.read(z, x, y)
    path = tmp_path / "tile.jpg"
    path.write_bytes(data)
    return f"{z}/{x}/{y}", path


def locate(capsys: pytest.CaptureFixture[str], root: Path, *args: str | Path) -> CliResult:
    trust = str(root / "trust")
    return run_cli(capsys, "locate", str(root / "cache"), *map(str, args), "--trust", trust)


def test_a_tile_is_shown_at_rank_1_with_its_position_and_time(
    capsys: pytest.CaptureFixture[str], built: Path, tmp_path: Path
) -> None:
    zxy, image = a_tile_image(built, tmp_path)
    result = locate(capsys, built, image, "--k", "3")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == str(image)
    assert lines[1].split()[:2] == ["1", zxy]
    assert len([line for line in lines if "score" in line]) == 3
    assert any(line.strip().startswith("best tile centre:") for line in lines)
    assert any(line.strip().startswith("weighted estimate:") for line in lines)
    assert lines[-1].strip().startswith("query:") and lines[-1].endswith(" ms")


def test_json_gives_every_image_its_matches_estimates_and_ms(
    capsys: pytest.CaptureFixture[str], built: Path, tmp_path: Path
) -> None:
    zxy, image = a_tile_image(built, tmp_path)
    result = locate(capsys, built, image, image, "--json")
    assert result.code == 0, result.err
    answers = json.loads(result.out)
    assert len(answers) == 2
    for answer in answers:
        assert answer["matches"][0]["tile"] == zxy and len(answer["matches"]) == 5
        assert set(answer["best"]) == set(answer["weighted"]) == {"lat", "lon"}
        assert answer["ms"] > 0


def test_an_unreadable_image_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], built: Path, tmp_path: Path
) -> None:
    _, good = a_tile_image(built, tmp_path)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    result = locate(capsys, built, good, bad)
    assert result.code == 2
    assert result.out == ""
    assert result.err_lines == [f"takeoff-cache: error: image {bad}: not a JPEG, PNG or WebP image"]


def test_an_unverifiable_cache_is_exit_7_with_one_line_per_problem(
    capsys: pytest.CaptureFixture[str], built: Path, tmp_path: Path
) -> None:
    root = Path(shutil.copytree(built, tmp_path / "damaged"))
    _, image = a_tile_image(root, tmp_path)
    (root / "cache" / artifact_path(root, "tile_map")).unlink()
    (root / "cache" / "stray.bin").write_bytes(b"x")
    result = locate(capsys, root, image)
    assert result.code == 7
    assert result.out == ""
    assert len(result.err_lines) >= 2
    assert all(line.startswith("takeoff-cache: locate: ") for line in result.err_lines)
    assert any("stray.bin" in line for line in result.err_lines)


def test_a_cache_with_one_changed_byte_is_refused_with_one_line(
    capsys: pytest.CaptureFixture[str], built: Path, tmp_path: Path
) -> None:
    root = Path(shutil.copytree(built, tmp_path / "flipped"))
    _, image = a_tile_image(root, tmp_path)
    index = root / "cache" / artifact_path(root, "faiss_index")
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0x01
    index.unlink()  # its own inode: the work folder's copy stays as it was
    index.write_bytes(bytes(data))
    result = locate(capsys, root, image)
    assert result.code == 7 and result.out == ""
    (line,) = result.err_lines
    assert line.startswith("takeoff-cache: locate: ") and "SHA-256 differs" in line


@pytest.mark.parametrize("k", ["0", "101", "many"])
def test_a_k_out_of_range_is_refused(
    capsys: pytest.CaptureFixture[str], built: Path, tmp_path: Path, k: str
) -> None:
    _, image = a_tile_image(built, tmp_path)
    result = locate(capsys, built, image, "--k", k)
    assert result.code == 2 and len(result.err_lines) == 1


def test_every_locate_option_has_help() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices["locate"]  # type: ignore[attr-defined]
    for action in parser._actions:
        assert action.help, action.dest
