"""Download failures say what failed: one line, exit 10, advice that matches the status.

Real tile servers on 127.0.0.1 that 404, 403, 5xx, loop their redirects or send
Retry-After values no one can wait for.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from takeoff_cache.core.env import CONTACT, TILES_API_KEY, USER_AGENT_VAR
from takeoff_cache.errors import EXIT_DOWNLOAD, HostFailingError, InvalidRequestError
from takeoff_cache.prepare.download import DownloadOptions, download_tiles
from takeoff_cache.prepare.tileserver import RETRY_AFTER_CAP_S, TileSource, retry_after_s
from tests.support.tileserver import tile_server

FAST = DownloadOptions(backoff_base_s=0.01, backoff_max_s=0.02, max_retries=1, timeout_s=5.0)
KEY = "tk-9Wq2distinctive-tiles-key-7c1a"


def block(n: int) -> list[tuple[int, int, int]]:
    return [(16, 39_000 + x, 22_000 + y) for x in range(n) for y in range(n)]


def failing(
    tmp_path: Path,
    faults: dict[str, list[str]],
    *,
    n: int = 6,
    options: DownloadOptions = FAST,
    **source: str,
) -> tuple[str, int]:
    with tile_server(faults=faults) as server:
        with pytest.raises(HostFailingError) as info:
            download_tiles(
                tmp_path / "c.mbtiles",
                block(n),
                TileSource(server.template, **source),
                options,
                api_key=KEY if source else None,
            )
        asked = len(server.tile_requests())
    message = str(info.value)
    assert info.value.exit_code == EXIT_DOWNLOAD
    assert "\n" not in message and "download tiles for this area first" not in message
    return message, asked


def test_404_everywhere_names_the_template_and_stops_at_the_breaker(tmp_path: Path) -> None:
    message, asked = failing(tmp_path, {"*": ["404"]}, n=10)
    assert "URL template probably does not match the server" in message
    assert ".png or .jpg" in message and "{z}/{x}/{y}" in message
    assert "/tiles/16/" in message  # one URL that 404ed, to try in a browser
    # It stopped after breaker_failures 404s, not after all 100 tiles.
    assert asked < FAST.breaker_failures + 2 * FAST.concurrency


def test_a_key_the_server_refuses_names_the_variable_and_how_it_is_sent(tmp_path: Path) -> None:
    message, asked = failing(tmp_path, {"*": ["403"]}, key_header="X-Api-Key")
    assert f"the tile key is missing or wrong: check {TILES_API_KEY} (sent as X-Api-Key)" in message
    assert "try again later" not in message and "run again later" not in message
    assert KEY not in message
    assert asked <= FAST.concurrency


def test_a_server_that_wants_a_key_none_was_given_says_how_to_give_it(tmp_path: Path) -> None:
    message, _ = failing(tmp_path, {"*": ["401"]})
    assert f"the server wants a key: set {TILES_API_KEY}" in message
    assert "--tiles-key-header or --tiles-key-param" in message


def test_5xx_everywhere_says_the_server_is_failing(tmp_path: Path) -> None:
    message, _ = failing(tmp_path, {"*": ["503"]})
    assert "the tile server is failing: try again later" in message
    assert "URL template" not in message


def test_mostly_404_after_some_tiles_is_still_a_template_problem(tmp_path: Path) -> None:
    # The first tiles come (the host has served), then 27 of the 36 are missing.
    faults = {f"16/{39_000 + x}/{22_000 + y}": ["404"] for x in range(6) for y in range(6)}
    for x, y in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]:
        del faults[f"16/{39_000 + x}/{22_000 + y}"]
    message, _ = failing(tmp_path, faults)
    assert "27 of the area's 36 tiles failed" in message and "HTTP 404: 27" in message
    assert "URL template probably does not match the server" in message


def test_a_few_404s_are_holes_in_the_coverage_not_a_failed_job(tmp_path: Path) -> None:
    faults = {"16/39000/22000": ["404"], "16/39001/22001": ["404"]}
    with tile_server(faults=faults) as server:
        result = download_tiles(tmp_path / "c.mbtiles", block(6), TileSource(server.template), FAST)
    assert (result.fetched, result.failed_count) == (34, 2)
    assert {f.reason for f in result.failed} == {"HTTP 404"}


def test_a_rerun_whose_remaining_holes_404_again_is_a_corpus_with_holes(tmp_path: Path) -> None:
    # The first run got all but 16 tiles; the re-run asks only for those, and each
    # 404s again: holes in the server's coverage (the readiness verdict names them),
    # not a template that does not match the server, however many there are.
    holes = [(16, 39_000 + x, 22_000 + y) for x in range(4) for y in range(4)]
    faults = {f"{z}/{x}/{y}": ["404"] * 4 for z, x, y in holes}
    corpus = tmp_path / "c.mbtiles"
    with tile_server(faults=faults) as server:
        first = download_tiles(corpus, block(10), TileSource(server.template), FAST)
        again = download_tiles(corpus, block(10), TileSource(server.template), FAST)
    assert (first.fetched, first.failed_count) == (84, 16)
    assert (again.fetched, again.kept, again.failed_count) == (0, 84, 16)
    assert {f.reason for f in again.failed} == {"HTTP 404"}


def test_a_redirect_loop_stops_the_download_in_one_line(tmp_path: Path) -> None:
    message, asked = failing(tmp_path, {"*": ["loop"]})
    assert "redirects in a loop" in message and "check --tiles-url" in message
    assert asked <= FAST.concurrency * 21  # one loop of at most 20 redirects per worker


@pytest.mark.parametrize(
    "value", ["²", "-5", "1e3", "0x10", "soon", "Mon, 99 Foo 2026 00:00:00 GMT"]
)
def test_a_retry_after_that_is_not_a_wait_is_as_if_absent(tmp_path: Path, value: str) -> None:
    assert retry_after_s(value) is None
    faults = {"16/39000/22000": [f"503:{value}"]}
    with tile_server(faults=faults) as server:
        result = download_tiles(tmp_path / "c.mbtiles", block(2), TileSource(server.template), FAST)
    assert (result.fetched, result.failed_count) == (4, 0)


@pytest.mark.parametrize("value", ["9" * 5000, "31536000", "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_a_huge_retry_after_is_capped_and_stops_the_download(tmp_path: Path, value: str) -> None:
    assert retry_after_s(value) == RETRY_AFTER_CAP_S
    message, _ = failing(tmp_path, {"*": [f"429:{value}"]})
    assert f"asks to wait {RETRY_AFTER_CAP_S:.0f} s" in message
    assert "asks to wait: try again later" in message


def test_the_user_agent_carries_the_operators_contact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CONTACT, "mailto:ops@example.org")
    with tile_server() as server:
        download_tiles(tmp_path / "c.mbtiles", block(1), TileSource(server.template), FAST)
        agent = server.tile_requests()[0].headers["User-Agent"]
    assert agent.startswith("takeoff-cache/") and agent.endswith(" (+mailto:ops@example.org)")
    monkeypatch.setenv(USER_AGENT_VAR, "survey-team-7 (+https://example.org/drones)")
    with tile_server() as server:
        download_tiles(tmp_path / "d.mbtiles", block(1), TileSource(server.template), FAST)
        agent = server.tile_requests()[0].headers["User-Agent"]
    assert agent == "survey-team-7 (+https://example.org/drones)"


@pytest.mark.parametrize("value", ["ops@example.org\r\nX-Evil: 1", "\x01", "é-accent"])
def test_a_contact_that_cannot_be_a_header_is_refused_naming_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(CONTACT, value)
    with tile_server() as server:
        with pytest.raises(InvalidRequestError, match=f"{CONTACT}: not usable in a User-Agent"):
            download_tiles(tmp_path / "c.mbtiles", block(1), TileSource(server.template), FAST)
        assert server.tile_requests() == []
