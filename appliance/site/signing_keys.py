"""Ed25519 keys of whoever signs bundles, and the public keys a site trusts.

A key pair is two PEM files: ``<name>.key`` (PKCS 8, mode 0600, optionally encrypted
with a passphrase) and ``<name>.pub`` (SubjectPublicKeyInfo). A site trusts a key by
placing its ``.pub`` in ``<config dir>/trusted-keys/``: the file's name (without
``.pub``) is the key's name, and an optional line ``Expires: YYYY-MM-DD`` before the
PEM block ends its trust after that day. A key is known by its fingerprint, the
sha256 of its raw 32-byte public key in hex (shown shortened to 16 digits). The
cryptography package does the signing and checking; nothing here is hand-made crypto.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
EXPIRES = "Expires:"
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_PEM_START = "-----BEGIN"


class SigningKeyError(ValueError):
    """A key file that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class TrustedKey:
    """A public key a site trusts: its name, fingerprint and the last day it is trusted."""

    name: str
    fingerprint: str
    public: Ed25519PublicKey
    expires: datetime.date | None
    path: Path


def fingerprint(public: Ed25519PublicKey) -> str:
    """sha256 of the raw public key, lower-case hex."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_key_pair(
    folder: Path, name: str, passphrase: bytes | None = None, expires: datetime.date | None = None
) -> tuple[Path, Path]:
    """Write ``<name>.key`` (mode 0600 from its creation) and ``<name>.pub`` in ``folder``;
    refuses to replace either. ``expires`` is written into the public key file."""
    if not KEY_NAME.fullmatch(name):
        raise SigningKeyError(f"{name!r}: a key name is letters, digits, _ . - ")
    private_path = folder / f"{name}{PRIVATE_SUFFIX}"
    public_path = folder / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise SigningKeyError(f"{path} exists; choose another name or folder")
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = f"{EXPIRES} {expires.isoformat()}\n".encode() if expires else b""
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(header + public_pem)
    return private_path, public_path


def is_encrypted(path: Path) -> bool:
    """Whether the private key file needs a passphrase."""
    return b"ENCRYPTED" in _read(path)


def load_private_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """The Ed25519 private key in ``path``; SigningKeyError for a wrong passphrase or
    a file that holds no such key."""
    try:
        key = serialization.load_pem_private_key(_read(path), passphrase or None)
    except TypeError:
        raise SigningKeyError(
            f"{path}: the key is encrypted; give its passphrase"
            if passphrase is None
            else f"{path}: the key is not encrypted; give no passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError(
            f"{path}: not a PEM private key, or the passphrase is wrong"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: not an Ed25519 key")
    return key


def read_trusted_key(path: Path) -> TrustedKey:
    """A trusted key file: PEM public key, optionally after an ``Expires:`` line."""
    name = path.name.removesuffix(PUBLIC_SUFFIX)
    if not KEY_NAME.fullmatch(name) or not path.name.endswith(PUBLIC_SUFFIX):
        raise SigningKeyError(f"{path}: a trusted key is <name>.pub, name letters, digits, _ . -")
    text = _read(path).decode("ascii", "replace")
    head, start, pem = text.partition(_PEM_START)
    expires = None
    for line in head.splitlines():
        label, _, value = line.strip().partition(" ")
        if label == EXPIRES:
            try:
                expires = datetime.date.fromisoformat(value.strip())
            except ValueError:
                raise SigningKeyError(f"{path}: {EXPIRES} must be a date YYYY-MM-DD") from None
        elif line.strip():
            raise SigningKeyError(f"{path}: only an {EXPIRES} line may come before the key")
    try:
        public = serialization.load_pem_public_key((start + pem).encode("ascii"))
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError(f"{path}: not a PEM public key") from None
    if not isinstance(public, Ed25519PublicKey):
        raise SigningKeyError(f"{path}: not an Ed25519 key")
    return TrustedKey(name, fingerprint(public), public, expires, path)


def trusted_keys(folder: Path) -> list[TrustedKey]:
    """Every ``*.pub`` in ``folder`` (none when it does not exist), by name."""
    if not folder.is_dir():
        return []
    return [read_trusted_key(path) for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}"))]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"{path}: no such key file") from None
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot read it ({exc.strerror})") from None
