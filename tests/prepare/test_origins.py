"""Secrets stay with their origin: a redirect elsewhere never carries the tiles key
or the flights token, and a URL that holds credentials is refused.

Two real HTTP servers on 127.0.0.1: their ports differ, so their origins do."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from takeoff_cache.errors import InvalidRequestError
from takeoff_cache.prepare.download import DownloadOptions, download_tiles
from takeoff_cache.prepare.job import default_corpus
from takeoff_cache.prepare.sources import fetch_flight
from takeoff_cache.prepare.tileserver import TileSource, origin
from tests.support.tileserver import tile_bytes

KEY = "k3y-Origin-9Qz-keep-me-home"
TOKEN = "tok-Origin-77-bearer-stays"
FLIGHT = Path(__file__).parents[1] / "data" / "flights" / "flight.json"
FLIGHT_ID = "6f1c2a8e-5d0b-4b9e-9a51-2f1d7c3e8b40"
FAST = DownloadOptions(
    backoff_base_s=0.01, backoff_max_s=0.02, timeout_s=5.0, max_retries=1, failing_share=1.0
)
TILE = (16, 39000, 22000)


@dataclass
class Recorder:
    """A server that sends ``/moved/...`` on to ``redirect_to`` (with the query) and
    answers tiles and the flight itself; it records what each request carried."""

    port: int = 0
    redirect_to: str = ""
    seen: list[tuple[str, dict[str, list[str]], dict[str, str]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def carried(self, secret: str) -> bool:
        return any(secret in repr(entry) for entry in self.seen)


@contextmanager
def recorder() -> Iterator[Recorder]:
    state = Recorder()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            state.seen.append((url.path, parse_qs(url.query), dict(self.headers.items())))
            if url.path.startswith("/moved/"):
                rest = url.path[len("/moved") :] + (f"?{url.query}" if url.query else "")
                return self._send(302, b"", {"Location": state.redirect_to + rest})
            if url.path.startswith("/tiles/"):
                z, x, y = (int(v) for v in url.path[len("/tiles/") : -len(".jpg")].split("/"))
                return self._send(200, tile_bytes(z, x, y), {"Content-Type": "image/jpeg"})
            if url.path.endswith(f"/flights/{FLIGHT_ID}"):
                return self._send(200, FLIGHT.read_bytes(), {"Content-Type": "application/json"})
            self._send(404)

        def _send(
            self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def two() -> Iterator[tuple[Recorder, Recorder]]:
    with recorder() as home, recorder() as elsewhere:
        yield home, elsewhere


@pytest.mark.parametrize("how", ["header", "param"])
def test_a_redirect_to_another_origin_is_refused_before_the_key_goes_there(
    two: tuple[Recorder, Recorder], tmp_path: Path, how: str
) -> None:
    home, elsewhere = two
    home.redirect_to = elsewhere.url
    kwargs = {"key_param": "apikey"} if how == "param" else {"key_header": "X-Api-Key"}
    source = TileSource(home.url + "/moved/tiles/{z}/{x}/{y}.jpg", **kwargs)  # type: ignore[arg-type]
    result = download_tiles(tmp_path / "c.mbtiles", [TILE], source, FAST, api_key=KEY)
    assert result.fetched == 0 and result.failed_count == 1
    reason = result.failed[0].reason
    assert "redirected to another origin" in reason and elsewhere.url in reason
    assert home.carried(KEY)  # the key went to its own origin...
    assert elsewhere.seen == []  # ...and nothing at all to the other one
    assert KEY not in repr(result)


def test_a_redirect_within_the_origin_is_followed_with_the_key(
    two: tuple[Recorder, Recorder], tmp_path: Path
) -> None:
    home, _ = two
    home.redirect_to = home.url
    source = TileSource(home.url + "/moved/tiles/{z}/{x}/{y}.jpg", key_header="X-Api-Key")
    result = download_tiles(tmp_path / "c.mbtiles", [TILE], source, FAST, api_key=KEY)
    assert result.fetched == 1 and result.failed_count == 0
    assert [path for path, _, headers in home.seen if headers.get("X-Api-Key") == KEY] == [
        "/moved/tiles/16/39000/22000.jpg",
        "/tiles/16/39000/22000.jpg",
    ]


def test_without_a_key_a_redirect_elsewhere_is_followed(
    two: tuple[Recorder, Recorder], tmp_path: Path
) -> None:
    home, elsewhere = two
    home.redirect_to = elsewhere.url
    source = TileSource(home.url + "/moved/tiles/{z}/{x}/{y}.jpg")
    result = download_tiles(tmp_path / "c.mbtiles", [TILE], source, FAST, api_key="")
    assert result.fetched == 1


def test_the_flights_token_is_not_sent_on_to_another_origin(
    two: tuple[Recorder, Recorder],
) -> None:
    home, elsewhere = two
    home.redirect_to = elsewhere.url
    flight = fetch_flight(home.url + "/moved/v1", FLIGHT_ID, token=TOKEN)
    assert flight.id == FLIGHT_ID
    assert home.seen[0][2]["Authorization"] == f"Bearer {TOKEN}"
    assert [path for path, _, _ in elsewhere.seen] == [f"/v1/flights/{FLIGHT_ID}"]
    assert not elsewhere.carried(TOKEN)
    assert "Authorization" not in elsewhere.seen[0][2]


def test_origins_write_the_default_port_out() -> None:
    assert origin("https://T.example/a") == origin("https://t.example:443/b")
    assert origin("http://127.0.0.1:8080/") != origin("http://127.0.0.1:8081/")
    assert origin("http://t.example/") != origin("https://t.example/")


# --------------------------------------------------------------------------- credentials in the URL


def test_a_url_with_credentials_is_refused_without_showing_them() -> None:
    with pytest.raises(InvalidRequestError, match="--tiles-key-header") as info:
        TileSource("https://user:s3cr3t-pass@t.example/{z}/{x}/{y}.png")
    assert "s3cr3t" not in str(info.value) and "\n" not in str(info.value)


def test_a_key_parameter_written_into_the_url_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="key parameter 'apikey' is in the URL") as info:
        TileSource("https://t.example/{z}/{x}/{y}.png?apikey=s3cr3t-key", key_param="apikey")
    assert "s3cr3t" not in str(info.value)


def test_the_corpus_is_never_named_after_credentials(tmp_path: Path) -> None:
    corpus = default_corpus(tmp_path, "https://user:s3cr3t@t.example:8443/{z}/{x}/{y}.png")
    assert corpus.name == "tiles.mbtiles"
    # A corpus an older release named after the host: still found, never the password.
    (tmp_path / "tiles").mkdir()
    (tmp_path / "tiles" / "t-example-8443.mbtiles").touch()
    corpus = default_corpus(tmp_path, "https://user:s3cr3t@t.example:8443/{z}/{x}/{y}.png")
    assert corpus.name == "t-example-8443.mbtiles"


def test_a_short_key_is_refused_naming_the_variable_not_the_value(tmp_path: Path) -> None:
    source = TileSource("http://127.0.0.1:9/{z}/{x}/{y}.png", key_param="k")
    with pytest.raises(InvalidRequestError) as info:
        download_tiles(tmp_path / "c.mbtiles", [TILE], source, FAST, api_key="1")
    message = str(info.value)
    assert "TAKEOFF_CACHE_TILES_API_KEY is shorter than 8 characters" in message
    assert "1" not in message.replace("TAKEOFF_CACHE_TILES_API_KEY", "")
