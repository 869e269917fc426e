"""Download an area's tiles from an XYZ tile server into an MBTiles corpus.

Polite: at most ``concurrency`` requests in flight per host; 429, 5xx, resets
and timeouts are retried with exponential backoff and jitter, never sooner than
the server's ``Retry-After`` (which pauses every request to that host, not only
the one that got it); after ``max_retries`` a tile is listed as failed; a host
that fails ``breaker_failures`` times in a row, refuses the key (401/403) or asks
to wait longer than ``max_wait_s`` stops the download with :class:`HostFailingError`.

Careful: a body is stored only if it decodes as a JPEG, PNG or WebP image (a 200
with an HTML page is a failure); each tile's SHA-256 and validators are kept;
tiles already present are not fetched again, and with ``max_age_days`` older
ones are revalidated (``If-None-Match`` / ``If-Modified-Since``; a 304 renews
their age). See :mod:`takeoff_cache.tiles.mbtiles` for why a kill loses nothing committed.

The API key (``TAKEOFF_CACHE_TILES_API_KEY``) goes in the header or query
parameter the operator names; every message, result and log line that could
carry it has it replaced by ``[redacted]``.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import itertools
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Generator, Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from takeoff_cache.core.env import TILES_API_KEY
from takeoff_cache.errors import HostFailingError, InvalidRequestError, TooManyTilesError
from takeoff_cache.prepare.bodycheck import BodyChecker
from takeoff_cache.prepare.httpbody import (
    ACCEPT_ENCODING,
    AttemptOverdue,
    AttemptStopped,
    SocketWatch,
    read_body,
    user_agent,
)
from takeoff_cache.prepare.tileserver import (
    TileSource,
    image_format,
    origin,
    redact,
    redacting_logs,
    retry_after_s,
    tile_sized,
)
from takeoff_cache.tiles.mbtiles import (
    Coord,
    MBTilesWriter,
    StoredTile,
    mean_tile_bytes,
    stored_tiles,
)

DEFAULT_TILE_BYTES = 20_000  # a 256 px satellite JPEG, for estimates of unseen zooms
_COMMIT_INTERVAL_S = 1.0  # the most a kill can cost: tiles received in the last second
# Once stopped, how long worker threads get to leave before they are left behind
# (daemon threads, in a connect or a name lookup no stop can cut short).
_STOP_GRACE_S = 2.0


@dataclass(frozen=True)
class DownloadOptions:
    concurrency: int = 4  # requests in flight per host
    timeout_s: float = 15.0  # each connect and read
    deadline_s: float = 30.0  # a whole attempt (connect, headers, body): later is a failure
    max_body_bytes: int = 4 << 20  # decoded: a larger body is a failed attempt
    max_retries: int = 4
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_wait_s: float = 120.0  # a longer Retry-After stops the download
    breaker_failures: int = 12  # failed attempts in a row that stop the download
    # A job that ends with more than this share of its tiles failed is a
    # HostFailingError naming the likely cause, not a corpus to build from.
    failing_share: float = 0.5
    max_age_days: float | None = None
    max_tiles: int = 50_000
    # Jobs this big check their bodies in a child process (see bodycheck); smaller
    # ones finish before it would have started. 0: every job.
    checker_from_tiles: int = 200

    def __post_init__(self) -> None:
        for name in ("timeout_s", "deadline_s", "backoff_base_s", "backoff_max_s", "max_wait_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < math.inf):
                raise InvalidRequestError(
                    f"download: {name} must be a finite number of seconds above 0, not {value!r}"
                )
        if self.max_age_days is not None and not 0 <= self.max_age_days < math.inf:
            raise InvalidRequestError(
                f"download: --max-age must be a finite number of days, not {self.max_age_days!r}"
            )


@dataclass(frozen=True)
class FailedTile:
    z: int
    x: int
    y: int
    reason: str


@dataclass(frozen=True)
class DownloadEstimate:
    """What a download would do, from the corpus alone (nothing fetched)."""

    per_zoom: dict[int, int]  # tiles to request per zoom (missing + stale)
    missing: int
    stale: int
    kept: int
    estimated_bytes: int

    @property
    def to_fetch(self) -> int:
        return self.missing + self.stale


@dataclass(frozen=True)
class DownloadResult:
    requested: int  # tiles of the job
    fetched: int  # bodies stored (new or changed)
    kept: int  # present and fresh: not asked for
    revalidated: int  # asked for again, unchanged (304 or the same bytes): age renewed
    failed: tuple[FailedTile, ...]  # the first 20 by z/x/y
    failed_count: int
    bytes: int
    seconds: float

    @property
    def tiles_per_s(self) -> float:
        done = self.fetched + self.revalidated
        return done / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "fetched": self.fetched,
            "kept": self.kept,
            "revalidated": self.revalidated,
            "failed": [f"{f.z}/{f.x}/{f.y}: {f.reason}" for f in self.failed],
            "failed_count": self.failed_count,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "tiles_per_s": round(self.tiles_per_s, 1),
        }


def missing_tiles(corpus_path: Path, tiles: Sequence[Coord]) -> list[Coord]:
    """The tiles of ``tiles`` the corpus does not hold, sorted (all of them if no file)."""
    have = stored_tiles(corpus_path, tiles)
    return sorted(set(tiles) - have.keys())


def estimate_download(
    corpus_path: Path, tiles: Sequence[Coord], options: DownloadOptions | None = None
) -> DownloadEstimate:
    """Tiles to request per zoom and their estimated bytes; reads the corpus only."""
    options = options or DownloadOptions()
    have = stored_tiles(corpus_path, tiles)
    todo, stale = _todo(tiles, have, options.max_age_days, time.time())
    per_zoom: dict[int, int] = {}
    for z, _, _ in todo:
        per_zoom[z] = per_zoom.get(z, 0) + 1
    sizes = mean_tile_bytes(corpus_path)
    estimated = sum(n * sizes.get(z, DEFAULT_TILE_BYTES) for z, n in per_zoom.items())
    unique = len(set(tiles))
    return DownloadEstimate(
        dict(sorted(per_zoom.items())),
        missing=len(todo) - stale,
        stale=stale,
        kept=unique - len(todo),
        estimated_bytes=round(estimated),
    )


@dataclass(frozen=True)
class DownloadProgress:
    """Where a download stands, as :func:`download_tiles` tells its ``progress``.

    Counts only: nothing here can carry the API key or a server's answer."""

    done: int  # tiles settled so far: stored, revalidated or failed
    total: int  # tiles to request
    failed: int
    bytes: int  # bodies received so far
    seconds: float  # since the download started

    @property
    def tiles_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def download_tiles(
    corpus_path: Path,
    tiles: Sequence[Coord],
    source: TileSource,
    options: DownloadOptions | None = None,
    *,
    progress: Callable[[DownloadProgress], None] | None = None,
    api_key: str | None = None,
) -> DownloadResult:
    """Fetch every tile of ``tiles`` the corpus lacks (or holds too old) into it.

    ``progress`` is called from this thread as tiles finish (after each batch of
    those that arrived together, so ``done`` can step by more than one), never for
    a job with nothing to fetch; when every tile is settled the last call has
    ``done == total``. A :class:`takeoff_cache.cli.progress.ProgressBar` is one::

        with ProgressBar() as bar:
            download_tiles(corpus, tiles, source, options, progress=bar)

    ``api_key`` defaults to ``TAKEOFF_CACHE_TILES_API_KEY``.
    """
    options = options or DownloadOptions()
    started = time.monotonic()
    key = source.api_key(api_key)
    agent = user_agent()
    unique = sorted(set(tiles))
    have = stored_tiles(corpus_path, unique)
    todo, _ = _todo(unique, have, options.max_age_days, time.time())
    if len(todo) > options.max_tiles:
        raise TooManyTilesError(
            f"download: {len(todo):,} tiles to fetch, more than max_tiles {options.max_tiles:,};"
            " narrow the area or the zoom levels, or raise the limit"
        )
    run = _Run(source, options, key, agent, served=bool(have))
    counts = {"fetched": 0, "revalidated": 0, "bytes": 0}
    failed: list[FailedTile] = []
    causes: dict[str, int] = {}  # failed tiles by what failed them: "404", "5xx", ...
    if todo:
        name = source.name or urlsplit(source.url_template).netloc
        with (
            redacting_logs(key),
            MBTilesWriter(
                corpus_path, name=name, attribution=source.attribution, planned=todo
            ) as writer,
        ):
            formats: set[str] = set()
            done = 0
            outcomes = run.outcomes(todo, have, tick_s=_COMMIT_INTERVAL_S)
            # Closed at once however this ends: a stop must not wait for the collector.
            with closing(outcomes):
                for batch in outcomes:
                    if not batch:
                        writer.commit_if_due()  # a stalled server must not hold tiles uncommitted
                        continue
                    now = time.time()
                    for outcome in batch:
                        _record(writer, outcome, counts, failed, formats, now)
                        if outcome.kind == "failed":
                            causes[outcome.cause] = causes.get(outcome.cause, 0) + 1
                    done += len(batch)
                    if progress is not None:
                        seconds = time.monotonic() - started
                        progress(
                            DownloadProgress(done, len(todo), len(failed), counts["bytes"], seconds)
                        )
            if len(formats) == 1 and not have:
                writer.set_format(formats.pop())  # a new corpus says what it holds
    if run.tripped is not None:
        raise run.tripped
    failed.sort(key=lambda f: (f.z, f.x, f.y))
    # Judged over the area, not what was left to fetch: a re-run whose last few holes
    # 404 again is a corpus with holes (the readiness verdict names them), not a
    # template that does not match the server.
    if todo and len(failed) > options.failing_share * len(unique):
        raise _mostly_failed(source, len(failed), len(unique), causes, run.first_failed)
    return DownloadResult(
        requested=len(unique),
        fetched=counts["fetched"],
        kept=len(unique) - len(todo),
        revalidated=counts["revalidated"],
        failed=tuple(failed[:20]),
        failed_count=len(failed),
        bytes=counts["bytes"],
        seconds=time.monotonic() - started,
    )


def _todo(
    tiles: Sequence[Coord], have: dict[Coord, StoredTile], max_age_days: float | None, now: float
) -> tuple[list[Coord], int]:
    """Tiles to request (missing ones, then stale ones), and how many are stale."""
    missing = sorted(set(tiles) - have.keys())
    stale: list[Coord] = []
    if max_age_days is not None:
        limit = now - max_age_days * 86400.0
        stale = sorted(c for c, t in have.items() if t.fetched_at is None or t.fetched_at < limit)
    return missing + stale, len(stale)


@dataclass(frozen=True)
class _Job:
    coord: Coord
    url: str
    host: str  # the URL's netloc: requests are bounded and paused per host
    attempt: int = 0


@dataclass
class _Outcome:
    job: _Job
    kind: str  # "body" (to check), "stored", "same", "retry", "failed", "cancelled"
    data: bytes = b""
    sha256: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    content_type: str = ""
    tile_format: str = ""
    reason: str = ""
    cause: str = ""  # a failed tile's: its HTTP status ("404"), "5xx", "timeout", "network", "body"


def _record(
    writer: MBTilesWriter,
    outcome: _Outcome,
    counts: dict[str, int],
    failed: list[FailedTile],
    formats: set[str],
    now: float,
) -> None:
    coord = outcome.job.coord
    if outcome.kind == "stored":
        sha = outcome.sha256 or ""
        writer.put(coord, outcome.data, sha, outcome.etag, outcome.last_modified, now)
        counts["fetched"] += 1
        counts["bytes"] += len(outcome.data)
        formats.add(outcome.tile_format)
    elif outcome.kind == "same":
        writer.renew(coord, outcome.sha256, outcome.etag, outcome.last_modified, now)
        counts["revalidated"] += 1
        counts["bytes"] += len(outcome.data)
    elif outcome.kind == "failed":
        failed.append(FailedTile(*coord, outcome.reason))


@dataclass
class _Host:
    """One host's shared state: its pause and run of failures."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    not_before: float = 0.0
    failures: int = 0
    last_status: str = ""
    served: bool = False  # a tile came from it: its 404s are holes in its coverage


class _Run:
    """One download's worker side: fetch, check, retry, and stop a failing host.

    Each host gets ``concurrency`` threads that only make requests, one attempt per
    job, as a plain concurrent fetch would. The thread that consumes the outcomes
    has each batch of bodies checked and hashed (by a :class:`BodyChecker` in a
    large job, else itself) and schedules retries after their backoff, so no
    request thread sits idle while a tile waits for its next attempt.
    """

    def __init__(
        self,
        source: TileSource,
        options: DownloadOptions,
        key: str | None,
        agent: str,
        served: bool = False,
    ) -> None:
        # served: the corpus already holds tiles of this area, so the hosts' 404s are
        # holes in their coverage from the start, not a sign of a wrong template.
        self.served = served
        self.source = source
        self.options = options
        self.key = key
        self.agent = agent
        self.stop = threading.Event()
        self.watch = SocketWatch(self.stop)
        self.tripped: HostFailingError | None = None
        self.hosts: dict[str, _Host] = {}
        self.first_failed: str = ""  # the URL of a tile that failed (no key in it)
        self._trip_lock = threading.Lock()

    def outcomes(
        self, todo: list[Coord], have: dict[Coord, StoredTile], tick_s: float
    ) -> Generator[list[_Outcome], None, None]:
        """Settled outcomes as they arrive, as many at a time as have arrived; an
        empty list after ``tick_s`` without one."""
        jobs: dict[str, queue.SimpleQueue[_Job | None]] = {}
        for c in todo:
            url = self.source.url(*c)
            host = url.split("/", 3)[2]  # the netloc, cheaper than urlsplit
            jobs.setdefault(host, queue.SimpleQueue()).put(_Job(c, url, host))
        self.hosts = {name: _Host(served=self.served) for name in jobs}
        headers = {"User-Agent": self.agent, "Accept-Encoding": ACCEPT_ENCODING}
        if self.key and self.source.key_header:
            headers[self.source.key_header] = self.key
        # The key goes only to the origins the template names, redirects included.
        scheme = urlsplit(self.source.url_template).scheme
        origins = {origin(f"{scheme}://{name}/") for name in jobs}
        hooks: dict[str, list[Callable[..., Any]]] = (
            {"request": [_SameOrigin(origins)]} if self.key else {}
        )
        workers = self.options.concurrency * len(jobs)
        limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
        # Workers hand over each outcome (or what they raised) here, and nothing else.
        arrived: queue.SimpleQueue[_Outcome | BaseException] = queue.SimpleQueue()
        retries: list[tuple[float, int, _Job]] = []  # a heap by when they are due
        order = itertools.count()  # breaks ties in the heap: jobs do not compare
        checker = BodyChecker() if len(todo) >= self.options.checker_from_tiles else None
        with (
            checker or nullcontext(),
            httpx.Client(
                headers=headers,
                timeout=self.options.timeout_s,
                limits=limits,
                follow_redirects=True,
                event_hooks=hooks,
            ) as client,
        ):
            self.watch.install(client)
            threads = [
                threading.Thread(
                    target=self._work,
                    args=(client, host_jobs, have, arrived),
                    name=f"tiles-{name}-{i}",
                    daemon=True,  # one left in a connect must not hold the process
                )
                for name, host_jobs in jobs.items()
                for i in range(self.options.concurrency)
            ]
            for thread in threads:
                thread.start()
            left = len(todo)
            try:
                while left and not self.stop.is_set():
                    now = time.monotonic()
                    while retries and retries[0][0] <= now:
                        job = heapq.heappop(retries)[2]
                        jobs[job.host].put(job)
                    wait = min(tick_s, retries[0][0] - now) if retries else tick_s
                    try:
                        first = arrived.get(timeout=max(wait, 0.0))
                    except queue.Empty:
                        yield []  # a quiet moment: the caller commits what it holds
                        continue
                    batch = [first]
                    # Take all that is there at once: one wake-up of this thread for
                    # many tiles when they come fast.
                    while True:
                        try:
                            batch.append(arrived.get_nowait())
                        except queue.Empty:
                            break
                    outcomes: list[_Outcome] = []
                    for item in batch:
                        if isinstance(item, BaseException):
                            raise item
                        outcomes.append(item)
                    settled: list[_Outcome] = []
                    for outcome in self._settled(outcomes, have, checker):
                        if outcome.kind == "retry":
                            due = time.monotonic() + self._backoff(outcome.job.attempt)
                            heapq.heappush(retries, (due, next(order), outcome.job))
                        elif outcome.kind != "cancelled":
                            settled.append(outcome)
                    left -= len(settled)
                    yield settled
            finally:
                # Workers notice the stop within POLL_S, in a socket wait or between
                # requests; tiles not started are dropped. None is waited for longer
                # than the grace: a connect or name lookup may not end sooner.
                self.stop.set()
                for host_jobs in jobs.values():
                    for _ in range(self.options.concurrency):
                        host_jobs.put(None)
                until = time.monotonic() + _STOP_GRACE_S
                for thread in threads:
                    thread.join(max(until - time.monotonic(), 0.0))
            # Tiles that arrived while the others were being stopped are kept all the same.
            stopped: list[_Outcome] = []
            while True:
                try:
                    item = arrived.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Outcome):
                    stopped.append(item)
            settled_late = self._settled(stopped, have, checker)
        late = [o for o in settled_late if o.kind in ("stored", "same")]
        if late:
            yield late

    def _work(
        self,
        client: httpx.Client,
        jobs: queue.SimpleQueue[_Job | None],
        have: dict[Coord, StoredTile],
        arrived: queue.SimpleQueue[_Outcome | BaseException],
    ) -> None:
        while not self.stop.is_set():
            job = jobs.get()
            if job is None:
                return
            try:
                arrived.put(self._fetch(client, job, have.get(job.coord)))
            except BaseException as exc:  # a bug, not a tile's fault: the caller raises it
                arrived.put(exc)
                return

    def _fetch(self, client: httpx.Client, job: _Job, old: StoredTile | None) -> _Outcome:
        """One attempt at one tile; a 200's body is left for :meth:`_settle` to check."""
        host = self.hosts[job.host]
        params = {self.source.key_param: self.key} if self.key and self.source.key_param else None
        headers = {}
        if old is not None and old.etag:
            headers["If-None-Match"] = old.etag
        if old is not None and old.last_modified:
            headers["If-Modified-Since"] = old.last_modified
        self._wait(host.not_before - time.monotonic())
        if self.stop.is_set():
            return _Outcome(job, "cancelled")
        late = f"no complete answer within {self.options.deadline_s:g} s"
        deadline = time.monotonic() + self.options.deadline_s
        try:
            with (
                self.watch.attempt(deadline),
                client.stream("GET", job.url, params=params, headers=headers) as response,
            ):
                try:
                    body = read_body(response, self.options.max_body_bytes, deadline)
                except TimeoutError:
                    return self._retry(job, late, "timeout")
                except ValueError as exc:  # leaving the stream unread drops the connection
                    problem = f"HTTP {response.status_code} with a body {exc}"
                    return self._retry(job, problem, "body")
        except AttemptStopped:
            return _Outcome(job, "cancelled")
        except AttemptOverdue:
            return self._retry(job, late, "timeout")
        except _CrossOriginRedirect as exc:
            self._success(host)  # the server answered; this tile is not to be had here
            reason = f"redirected to another origin ({exc}); the key is not sent there"
            return _Outcome(job, "failed", reason=self._redact(reason), cause="redirect")
        except httpx.TooManyRedirects:
            why = "redirects in a loop"
            self._trip(job.host, "too many redirects", why, cause="redirect")
            return _Outcome(job, "cancelled")
        except httpx.TimeoutException:
            problem = f"timed out after {self.options.timeout_s:g} s"
            return self._retry(job, problem, "timeout")
        except httpx.TransportError as exc:
            return self._retry(job, f"connection failed ({type(exc).__name__})", "network")
        except httpx.HTTPError as exc:  # a redirect to a URL no request can be made to
            self._success(host)
            reason = self._redact(f"cannot be requested ({type(exc).__name__}: {exc})")
            return _Outcome(job, "failed", reason=reason, cause="redirect")
        status = response.status_code
        if status == 304 and old is not None:
            self._success(host, served=True)
            etag, modified = _validators(response, old)
            return _Outcome(job, "same", sha256=old.sha256, etag=etag, last_modified=modified)
        if status == 200:
            etag, modified = _validators(response, None)
            content_type = response.headers.get("content-type", "")
            return _Outcome(job, "body", body, None, etag, modified, content_type)
        problem = f"HTTP {status}"
        cause = "5xx" if status >= 500 else str(status)
        if status in (401, 403):
            self._note_failed(job)
            self._trip(job.host, problem, "refuses the requests", cause=cause)
            return _Outcome(job, "cancelled")
        if status == 429 or status >= 500:
            wait = retry_after_s(response.headers.get("retry-after"))
            if wait is not None:
                if wait > self.options.max_wait_s:
                    why = f"asks to wait {wait:.0f} s"
                    self._trip(job.host, problem, why, cause="wait")
                    return _Outcome(job, "cancelled")
                with host.lock:
                    host.not_before = max(host.not_before, time.monotonic() + wait)
            return self._retry(job, problem, cause)
        # 404 and other client errors: the server answered; this tile is not to be had.
        # From a server that has served tiles, a hole in its coverage; from one that has
        # not served any yet, a failure towards the breaker (a template that does not
        # match the server 404s on every tile).
        self._note_failed(job)
        if host.served:
            self._success(host)
        else:
            self._failure(job.host, problem, cause)
        return _Outcome(job, "failed", reason=problem, cause=cause)

    def _settled(
        self,
        batch: list[_Outcome],
        have: dict[Coord, StoredTile],
        checker: BodyChecker | None,
    ) -> list[_Outcome]:
        """The batch with each body checked and hashed: stored, same, or a failed
        attempt (``"retry"`` or ``"failed"``); other outcomes as they are."""
        bodies = [o for o in batch if o.kind == "body"]
        for o in bodies:
            o.reason = _not_an_image_type(o.content_type)
        images = [o for o in bodies if not o.reason]
        checked = checker.check([o.data for o in images]) if checker and images else None
        for i, o in enumerate(images):
            fmt, sha = checked[i] if checked is not None else _check_here(o.data)
            o.tile_format, o.sha256 = fmt or "", sha
            if fmt is None:
                o.reason = _not_decodable(o.data)
        return [self._settle(o, have) if o.kind == "body" else o for o in batch]

    def _settle(self, outcome: _Outcome, have: dict[Coord, StoredTile]) -> _Outcome:
        job = outcome.job
        if outcome.reason:
            return self._retry(job, outcome.reason, "body")
        self._success(self.hosts[job.host], served=True)
        old = have.get(job.coord)
        outcome.kind = "same" if old is not None and old.sha256 == outcome.sha256 else "stored"
        return outcome

    def _retry(self, job: _Job, problem: str, cause: str) -> _Outcome:
        """A failed attempt: the next one (``kind == "retry"``), or the tile failed."""
        self._failure(job.host, problem, cause)
        if job.attempt < self.options.max_retries:
            return _Outcome(replace(job, attempt=job.attempt + 1), "retry", reason=problem)
        self._note_failed(job)
        attempts = self.options.max_retries + 1
        reason = self._redact(f"{problem} after {attempts} attempts")
        return _Outcome(job, "failed", reason=reason, cause=cause)

    def _note_failed(self, job: _Job) -> None:
        if not self.first_failed:
            self.first_failed = job.url  # never the key: it goes as a header or parameter

    def _backoff(self, attempt: int) -> float:
        delay = min(self.options.backoff_max_s, self.options.backoff_base_s * 2.0 ** (attempt - 1))
        return delay * random.uniform(0.5, 1.0)  # jitter: retries of many tiles spread out

    def _wait(self, seconds: float) -> None:
        if seconds > 0:
            self.stop.wait(seconds)

    def _success(self, host: _Host, served: bool = False) -> None:
        with host.lock:
            host.failures = 0
            host.served = host.served or served

    def _failure(self, host_name: str, problem: str, cause: str) -> None:
        host = self.hosts[host_name]
        with host.lock:
            host.failures += 1
            host.last_status = problem
            tripped = host.failures >= self.options.breaker_failures
        if tripped:
            why = f"keeps failing ({host.failures} failed attempts in a row)"
            self._trip(host_name, problem, why, cause)

    def _trip(self, host_name: str, status: str, why: str, cause: str) -> None:
        with self._trip_lock:
            if self.tripped is None:
                example = f", e.g. {self.first_failed}" if cause.isdigit() else ""
                self.tripped = HostFailingError(
                    self._redact(
                        f"download: tile server {host_name} {why} (last: {status}{example});"
                        f" stopped: {advice(cause, self.source)}."
                        " Tiles stored so far are kept"
                    ),
                    host=host_name,
                    status=self._redact(status),
                )
            self.stop.set()

    def _redact(self, text: str) -> str:
        return redact(text, self.key)


def advice(cause: str, source: TileSource) -> str:
    """What an operator should look at when tiles fail for ``cause`` (an HTTP status,
    ``"5xx"``, ``"timeout"``, ``"network"``, ``"body"``, ``"redirect"`` or ``"wait"``)."""
    if cause == "404":
        return (
            "the URL template probably does not match the server: check --tiles-url against"
            " a tile the server has (its extension, .png or .jpg, and the order of {z}/{x}/{y})"
        )
    if cause in ("401", "403"):
        sent = source.key_header or source.key_param
        if sent:
            return f"the tile key is missing or wrong: check {TILES_API_KEY} (sent as {sent})"
        return (
            f"the server wants a key: set {TILES_API_KEY} and say how it is sent with"
            " --tiles-key-header or --tiles-key-param"
        )
    if cause == "5xx":
        return "the tile server is failing: try again later"
    if cause == "wait":
        return "the tile server asks to wait: try again later"
    if cause in ("timeout", "network"):
        return "the tile server does not answer in time: check the network and --tiles-url"
    if cause == "body":
        return "the server answers with something that is not a map tile: check --tiles-url"
    if cause == "redirect":
        return "the server redirects the requests elsewhere: check --tiles-url"
    return f"the server refuses these requests (HTTP {cause}): check --tiles-url"


def _mostly_failed(
    source: TileSource, failed: int, total: int, causes: dict[str, int], example: str
) -> HostFailingError:
    """The error of a job that ended with more than ``failing_share`` of it failed."""
    top = max(causes, key=lambda c: causes[c]) if causes else "network"
    named = {"5xx": "HTTP 5xx"} | {c: f"HTTP {c}" for c in causes if c.isdigit()}
    counts = ", ".join(f"{named.get(c, c)}: {n}" for c, n in sorted(causes.items()))
    where = f", e.g. {example}" if top.isdigit() and example else ""
    host = urlsplit(source.url_template).netloc
    return HostFailingError(
        f"download: {failed:,} of the area's {total:,} tiles failed from {host} ({counts}{where});"
        f" {advice(top, source)}. Tiles stored so far are kept",
        host=host,
        status=named.get(top, top),
    )


class _CrossOriginRedirect(Exception):
    """A redirect to an origin the tile template does not name: not followed."""


class _SameOrigin:
    """A request hook: refuses, before it is sent, a request to another origin."""

    def __init__(self, origins: set[str]) -> None:
        self.origins = origins

    def __call__(self, request: httpx.Request) -> None:
        there = origin(str(request.url))
        if there not in self.origins:
            raise _CrossOriginRedirect(there)


def _validators(response: httpx.Response, old: StoredTile | None) -> tuple[str | None, str | None]:
    """The tile's ETag and Last-Modified: the answer's, else what was known before."""
    etag = response.headers.get("etag") or (old.etag if old else None)
    modified = response.headers.get("last-modified") or (old.last_modified if old else None)
    return etag, modified


_NOT_IMAGES = ("text/html", "text/plain", "application/json", "application/xml", "text/xml")


def _not_an_image_type(content_type: str) -> str:
    """Why a body labelled ``content_type`` is no tile, or "" if it may be one."""
    kind = content_type.split(";")[0].strip().lower()
    return f"HTTP 200 with a {kind} body, not an image" if kind in _NOT_IMAGES else ""


def _not_decodable(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        pass
    else:
        if not tile_sized(width, height):
            return f"HTTP 200 with a {width}x{height} px image, not a map tile"
    return f"HTTP 200 with a body that is not a decodable image ({len(data)} bytes)"


def _check_here(data: bytes) -> tuple[str | None, str]:
    """What a :class:`BodyChecker` answers, worked out in this process."""
    return image_format(data), hashlib.sha256(data).hexdigest()
