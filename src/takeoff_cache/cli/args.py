"""What the commands share: a parser whose usage errors are invalid input, the
request's flags and how they make a request, and how text read from a file prints."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from takeoff_cache.errors import InvalidRequestError

# A value such as -33.9,18.4 (a southern or western coordinate list): argparse
# takes a word that starts with "-" for an option unless it looks like a negative
# number, and a list of numbers does not.
_NEGATIVE_NUMBERS = re.compile(r"^-\d*\.?\d+([eE][-+]?\d+)?(,\s*[-+]?\d*\.?\d+([eE][-+]?\d+)?)*$")


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse's own hook for what counts as a negative number, not an option.
        self._negative_number_matcher = _NEGATIVE_NUMBERS

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # Reported here, where the command is known, not by the top-level parser.
            command = getattr(parsed, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            raise InvalidRequestError(
                f"usage: unrecognized arguments: {' '.join(extras)} (see {prog} --help)"
            )
        return parsed

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own usage errors: one line and exit code 2, as for any invalid input.
        # prog is "takeoff-cache" or "takeoff-cache build": it names the command once.
        raise InvalidRequestError(f"usage: {message} (see {self.prog} --help)")


def request_args(p: argparse.ArgumentParser, with_options: bool = True) -> None:
    from takeoff_cache.build.options import OPTION_FIELDS
    from takeoff_cache.build.request import REQUEST_FIELDS

    p.add_argument("--request", type=Path, help="request TOML; flags override its fields")
    for field in REQUEST_FIELDS:
        p.add_argument(field.flag, dest=field.name, help=field.help)
    for field in OPTION_FIELDS:
        # Commands that only compile take the work folder and backend, nothing more.
        if field.switch and with_options:
            p.add_argument(
                field.flag,
                dest=field.name,
                nargs="?",
                const="yes",
                metavar="yes|no",
                help=field.help,
            )
        elif with_options or field.name in ("work_dir", "backend"):
            p.add_argument(field.flag, dest=field.name, help=field.help)
    if with_options:
        p.add_argument("--json", action="store_true", help="print the build report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's run logs")


def raw_request(args: argparse.Namespace) -> dict[str, Any]:
    return request_doc(args, ())[0]


def request_doc(
    args: argparse.Namespace, tables: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The request's fields (the file's, then the flags'), and the file's ``tables``."""
    from takeoff_cache.build.request import FIELDS, read_request_sections

    raw: dict[str, Any]
    raw, sections = read_request_sections(args.request, tables) if args.request else ({}, {})
    for name in FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            raw[name] = value
    return raw, sections


def options_from(args: argparse.Namespace) -> Any:
    """The build options of the flags (those a command lacks are None)."""
    from takeoff_cache.build.options import build_options, parse_duration

    return build_options(
        work_dir=args.work_dir,
        backend=args.backend,
        coverage=getattr(args, "coverage", None),
        expires_in_s=parse_duration(getattr(args, "expires_in_s", None)),
        dask_address=getattr(args, "dask_address", None),
        self_test=getattr(args, "self_test", None),
        min_recall=getattr(args, "min_recall", None),
        min_coverage=getattr(args, "min_coverage", None),
        allow_gaps=getattr(args, "allow_gaps", None),
        require_ready=getattr(args, "require_ready", None),
    )


def printable(text: str) -> str:
    """Text taken from a file, with control characters and lone surrogates escaped."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
