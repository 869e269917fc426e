"""Reading what the companion answers: one JSON line, checked before it is believed.

Whatever the companion prints is another machine's word: its last line is
parsed within a size and a nesting depth, each field read here is checked for
its type (fields a newer companion adds pass unread), and text shown to the
operator has its terminal controls made visible. Every way an answer can be
malformed is a :class:`RemoteOutputError` (exit 11) with one line.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from takeoff_cache.core.env import SECRETS
from takeoff_cache.errors import RemoteOutputError

# A report or bring-up answer is a few KB; past this its line is not read.
ANSWER_LIMIT = 4 * 2**20
# Deeper than any answer nests (a build report: four levels).
DEPTH_LIMIT = 64

_CONTROLS = {c: f"^{chr(c + 64)}" for c in range(32) if c != 9} | {127: "^?"}
_CONTROLS.update({c: f"\\x{c:02x}" for c in range(0x80, 0xA0)})
# The same for a whole output, whose line ends are kept to be split on.
_TEXT_CONTROLS = {c: v for c, v in _CONTROLS.items() if c not in (10, 13)}


def neutralize(text: str, *, lines: bool = False) -> str:
    """``text`` with its terminal controls (ESC, CSI, other C0 but tab) made visible;
    ``lines``: keep its line ends."""
    return text.translate(_TEXT_CONTROLS if lines else _CONTROLS)


def neutralize_doc(value: Any) -> Any:
    """A parsed answer with every string in it neutralized."""
    if isinstance(value, str):
        return neutralize(value)
    if isinstance(value, dict):
        return {neutralize(str(k)): neutralize_doc(v) for k, v in value.items()}
    if isinstance(value, list):
        return [neutralize_doc(v) for v in value]
    return value


def shown(value: Any, width: int = 80) -> str:
    """A value from an answer, for a one-line message."""
    return neutralize(repr(value))[:width]


def last_json_line(text: str) -> tuple[dict[str, Any] | None, str]:
    """The JSON object on the last non-blank line of ``text``, or None and why not."""
    end = len(text.rstrip())
    if end == 0:
        return None, "nothing"
    start = text.rfind("\n", 0, end) + 1
    line = text[start:end]
    if len(line) > ANSWER_LIMIT:
        return None, f"a last line of {len(line)} characters (at most {ANSWER_LIMIT})"
    depth = _depth(line)
    if depth > DEPTH_LIMIT:
        return None, f"JSON nested {depth} deep (at most {DEPTH_LIMIT})"
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):  # ValueError: also a 5000-digit integer
        return None, "a last line that is not JSON"
    if not isinstance(doc, dict):
        return None, f"JSON {type(doc).__name__}, not an object"
    return doc, ""


def _depth(line: str) -> int:
    """How deep brackets nest in ``line`` (strings counted too: an upper bound)."""
    deepest = level = 0
    for char in line:
        if char in "[{":
            level += 1
            deepest = max(deepest, level)
        elif char in "]}":
            level -= 1
    return deepest


def check_fields(
    what: str,
    doc: Mapping[str, Any],
    types: Mapping[str, tuple[type, ...]],
    target: str,
    *,
    required: tuple[str, ...] = (),
) -> None:
    """Raise :class:`RemoteOutputError` for the first field of ``types`` in ``doc`` of
    another type (a bool is never taken for a number), or the first ``required`` one
    missing; other fields are not looked at."""
    for name in required:
        if name not in doc:
            raise RemoteOutputError(f"companion: {target}: {what} has no {name!r}")
    for name, allowed in types.items():
        if name not in doc:
            continue
        value = doc[name]
        bad_bool = isinstance(value, bool) and bool not in allowed
        if bad_bool or not isinstance(value, allowed):
            raise RemoteOutputError(
                f"companion: {target}: {what}'s {neutralize(name)!r} is"
                f" {type(value).__name__} {shown(value)}, not"
                f" {' or '.join(t.__name__ for t in allowed)}"
            )


class Redactor:
    """Replaces every known secret value in a text with ``***``.

    A line that shows a secret only once read (its JSON escapes decoded, its
    ``\\r`` dropped) becomes ``***`` as a whole.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Redactor:
        env = os.environ if env is None else env
        return cls(env.get(name, "") for name in SECRETS)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        if not self._secrets:
            return text
        return "\n".join(self._line(line) for line in text.split("\n"))

    def _line(self, line: str) -> str:
        read = _JSON_ESCAPE.sub(_unescape, line).replace("\r", "")
        return "***" if any(s in read for s in self._secrets) else line


# A JSON string escape: ``\uXXXX`` or one of the single-character ones.
_JSON_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|[\"\\/bfnrt])")
_SIMPLE_ESCAPES = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    return chr(int(code[1:], 16)) if code[0] == "u" else _SIMPLE_ESCAPES[code]
