"""``takeoff-cache keygen``: a new signing key pair."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("keygen", help="write a new Ed25519 key pair")
    p.add_argument(
        "keyfile", type=Path, help="private key to write (mode 0600); KEYFILE.pub beside it"
    )
    p.set_defaults(func=cmd_keygen)


def cmd_keygen(args: argparse.Namespace) -> int:
    from takeoff_cache.core.env import KEY_PASSPHRASE
    from takeoff_cache.trust.keys import generate_keypair

    passphrase = os.environ.get(KEY_PASSPHRASE)
    pub = generate_keypair(args.keyfile, passphrase.encode() if passphrase else None)
    print(f"wrote {args.keyfile} (mode 0600{', encrypted' if passphrase else ''}) and {pub}")
    return 0
