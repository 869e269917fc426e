"""Ed25519 signing keys and trust stores.

A private key is read once per build, kept in memory only, and never logged;
its file must not be readable by group or others. Encrypted keys take their
passphrase from an environment variable, never from a flag (flags show up in
process listings and shell history).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from takeoff_cache.core.env import KEY_PASSPHRASE
from takeoff_cache.core.fsutil import kind_problem
from takeoff_cache.errors import SigningKeyError


def key_id(public_key: Ed25519PublicKey) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo: a hint for finding the key, not a proof."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class TrustedKey:
    keyid: str
    public_key: Ed25519PublicKey
    source: str  # file it came from, for messages

    def verifies(self, signature: bytes, data: bytes) -> bool:
        try:
            self.public_key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


class Signer:
    """Holds the operator's private key in memory; ``repr`` shows only its key id."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.keyid = key_id(private_key.public_key())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def __repr__(self) -> str:
        return f"Signer(keyid={self.keyid[:16]}…)"


def generate_keypair(key_path: Path, passphrase: bytes | None = None) -> Path:
    """Write a new private key to ``key_path`` (mode 0600, never overwriting) and
    its public key to ``key_path.pub``; return the public key's path."""
    pub_path = key_path.with_name(key_path.name + ".pub")
    for path in (key_path, pub_path):
        if path.exists() or path.is_symlink():
            raise SigningKeyError(f"key: {path} already exists; refusing to overwrite it")
    private = Ed25519PrivateKey.generate()
    return write_keypair(private, key_path, passphrase)


def write_keypair(private: Ed25519PrivateKey, key_path: Path, passphrase: bytes | None) -> Path:
    pub_path = key_path.with_name(key_path.name + ".pub")
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    # O_EXCL: two keygens racing must not both believe they wrote the key.
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise SigningKeyError(f"key: {key_path} already exists; refusing to overwrite it") from exc
    except OSError as exc:
        raise SigningKeyError(f"key: cannot create {key_path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    pub_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pub_pem)
    return pub_path


def load_signer(key_path: Path, passphrase_env: str = KEY_PASSPHRASE) -> Signer:
    """Read and check the operator's private key; errors never include key material."""
    try:
        st = key_path.stat()
    except FileNotFoundError as exc:
        raise SigningKeyError(f"key: {key_path} does not exist") from exc
    except OSError as exc:
        raise SigningKeyError(f"key: cannot read {key_path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise SigningKeyError(f"key: {key_path} {kind_problem(key_path, 'file')}")
    if st.st_mode & 0o077:
        raise SigningKeyError(
            f"key: {key_path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o});"
            f" run: chmod 600 {key_path}"
        )
    data = key_path.read_bytes()
    env_value = os.environ.get(passphrase_env)
    passphrase = env_value.encode() if env_value else None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        # Raised both for "encrypted but no passphrase" and "passphrase given but not encrypted".
        if passphrase is None:
            raise SigningKeyError(
                f"key: {key_path} is encrypted; set {passphrase_env} to its passphrase"
            ) from None
        raise SigningKeyError(
            f"key: {key_path} is not encrypted but {passphrase_env} is set; unset it"
        ) from exc
    except ValueError:
        # Deliberately drop the library's message: it may quote parts of the PEM.
        if passphrase is not None:
            raise SigningKeyError(
                f"key: cannot decrypt {key_path}: wrong passphrase in {passphrase_env}"
                " or not a PEM private key"
            ) from None
        raise SigningKeyError(f"key: {key_path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"key: {key_path} is not an Ed25519 key")
    return Signer(key)


def _load_public(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise SigningKeyError(f"trust: {path} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"trust: {path} is not an Ed25519 public key")
    return key


def load_trust_store(path: Path) -> list[TrustedKey]:
    """Load allowed public keys from a PEM file or from every ``*.pem``/``*.pub`` in a folder."""
    if problem := kind_problem(path, "file or folder"):
        raise SigningKeyError(f"trust: {path} {problem}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in {".pem", ".pub"})
        if not files:
            raise SigningKeyError(f"trust: {path} holds no .pem or .pub public keys")
    else:
        files = [path]
    keys: dict[str, TrustedKey] = {}
    for file in files:
        pub = _load_public(file)
        kid = key_id(pub)
        keys.setdefault(kid, TrustedKey(kid, pub, str(file)))
    return list(keys.values())


def check_trusted(
    signer: Signer, trusted: list[TrustedKey], key_path: Path, trust_path: Path
) -> None:
    if not any(t.keyid == signer.keyid for t in trusted):
        raise SigningKeyError(
            f"key: {key_path} (keyid {signer.keyid[:16]}) is not in the trust store {trust_path}"
        )
