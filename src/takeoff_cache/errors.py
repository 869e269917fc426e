"""Every error the library raises, one class per cause, each tied to one exit code.

Errors also inherit the built-in a caller would naturally catch, so code that
knows nothing of takeoff-cache still handles them sensibly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class TakeoffCacheError(Exception):
    """Base of all takeoff-cache errors."""

    exit_code = 1


class InvalidRequestError(TakeoffCacheError, ValueError):
    """The build request, a backbones file or a command-line value is invalid."""

    exit_code = 2


class Problems:
    """Problems gathered so that one error names them all, one line each.

    A single problem is raised as it is, with its own exit code; several are one
    :class:`InvalidRequestError` (exit 2) whose message has a line per problem.
    """

    def __init__(self) -> None:
        self.found: list[TakeoffCacheError] = []

    def add(self, problem: TakeoffCacheError) -> None:
        self.found.append(problem)

    @contextlib.contextmanager
    def check(self) -> Iterator[None]:
        """Within: a takeoff-cache error is kept, and the caller goes on."""
        try:
            yield
        except TakeoffCacheError as exc:
            self.found.append(exc)

    def raise_any(self) -> None:
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            lines: list[str] = []
            for problem in self.found:
                lines += [line for line in str(problem).splitlines() if line not in lines]
            raise InvalidRequestError("\n".join(lines))


class ImageError(InvalidRequestError):
    """An image given to ``locate`` cannot be read as a JPEG, PNG or WebP picture."""


class CorpusError(InvalidRequestError):
    """The tile corpus is missing or cannot be read as MBTiles or an XYZ folder."""


class BackboneError(InvalidRequestError):
    """A backbones file entry or its ONNX model is invalid."""


class LockHeldError(TakeoffCacheError, BlockingIOError):
    """Another build holds the cache's lock."""

    exit_code = 4


class CoverageError(TakeoffCacheError):
    """Files in the cache root are not listed in the new manifest."""

    exit_code = 5

    def __init__(self, message: str, paths: list[str]) -> None:
        super().__init__(message)
        self.paths = paths


class SigningKeyError(TakeoffCacheError, ValueError):
    """A signing key or trust store is unusable: missing, unsafe, untrusted, wrong passphrase."""

    exit_code = 6


class SigningError(TakeoffCacheError):
    """Signing the manifest failed."""

    exit_code = 6


class VerificationError(TakeoffCacheError):
    """A manifest or cache failed verification; ``problems`` lists every finding."""

    exit_code = 7

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


class EngineError(TakeoffCacheError, RuntimeError):
    """An engine could not be compiled or loaded."""

    exit_code = 8


class DescriptorError(TakeoffCacheError, RuntimeError):
    """Descriptors could not be computed or the index could not be written."""

    exit_code = 8


class MissingDescriptorsError(DescriptorError):
    """Tiles the store claimed but holds no valid vector for (damaged rows)."""

    def __init__(self, message: str, shas: list[str]) -> None:
        super().__init__(message)
        self.shas = shas


class CacheIOError(TakeoffCacheError, OSError):
    """Reading or writing the cache failed at the operating-system level (disk full, I/O error)."""

    exit_code = 1


class BadTilesError(DescriptorError):
    """Some selected tiles cannot be decoded; the build ends ``failure`` listing them."""

    exit_code = 3

    def __init__(self, tiles: list[str], generated: int = 0, reused: int = 0) -> None:
        shown = ", ".join(tiles[:20])
        more = f" and {len(tiles) - 20} more" if len(tiles) > 20 else ""
        super().__init__(
            f"{len(tiles)} tile(s) cannot be decoded: {shown}{more};"
            " re-download them or remove them from the corpus"
        )
        self.tiles = tiles
        # The good tiles' descriptors are stored all the same; the report says so,
        # and the rebuild once the bad tiles are fixed reuses them.
        self.generated = generated
        self.reused = reused

    def __reduce__(self) -> tuple[type[BadTilesError], tuple[list[str], int, int]]:
        # Prefect may keep a failed task's exception pickled: keep the counts too.
        return type(self), (self.tiles, self.generated, self.reused)


# prepare's phases before the build have exit codes of their own, so a script can
# tell "the flight is wrong" from "the tile server is down" without reading stderr.
EXIT_RESOLVE = 9
EXIT_DOWNLOAD = 10


class FlightError(TakeoffCacheError):
    """The flight could not be resolved into positions (prepare's resolve phase)."""

    exit_code = EXIT_RESOLVE


class FlightFileError(FlightError, OSError):
    """A flight file is missing, unreadable or cannot be parsed."""


class NotAPlanError(FlightError, ValueError):
    """A file parses but is none of the flight formats prepare reads."""


class NoPositionError(FlightError, ValueError):
    """A flight names no usable global position."""


class FlightNotFoundError(FlightError, LookupError):
    """The flights API knows no flight with this id (HTTP 404)."""


class FlightsAuthError(FlightError, PermissionError):
    """The flights API refused the token (HTTP 401 or 403)."""


class FlightsUnreachableError(FlightError, ConnectionError):
    """The flights API could not be reached, timed out or answered with a server error."""


class MalformedFlightError(FlightError, ValueError):
    """A flight (file or API answer) has the right shape's name but not its content."""


class AntimeridianError(FlightError, ValueError):
    """The flight or its area crosses the antimeridian, which tile ranges cannot express."""


class DownloadError(TakeoffCacheError, RuntimeError):
    """Downloading tiles into the corpus failed (prepare's download phase)."""

    exit_code = EXIT_DOWNLOAD


class HostFailingError(DownloadError, ConnectionError):
    """A tile server keeps failing; the download stopped rather than hammer it."""

    def __init__(self, message: str, host: str, status: str) -> None:
        super().__init__(message)
        self.host = host
        self.status = status

    def __reduce__(self) -> tuple[type[HostFailingError], tuple[str, str, str]]:
        return type(self), (str(self), self.host, self.status)


class TooManyTilesError(DownloadError, ValueError):
    """A download job is larger than the operator's ``max_tiles`` guard."""


# The companion computer (SSH bring-up, transfer, its remote commands) has one code, so
# a script can tell "the Jetson is off or refuses us" from a build that ran and failed.
EXIT_COMPANION = 11


class CompanionError(TakeoffCacheError):
    """The companion computer could not be brought up, reached or used."""

    exit_code = EXIT_COMPANION


class CompanionTargetError(CompanionError, ValueError):
    """A companion target is not ``user@host[:port]``."""


class CompanionUnreachableError(CompanionError, ConnectionError):
    """The companion does not answer: no route, refused, or its name does not resolve."""


class CompanionTimeoutError(CompanionError, TimeoutError):
    """Connecting to the companion, or a command there, took longer than allowed."""


class HostKeyError(CompanionError):
    """The companion's host key is unknown or differs from the one recorded in known_hosts."""

    def __init__(self, message: str, fingerprint: str) -> None:
        super().__init__(message)
        self.fingerprint = fingerprint

    def __reduce__(self) -> tuple[type[HostKeyError], tuple[str, str]]:
        return type(self), (str(self), self.fingerprint)


class CompanionAuthError(CompanionError, PermissionError):
    """The companion refused every key offered (file or agent)."""


class CompanionToolError(CompanionError):
    """takeoff-cache is missing on the companion, or writes another manifest format."""


class CompanionDiskError(CompanionError, OSError):
    """The companion has too little free disk for the inputs and the build."""


class CompanionPathError(CompanionError, FileNotFoundError):
    """A path the build needs on the companion (its cache root) does not exist there."""


class TransferError(CompanionError, OSError):
    """Sending a file to the companion failed or arrived with another SHA-256."""


class RemoteOutputError(CompanionError, ValueError):
    """A remote command's output is not the JSON it must end with (malformed or truncated)."""


class CompanionManifestError(CompanionError):
    """The companion's Manifest.json is missing, too large, not signed by a key the
    workstation trusts, or of another build than the one sent."""


class RemoteCommandError(CompanionError):
    """A remote build or verify failed; ``exit_code`` is the remote one where it is ours."""

    def __init__(
        self, message: str, exit_code: int, report: dict[str, object] | None = None
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.report = report

    def __reduce__(
        self,
    ) -> tuple[type[RemoteCommandError], tuple[str, int, dict[str, object] | None]]:
        return type(self), (str(self), self.exit_code, self.report)


EXIT_NOT_READY = 12


class NotReadyError(TakeoffCacheError):
    """The readiness verdict (SPEC §11) says the cache is not fit for the flight: holes
    under the route, area coverage below ``--min-coverage``, or route Recall@1 below
    ``--min-recall``. ``reasons`` holds one line each; the previous cache stays in force."""

    exit_code = EXIT_NOT_READY

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("not ready: " + "; ".join(reasons))
        self.reasons = reasons

    def __reduce__(self) -> tuple[type[NotReadyError], tuple[list[str]]]:
        return type(self), (self.reasons,)
