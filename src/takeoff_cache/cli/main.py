"""The ``takeoff-cache`` command line (SPEC §9).

Every failure prints one line per problem on stderr and exits with the code
of its error class; a traceback is never shown to an operator. Each command is
a module of this package that adds its parser and calls the library.
"""

from __future__ import annotations

import argparse
import sys

from takeoff_cache.cli import (
    build,
    companion_probe,
    demo,
    engines,
    inspect,
    keys,
    locate,
    prepare,
    stops,
    verify,
)
from takeoff_cache.cli.args import Parser
from takeoff_cache.errors import TakeoffCacheError, VerificationError

# In the order --help lists them.
COMMANDS = (build, prepare, verify, engines, keys, inspect, locate, demo, companion_probe)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="takeoff-cache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` and return its exit status. None: this process's
    own command line, and the process then ends within a bound (``stops.finish``)."""
    code = _run(argv)
    if argv is None:
        stops.finish(code)
    return code


def _run(argv: list[str] | None) -> int:
    try:
        with stops.handled():  # SIGINT, SIGTERM: one line, 130 or 143, within seconds
            args = build_parser().parse_args(argv)
            code: int = args.func(args)
        return code
    except VerificationError as exc:
        for problem in exc.problems:
            print(f"takeoff-cache: verify: {problem}", file=sys.stderr)
        return exc.exit_code
    except TakeoffCacheError as exc:
        for line in str(exc).splitlines() or [""]:  # several problems: a line each
            print(f"takeoff-cache: error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        return stops.line(exc)
    except Exception as exc:
        print(f"takeoff-cache: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
