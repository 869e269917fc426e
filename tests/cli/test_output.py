"""What the command line says: help for every option, usage errors that name their
command once, and ``verify --json`` on failure."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from takeoff_cache.cli.main import build_parser
from tests.support.cli import run_cli
from tests.support.factories import make_cache, new_signer


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_of_every_command_has_help_text() -> None:
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, parser in _commands().items()
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert missing == []
    for parser in _commands().values():
        assert parser.format_help()  # and every help text renders


@pytest.mark.parametrize("command", sorted(_commands()))
def test_a_usage_error_names_its_command_once(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    result = run_cli(capsys, command, "--no-such-flag")
    assert result.code == 2, result.err
    (line,) = result.err_lines
    assert line.endswith(f"(see takeoff-cache {command} --help)"), line
    assert line.count("takeoff-cache") == 2, line  # the prefix and the help pointer


@pytest.mark.parametrize("command", ["build", "demo", "inspect"])
def test_an_unknown_flag_is_reported_with_its_command(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    argv = [str(tmp_path)] if command == "inspect" else []
    result = run_cli(capsys, command, *argv, "--no-such-flag")
    assert result.code == 2, result.err
    (line,) = result.err_lines
    assert "unrecognized arguments: --no-such-flag" in line
    assert line.endswith(f"(see takeoff-cache {command} --help)"), line


def test_a_usage_error_without_a_command_points_at_the_top_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in ([], ["no-such-command"]):
        result = run_cli(capsys, *argv)
        assert result.code == 2, result.err
        (line,) = result.err_lines
        assert line.endswith("(see takeoff-cache --help)"), line


def test_verify_json_prints_the_problems_on_failure(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    signer = new_signer()
    root = tmp_path / "cache"
    make_cache(root, signer, {"a.bin": b"a" * 10, "b.bin": b"b" * 10})
    trust = tmp_path / "trust.pub"
    trust.write_bytes(
        signer.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    ok = run_cli(capsys, "verify", str(root), "--trust", str(trust), "--json")
    assert ok.code == 0 and ok.json()["ok"] is True

    (root / "a.bin").write_bytes(b"x" * 10)
    (root / "b.bin").unlink()
    result = run_cli(capsys, "verify", str(root), "--trust", str(trust), "--json")
    assert result.code == 7
    doc = result.json()
    assert doc["ok"] is False and doc["exit_code"] == 7
    assert len(doc["problems"]) == 2
    assert any("a.bin" in p for p in doc["problems"]) and any("b.bin" in p for p in doc["problems"])
    assert result.err_lines == [f"takeoff-cache: verify: {p}" for p in doc["problems"]]


def test_verify_json_prints_a_bad_trust_store_as_a_problem(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    result = run_cli(capsys, "verify", str(tmp_path), "--trust", str(tmp_path / "no"), "--json")
    assert result.code == 6
    doc = result.json()
    assert doc["ok"] is False and len(doc["problems"]) == 1 and "trust" in doc["problems"][0]
    assert len(result.err_lines) == 1
