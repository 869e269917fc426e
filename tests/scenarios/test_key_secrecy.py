"""An encrypted signing key works with its passphrase from the environment, and neither
the key nor the passphrase shows up in any output, log, manifest or report."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from takeoff_cache.core.env import KEY_PASSPHRASE as PASSPHRASE_ENV
from takeoff_cache.trust.keys import key_id, write_keypair
from tests.conftest import Demo
from tests.support.cli import CliResult, run_cli
from tests.support.procs import assert_clean, copy_sandbox

pytestmark = pytest.mark.usefixtures("prefect_harness")

PASSPHRASE = "correct horse battery staple 7f3a"


@pytest.fixture
def secret(demo_source: Path, tmp_path: Path) -> tuple[Path, Ed25519PrivateKey]:
    """Demo inputs whose signing key is a fresh encrypted key, trusted by the trust store."""
    root = copy_sandbox(demo_source, tmp_path / "demo")
    private = Ed25519PrivateKey.generate()
    pub = write_keypair(private, root / "secret.key", PASSPHRASE.encode())
    (root / "trust" / "secret.pub").write_bytes(pub.read_bytes())
    return root, private


def secrets_of(key_file: Path, private: Ed25519PrivateKey) -> dict[str, str]:
    """Every form in which the key or the passphrase could leak."""
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem_lines = [
        line for line in key_file.read_text().splitlines() if line and not line.startswith("-----")
    ]
    forms = {
        "passphrase": PASSPHRASE,
        "PEM marker": "PRIVATE KEY",
        "raw key (hex)": raw.hex(),
        "raw key (base64)": base64.b64encode(raw).decode(),
        "PKCS8 DER (base64)": base64.b64encode(der).decode(),
        "raw key (repr)": repr(raw)[2:-1],
    }
    forms.update({f"encrypted PEM line {i}": line for i, line in enumerate(pem_lines)})
    return forms


def build(capsys: pytest.CaptureFixture[str], root: Path, *extra: str) -> CliResult:
    return run_cli(
        capsys,
        "build",
        "--request",
        str(root / "request.toml"),
        "--work-dir",
        str(root / "work"),
        "--key",
        str(root / "secret.key"),
        "--json",
        *extra,
    )


def assert_no_secret(text: str, secrets: dict[str, str], where: str) -> None:
    for name, value in secrets.items():
        assert value not in text, f"{name} appears in {where}"


def test_an_encrypted_key_signs_with_the_passphrase_and_never_leaks(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    secret: tuple[Path, Ed25519PrivateKey],
) -> None:
    root, private = secret
    secrets = secrets_of(root / "secret.key", private)
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE)
    caplog.set_level(logging.DEBUG)

    result = build(capsys, root)
    assert result.code == 0, result.err
    assert result.json()["outcome"] == "success"
    check = run_cli(capsys, "verify", str(root / "cache"), "--trust", str(root / "trust"), "--json")
    assert check.code == 0, check.err
    manifest = assert_clean(root)
    assert manifest.keyid == key_id(private.public_key())

    assert_no_secret(result.out + result.err, secrets, "the build's output and report")
    assert_no_secret(check.out + check.err, secrets, "verify's output")
    assert_no_secret(caplog.text, secrets, "the log records")
    for path in sorted((root / "cache").rglob("*")):
        if path.is_file():
            text = path.read_bytes().decode("latin-1")
            assert_no_secret(text, secrets, str(path.relative_to(root)))


def test_a_wrong_passphrase_is_refused_with_exit_6_and_never_leaks(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    secret: tuple[Path, Ed25519PrivateKey],
) -> None:
    root, private = secret
    wrong = "wrong horse 91c2"
    monkeypatch.setenv(PASSPHRASE_ENV, wrong)
    caplog.set_level(logging.DEBUG)
    result = build(capsys, root)
    assert result.code == 6, result.err
    assert len(result.err_lines) == 1 and "cannot decrypt" in result.err_lines[0], result.err
    secrets = {**secrets_of(root / "secret.key", private), "wrong passphrase": wrong}
    assert_no_secret(result.out + result.err + caplog.text, secrets, "the refusal")
    assert not (root / "cache" / "Manifest.json").exists()


def test_an_encrypted_key_without_its_passphrase_is_refused_with_exit_6(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    secret: tuple[Path, Ed25519PrivateKey],
) -> None:
    root, private = secret
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    result = build(capsys, root)
    assert result.code == 6
    assert len(result.err_lines) == 1 and PASSPHRASE_ENV in result.err_lines[0], result.err
    assert_no_secret(result.out + result.err, secrets_of(root / "secret.key", private), "stderr")


@pytest.mark.parametrize(
    ("url", "extra"),
    [
        ("https://pilot:url-pass-9Xq@tiles.example/{z}/{x}/{y}.png", ()),
        (
            "https://tiles.example/{z}/{x}/{y}.png?apikey=url-pass-9Xq",
            ("--tiles-key-param", "apikey"),
        ),
    ],
)
def test_credentials_in_the_tiles_url_are_refused_and_never_shown(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    demo: Demo,
    url: str,
    extra: tuple[str, ...],
) -> None:
    plan = Path(__file__).parents[1] / "data" / "flights" / "survey_corridor.plan"
    result = run_cli(
        capsys,
        "prepare",
        "--request",
        str(demo.request),
        "--work-dir",
        str(demo.work),
        "--plan",
        str(plan),
        "--tiles-url",
        url,
        *extra,
        "--json",
    )
    assert result.code == 2, result.err
    assert len(result.err_lines) == 1 and "TAKEOFF_CACHE_TILES_API_KEY" in result.err
    assert result.json()["phase"] == "resolve"
    for where, text in (("stdout", result.out), ("stderr", result.err), ("logs", caplog.text)):
        assert "url-pass-9Xq" not in text, where
    assert not demo.work.exists()
