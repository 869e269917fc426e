"""Signing keys and trust stores: file modes, passphrases, trust checks, no key material leaked."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from takeoff_cache.core.env import KEY_PASSPHRASE as PASSPHRASE_ENV
from takeoff_cache.errors import SigningKeyError
from takeoff_cache.trust.keys import (
    Signer,
    check_trusted,
    generate_keypair,
    key_id,
    load_signer,
    load_trust_store,
)

PASSPHRASE = "correct horse battery staple"


@pytest.fixture(autouse=True)
def no_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


def pem_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def assert_no_secret(message: str, key_path: Path, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in message
    for line in pem_lines(key_path):
        assert line not in message
    assert "-----" not in message


def test_generate_keypair_writes_a_0600_key_and_a_public_key(tmp_path: Path) -> None:
    key = tmp_path / "operator.key"
    pub = generate_keypair(key)
    assert pub == tmp_path / "operator.key.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert pem_lines(key)[0] == "-----BEGIN PRIVATE KEY-----"
    assert pem_lines(pub)[0] == "-----BEGIN PUBLIC KEY-----"
    signer = load_signer(key)
    (trusted,) = load_trust_store(pub)
    assert trusted.keyid == signer.keyid == key_id(signer.public_key())
    assert trusted.verifies(signer.sign(b"data"), b"data")
    assert not trusted.verifies(signer.sign(b"data"), b"other")


def test_generate_keypair_ignores_a_permissive_umask_for_the_private_key(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        key = tmp_path / "operator.key"
        generate_keypair(key)
    finally:
        os.umask(old)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_generate_keypair_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    key = tmp_path / "operator.key"
    generate_keypair(key)
    before = key.read_bytes()
    with pytest.raises(SigningKeyError, match="already exists"):
        generate_keypair(key)
    assert key.read_bytes() == before


def test_generate_keypair_refuses_when_only_the_public_key_exists(tmp_path: Path) -> None:
    key = tmp_path / "operator.key"
    (tmp_path / "operator.key.pub").write_text("old")
    with pytest.raises(SigningKeyError, match="already exists"):
        generate_keypair(key)
    assert not key.exists()


def test_generate_keypair_refuses_a_dangling_symlink_at_the_key_path(tmp_path: Path) -> None:
    key = tmp_path / "operator.key"
    key.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SigningKeyError):
        generate_keypair(key)
    assert not (tmp_path / "elsewhere").exists()


def test_encrypted_key_loads_only_with_the_passphrase_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "operator.key"
    pub = generate_keypair(key, passphrase=PASSPHRASE.encode())
    assert pem_lines(key)[0] == "-----BEGIN ENCRYPTED PRIVATE KEY-----"
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE)
    signer = load_signer(key)
    assert signer.keyid == load_trust_store(pub)[0].keyid


def test_encrypted_key_without_passphrase_is_refused_without_leaking(tmp_path: Path) -> None:
    key = tmp_path / "operator.key"
    generate_keypair(key, passphrase=PASSPHRASE.encode())
    with pytest.raises(SigningKeyError) as info:
        load_signer(key)
    assert PASSPHRASE_ENV in str(info.value)
    assert_no_secret(str(info.value), key, PASSPHRASE)
    assert_no_secret(repr(info.value), key, PASSPHRASE)


def test_encrypted_key_with_wrong_passphrase_is_refused_without_leaking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "operator.key"
    generate_keypair(key, passphrase=PASSPHRASE.encode())
    wrong = "tr0ub4dor&3"
    monkeypatch.setenv(PASSPHRASE_ENV, wrong)
    with pytest.raises(SigningKeyError) as info:
        load_signer(key)
    assert_no_secret(str(info.value), key, PASSPHRASE, wrong)
    assert_no_secret(repr(info.value), key, PASSPHRASE, wrong)
    assert info.value.__cause__ is None


def test_plain_key_with_a_passphrase_set_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "operator.key"
    generate_keypair(key)
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE)
    with pytest.raises(SigningKeyError) as info:
        load_signer(key)
    assert_no_secret(str(info.value), key, PASSPHRASE)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o700 | 0o007])
def test_a_key_readable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "operator.key"
    generate_keypair(key)
    key.chmod(mode)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        load_signer(key)


def test_a_0400_key_is_accepted(tmp_path: Path) -> None:
    key = tmp_path / "operator.key"
    generate_keypair(key)
    key.chmod(0o400)
    assert isinstance(load_signer(key), Signer)


def test_a_missing_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="does not exist"):
        load_signer(tmp_path / "nope.key")


def test_a_folder_as_key_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "keydir"
    folder.mkdir(mode=0o700)
    with pytest.raises(SigningKeyError, match="is a folder, not a file"):
        load_signer(folder)


def test_a_file_that_is_not_a_pem_key_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "operator.key"
    key.write_text("not a key\n")
    key.chmod(0o600)
    with pytest.raises(SigningKeyError, match="not a PEM private key"):
        load_signer(key)


def test_a_public_key_given_as_private_key_is_refused(tmp_path: Path) -> None:
    pub = generate_keypair(tmp_path / "operator.key")
    pub.chmod(0o600)
    with pytest.raises(SigningKeyError):
        load_signer(pub)


def test_trust_store_from_a_single_file(tmp_path: Path) -> None:
    pub = generate_keypair(tmp_path / "a.key")
    (trusted,) = load_trust_store(pub)
    assert trusted.source == str(pub)


def test_trust_store_from_a_folder_reads_pem_and_pub_files(tmp_path: Path) -> None:
    store = tmp_path / "trust"
    store.mkdir()
    generate_keypair(tmp_path / "a.key")
    generate_keypair(tmp_path / "b.key")
    a, b = load_signer(tmp_path / "a.key"), load_signer(tmp_path / "b.key")
    (store / "a.pub").write_bytes((tmp_path / "a.key.pub").read_bytes())
    (store / "b.pem").write_bytes((tmp_path / "b.key.pub").read_bytes())
    (store / "a-again.pem").write_bytes((tmp_path / "a.key.pub").read_bytes())  # duplicate
    (store / "README.txt").write_text("ignored")
    (store / "sub").mkdir()
    keys = load_trust_store(store)
    assert sorted(k.keyid for k in keys) == sorted([a.keyid, b.keyid])


def test_an_empty_trust_folder_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "trust"
    store.mkdir()
    (store / "notes.txt").write_text("x")
    with pytest.raises(SigningKeyError, match=r"no \.pem or \.pub"):
        load_trust_store(store)


def test_a_missing_trust_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="does not exist"):
        load_trust_store(tmp_path / "trust")


def test_a_trust_file_that_is_not_a_public_key_is_refused(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "a.key")
    with pytest.raises(SigningKeyError, match="not a PEM public key"):
        load_trust_store(tmp_path / "a.key")


def test_check_trusted_refuses_a_key_not_in_the_store(tmp_path: Path) -> None:
    pub_a = generate_keypair(tmp_path / "a.key")
    generate_keypair(tmp_path / "b.key")
    b = load_signer(tmp_path / "b.key")
    trusted = load_trust_store(pub_a)
    with pytest.raises(SigningKeyError, match="not in the trust store"):
        check_trusted(b, trusted, tmp_path / "b.key", pub_a)
    check_trusted(load_signer(tmp_path / "a.key"), trusted, tmp_path / "a.key", pub_a)


def test_signer_repr_contains_no_key_material(tmp_path: Path) -> None:
    key = tmp_path / "operator.key"
    generate_keypair(key)
    signer = load_signer(key)
    raw = serialization.load_pem_private_key(key.read_bytes(), password=None).private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    for text in (repr(signer), str(signer), f"{signer!r:>200}"):
        assert raw.hex() not in text
        assert raw.hex()[:16] not in text
        assert base64.b64encode(raw).decode()[:16] not in text
        for line in pem_lines(key)[1:-1]:
            assert line not in text
        assert signer.keyid[:16] in text
