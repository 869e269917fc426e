"""``takeoff-cache companion-probe``: what this install is, for a workstation's bring-up.

``prepare --companion`` runs it over SSH with the companion's tool (whatever
command line that is) before sending anything; it prints one JSON line
(:mod:`takeoff_cache.companion.probe`) and creates nothing.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from takeoff_cache.companion.probe import PROBE_PATHS, probe


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "companion-probe",
        help="print this install's version, backend and paths as JSON (for bring-up)",
        description="Print, as one JSON line, this install's version and manifest format,"
        " the backend it would build with and its host identity, and for each path given"
        " where it is here (~ expanded), whether it exists and the free disk under it."
        " prepare --companion runs it over SSH; it creates nothing.",
    )
    p.add_argument("--backend", default="auto", help="the backend to describe (default: auto)")
    for name in PROBE_PATHS:
        what = name.replace("_", " ")
        p.add_argument(
            f"--{name.replace('_', '-')}",
            metavar="PATH",
            help=f"the {what} to describe: where it is here, whether it exists, free disk",
        )
    p.set_defaults(func=cmd_companion_probe)


def cmd_companion_probe(args: argparse.Namespace) -> int:
    wanted = {name: path for name in PROBE_PATHS if (path := getattr(args, name)) is not None}
    print(json.dumps(probe(args.backend, wanted)))
    return 0
