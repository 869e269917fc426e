"""Tile servers: an XYZ URL template, the checks on what it answers, and keeping its key secret.

A template names a tile with ``{z}`` ``{x}`` ``{y}``, ``{-y}`` (the TMS row), ``{s}``
(a subdomain, chosen from the tile so the same tile always asks the same host) and
``{q}`` (Bing's quadkey). The API key is never part of the template: it is sent as
the header or query parameter the operator names, and :func:`redact` takes it out
of any text that could be shown.
"""

from __future__ import annotations

import email.utils
import io
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, quote_plus, urlsplit

from takeoff_cache.backbones.imagesize import header_size
from takeoff_cache.core.env import TILES_API_KEY
from takeoff_cache.errors import InvalidRequestError

REDACTED = "[redacted]"
# Shorter keys are refused: replacing a two-letter key in every message hides nothing.
MIN_KEY_CHARS = 8
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PLACEHOLDER = re.compile(r"\{[^}]*\}")
_KNOWN = {"{z}", "{x}", "{y}", "{-y}", "{s}", "{q}"}


@dataclass(frozen=True)
class TileSource:
    """Where tiles come from: an XYZ URL template and how to send its API key."""

    url_template: str
    subdomains: tuple[str, ...] = ("a", "b", "c")
    key_header: str | None = None
    key_param: str | None = None
    attribution: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        t = self.url_template
        parts = urlsplit(t)
        if "@" in parts.netloc:
            # Not echoed: the URL holds a password or key.
            raise InvalidRequestError(
                "tiles URL: credentials in the URL (user:password@) are refused; send the key"
                f" from {TILES_API_KEY} with --tiles-key-header or --tiles-key-param"
            )
        if self.key_param and self.key_param in parse_qs(parts.query, keep_blank_values=True):
            raise InvalidRequestError(
                f"tiles URL: the key parameter {self.key_param!r} is in the URL; leave it out,"
                f" the key comes from {TILES_API_KEY}"
            )
        if urlsplit(t).scheme not in ("http", "https") or not urlsplit(t).netloc:
            raise InvalidRequestError(f"tiles URL: {t!r} is not an http(s) URL template")
        unknown = set(_PLACEHOLDER.findall(t)) - _KNOWN
        if unknown:
            raise InvalidRequestError(
                f"tiles URL: unknown placeholder(s) {', '.join(sorted(unknown))};"
                " use {z} {x} {y} {-y} {s} {q}"
            )
        if "{q}" not in t and not ("{z}" in t and "{x}" in t and ("{y}" in t or "{-y}" in t)):
            raise InvalidRequestError(
                f"tiles URL: {t!r} must name a tile: {{z}}, {{x}} and {{y}} (or {{-y}}), or {{q}}"
            )
        if "{s}" in t and not self.subdomains:
            raise InvalidRequestError("tiles URL: {s} needs at least one subdomain")
        if self.key_header and self.key_param:
            raise InvalidRequestError(
                "tiles key: give a header name or a query parameter, not both"
            )

    def url(self, z: int, x: int, y: int) -> str:
        """The URL of tile ``z/x/y`` (XYZ row), without the API key."""
        url = self.url_template
        if "{-y}" in url:
            url = url.replace("{-y}", str((1 << z) - 1 - y))
        url = url.replace("{z}", str(z)).replace("{x}", str(x)).replace("{y}", str(y))
        if "{s}" in url:
            url = url.replace("{s}", self.subdomains[(x + y) % len(self.subdomains)])
        # A quadkey is one digit per zoom level: made only for templates that use it.
        return url.replace("{q}", quadkey(z, x, y)) if "{q}" in url else url

    def host(self, z: int, x: int, y: int) -> str:
        return urlsplit(self.url(z, x, y)).netloc

    def api_key(self, given: str | None = None) -> str | None:
        """The key sent with each request: ``given``, else the environment's.

        Raises InvalidRequestError when the source sends a key and none is set, or
        when the key is too short to be told from ordinary text (so too short to
        redact). Checked before the first request: ``prepare``'s precheck asks too.
        """
        key = given if given is not None else os.environ.get(TILES_API_KEY) or None
        if (self.key_header or self.key_param) and not key:
            raise InvalidRequestError(
                f"tiles key: {TILES_API_KEY} is not set (the source sends it as"
                f" {self.key_header or self.key_param})"
            )
        if key and len(key) < MIN_KEY_CHARS:
            raise InvalidRequestError(
                f"tiles key: {TILES_API_KEY} is shorter than {MIN_KEY_CHARS} characters;"
                " a real API key is longer"
            )
        return key


def origin(url: str) -> str:
    """``scheme://host:port`` of ``url``, the port written out: what a key is tied to."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or _DEFAULT_PORTS.get(scheme)
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"


def quadkey(z: int, x: int, y: int) -> str:
    """Bing's quadkey of a tile: one base-4 digit per zoom level."""
    digits = []
    for i in range(z, 0, -1):
        mask = 1 << (i - 1)
        digits.append(str((1 if x & mask else 0) + (2 if y & mask else 0)))
    return "".join(digits)


# The longest wait a Retry-After is read as: a larger one (a year, 10**5000 seconds,
# a date in 2999) means "not today", which max_wait_s then refuses to wait for.
RETRY_AFTER_CAP_S = 86_400.0
_DELTA_SECONDS = re.compile(r"[0-9]+")  # ASCII digits only: "²".isdigit() is True


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP-date),
    at most :data:`RETRY_AFTER_CAP_S`; None (as if absent) for anything else."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        # Compared as text first: int() refuses more than 4300 digits.
        return RETRY_AFTER_CAP_S if len(value) > 6 else min(float(value), RETRY_AFTER_CAP_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
        at = when.timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    wait = at - (time.time() if now is None else now)
    return min(max(0.0, wait), RETRY_AFTER_CAP_S)


MIN_TILE_SIDE = 64  # smaller images are placeholders (a 1x1 "no data" tile), not imagery
MAX_TILE_PIXELS = 4096 * 4096  # larger ones are refused from the header, before a decode


def tile_sized(width: int, height: int) -> bool:
    """Whether an image of this size can be a map tile."""
    return min(width, height) >= MIN_TILE_SIDE and width * height <= MAX_TILE_PIXELS


def image_format(data: bytes) -> str | None:
    """``"jpg"``, ``"png"`` or ``"webp"`` if ``data`` decodes completely as that image, else None.

    An image whose header gives a size that :func:`tile_sized` refuses is None
    without being decoded. JPEGs are decoded by libjpeg-turbo at 1/8 scale and in
    grey, the cheapest decode that still reads every entropy-coded byte (a
    truncated or damaged tile fails).
    """
    size = header_size(data)
    if size is None or not tile_sized(*size):
        return None
    if data[:3] == b"\xff\xd8\xff":
        import simplejpeg  # numpy with it: a command that only checks a template never loads it

        try:
            simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=1, min_width=1, strict=True)
        except ValueError:
            pass  # unusual JPEGs (CMYK, arithmetic coding): Pillow decides
        else:
            return "jpg"
    from PIL import Image  # here: a body checker that meets only JPEGs never loads it

    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = _PILLOW_FORMATS.get(image.format or "")
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return fmt


_PILLOW_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def redact(text: str, key: str | None) -> str:
    """``text`` with the key (as is and URL-encoded) replaced by ``[redacted]``."""
    if not key:
        return text
    for form in {key, quote(key, safe=""), quote_plus(key)}:
        text = text.replace(form, REDACTED)
    return text


class _RedactFilter(logging.Filter):
    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message, self.key)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


@contextmanager
def redacting_logs(key: str | None) -> Iterator[None]:
    """httpx logs every request's URL at INFO: with a key in the query, that line would carry it."""
    if not key:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("httpx", "httpcore")]
    f = _RedactFilter(key)
    for logger in loggers:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(f)
