"""What the companion prints is redacted as a person or a JSON parser would read it."""

from __future__ import annotations

import json

from takeoff_cache.companion.answers import Redactor

SECRET = "pass-Phrase-77"


def escaped(text: str) -> str:
    """``text`` with every character a JSON ``\\uXXXX`` escape."""
    return "".join(f"\\u{ord(c):04x}" for c in text)


def test_a_plain_secret_is_replaced_and_the_rest_kept() -> None:
    redact = Redactor([SECRET])
    assert redact(f"key {SECRET} used\nnext line") == "key *** used\nnext line"


def test_a_secret_in_json_escapes_is_caught() -> None:
    redact = Redactor([SECRET])
    line = '{"detail": "' + escaped(SECRET) + '"}'
    assert SECRET in json.loads(line)["detail"]  # a parser reads the secret...
    out = redact(f"before\n{line}\nafter")
    assert out == "before\n***\nafter"  # ...so the line goes
    half = SECRET[:4] + escaped(SECRET[4:])
    assert redact(f"x {half} y") == "***"
    assert redact('{"a": "' + SECRET[:3] + "\\/" + '"}') == '{"a": "' + SECRET[:3] + "\\/" + '"}'


def test_a_secret_split_by_carriage_returns_is_caught() -> None:
    redact = Redactor([SECRET])
    assert redact(f"progress {SECRET[:5]}\r{SECRET[5:]} done\nok") == "***\nok"
    assert redact(f"{SECRET[:5]}\\r{SECRET[5:]}") == "***"  # the escape of \r, too


def test_text_without_a_secret_is_unchanged() -> None:
    text = 'a\r\nb \\u0041 "quoted" \\n end'
    assert Redactor([SECRET])(text) == text
    assert Redactor([])(text) == text
