"""Where a flight comes from: a flight file of any format, or the flights API.

Files are told apart by content, not by name (``takeoff_cache.prepare.flight``
describes the formats); ``GET {URL}/flights/{id}`` answers a JSON flight, with
the bearer token from ``TAKEOFF_CACHE_FLIGHTS_TOKEN``.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx

from takeoff_cache.core.documents import MAX_FLIGHT_BYTES, load_json, read_document
from takeoff_cache.core.env import FLIGHTS_TOKEN
from takeoff_cache.errors import (
    FlightFileError,
    FlightNotFoundError,
    FlightsAuthError,
    FlightsUnreachableError,
    InvalidRequestError,
    MalformedFlightError,
    NotAPlanError,
)
from takeoff_cache.prepare import qgc
from takeoff_cache.prepare.flight import FLIGHT_KEYS, Flight, parse_flight_json
from takeoff_cache.prepare.httpbody import ACCEPT_ENCODING, read_body, user_agent

__all__ = ["MAX_FLIGHT_BYTES", "fetch_flight", "load_flight", "parse_flight"]


def load_flight(path: Path) -> Flight:
    """Read a flight file of any supported format, told apart by its content.

    Only a regular file of at most :data:`MAX_FLIGHT_BYTES` is read: a FIFO or a
    device is refused without waiting on it.
    """
    return parse_flight(read_document(path, MAX_FLIGHT_BYTES, FlightFileError, "flight"), str(path))


def parse_flight(data: bytes, source: str) -> Flight:
    """Parse a flight from the bytes of a ``.plan``, WPL or JSON flight file."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise NotAPlanError(
            f"flight: {source} is not a flight plan (binary, not a .plan, WPL or JSON file)"
        ) from None
    head = text.lstrip()
    if head.startswith("QGC WPL"):
        return qgc.parse_wpl(head, source)
    if not head.startswith(("{", "[")):
        raise NotAPlanError(
            f"flight: {source} is not a flight plan (expected a .plan, QGC WPL or JSON file)"
        )
    obj = load_json(text, source, FlightFileError, "flight")
    if isinstance(obj, dict) and obj.get("fileType") == "Plan":
        return qgc.parse_plan(obj, source)
    if isinstance(obj, dict) and FLIGHT_KEYS & obj.keys():
        return parse_flight_json(obj, source)
    raise NotAPlanError(
        f"flight: {source} is JSON but neither a QGroundControl plan (fileType 'Plan')"
        f" nor a flight ({', '.join(sorted(FLIGHT_KEYS))})"
    )


def fetch_flight(
    api_url: str,
    flight_id: str,
    *,
    token: str | None = None,
    timeout_s: float = 10.0,
    deadline_s: float = 20.0,
) -> Flight:
    """``GET {api_url}/flights/{flight_id}``; the token defaults to the environment's.

    ``timeout_s`` bounds each connect and read, ``deadline_s`` the whole answer;
    an answer over :data:`MAX_FLIGHT_BYTES` is refused. The token is sent as a
    bearer header only; no message names it.
    """
    try:
        fid = str(uuid.UUID(flight_id))
    except ValueError:
        raise InvalidRequestError(f"flight_id: {flight_id!r} is not a UUID") from None
    if not api_url.startswith(("http://", "https://")):
        raise InvalidRequestError(f"flights API: {api_url!r} is not an http(s) URL")
    url = f"{api_url.rstrip('/')}/flights/{quote(fid, safe='')}"
    token = token if token is not None else os.environ.get(FLIGHTS_TOKEN)
    headers = {
        "Accept": "application/json",
        "Accept-Encoding": ACCEPT_ENCODING,
        "User-Agent": user_agent(),
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        deadline = time.monotonic() + deadline_s
        with httpx.stream(
            "GET", url, headers=headers, timeout=timeout_s, follow_redirects=True
        ) as response:
            body = read_body(response, MAX_FLIGHT_BYTES, deadline)
    except TimeoutError:
        raise FlightsUnreachableError(
            f"flights API: {url} did not send its answer within {deadline_s:g} s"
        ) from None
    except ValueError as exc:
        raise MalformedFlightError(
            f"flights API: the answer for flight {fid} is {exc}; not a flight"
        ) from None
    except httpx.TimeoutException:
        raise FlightsUnreachableError(
            f"flights API: {url} did not answer within {timeout_s:g} s"
        ) from None
    except httpx.HTTPError as exc:
        raise FlightsUnreachableError(
            f"flights API: cannot reach {url}: {type(exc).__name__}"
        ) from None
    status = response.status_code
    if status == 404:
        raise FlightNotFoundError(f"flights API: no flight {fid} at {api_url}")
    if status in (401, 403):
        hint = "no token given" if not token else "the token was refused"
        raise FlightsAuthError(
            f"flights API: not authorized for flight {fid} (HTTP {status}; {hint};"
            f" set {FLIGHTS_TOKEN})"
        )
    if status != 200:
        raise FlightsUnreachableError(f"flights API: {url} answered HTTP {status}")
    obj = load_json(body, f"the answer for flight {fid}", MalformedFlightError, "flights API")
    if not isinstance(obj, dict):
        raise MalformedFlightError(f"flights API: the answer for flight {fid} is not an object")
    flight = parse_flight_json(obj, url, default_id=fid)
    if flight.id != fid:
        raise MalformedFlightError(
            f"flights API: asked for flight {fid}, the answer is flight {flight.id}"
        )
    return flight
