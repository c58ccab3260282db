"""Who signed a bundle, whether this site trusts that key, and what it does about it.

A model owner signs an archive's ``MANIFEST.json`` (which holds every member's
sha256) with an Ed25519 key: ``MANIFEST.sig`` is JSON ``{"format":
"cytoedge-bundle-signature", "key": <fingerprint>, "signature": <base64>}`` over the
manifest's exact bytes. A site trusts the public keys in its configuration folder
(``appliance.site.signing_keys``), unless ``bundles.revoked_keys`` lists them or their
``Expires:`` day is past. ``bundles.policy`` says what ``bundle install`` and ``bundle
use`` do with a bundle no trusted key signed: ``require`` refuses it, ``warn`` takes
it and every result says ``NOT_TRUSTED``, ``off`` checks nothing.

What the check decided is kept in the installed folder as ``signature.json`` (with
the signature itself, so that ``bundle use`` and ``doctor`` can check it again
against the folder: the manifest is a function of the bundle), so the service, the
results and the window name the signer without the archive. A folder with no such
record (the demo, a folder named in ``paths.bundle``) was vouched for by no one.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.config import Config
from appliance.site.signing_keys import (
    SigningKeyError,
    TrustedKey,
    fingerprint,
    is_encrypted,
    load_private_key,
    trusted_keys,
)
from runtime.bundle_archive import SIGNATURE, manifest_bytes
from runtime.bundle_format import Bundle
from runtime.bundle_signer import NOT_TRUSTED, RECORD, Signer, record_json, short
from runtime.files import write_json_atomic

SIGNATURE_FORMAT = "cytoedge-bundle-signature"
PASSPHRASE_ENV = "CYTOEDGE_KEY_PASSPHRASE"


class TrustError(ValueError):
    """A bundle the site's policy refuses, or trust that cannot be read; one line."""


@dataclass(frozen=True)
class Verdict:
    """What checking a bundle's signature found: its trusted signer, or why there is none."""

    signer: Signer | None
    reason: str  # empty with a signer
    signature: bytes | None  # MANIFEST.sig as it came, kept to check again later


@dataclass(frozen=True)
class Trust:
    """A site's keys and policy, read once for one command."""

    policy: str
    keys: tuple[TrustedKey, ...]
    revoked: tuple[str, ...]
    today: datetime.date
    where: str  # the configuration the policy comes from, for messages

    @classmethod
    def of(cls, config: Config, today: datetime.date | None = None) -> Trust:
        try:
            keys = tuple(trusted_keys(config.trusted_keys_dir))
        except SigningKeyError as exc:
            raise TrustError(f"trusted key unusable: {exc}") from None
        return cls(
            config.bundles.policy,
            keys,
            tuple(config.bundles.revoked_keys),
            today or datetime.datetime.now(datetime.UTC).date(),
            str(config.source or "the built-in defaults"),
        )

    def check(self, manifest: bytes, signature: bytes | None) -> Verdict:
        """Whether ``signature`` is a trusted, live key's signature over ``manifest``."""
        if self.policy == "off":
            return Verdict(None, "signatures are not checked (bundles.policy = off)", signature)
        if signature is None:
            return Verdict(None, "not signed", None)
        try:
            key_hex, raw = _parse(signature)
        except ValueError:
            return Verdict(None, f"{SIGNATURE} is not a signature this cytoedge reads", signature)
        if any(key_hex.startswith(entry) for entry in self.revoked):
            return Verdict(
                None, f"signed by key {short(key_hex)}, which is revoked here", signature
            )
        key = next((k for k in self.keys if k.fingerprint == key_hex), None)
        if key is None:
            return Verdict(
                None, f"signed by key {short(key_hex)}, which this site does not trust", signature
            )
        if key.expires is not None and key.expires < self.today:
            return Verdict(
                None,
                f"signed by key {key.name} ({short(key_hex)}), trusted until {key.expires}",
                signature,
            )
        try:
            key.public.verify(raw, manifest)
        except InvalidSignature:
            return Verdict(
                None,
                f"the signature by key {key.name} ({short(key_hex)}) does not match the "
                "manifest (changed after signing)",
                signature,
            )
        return Verdict(Signer(key.name, key.fingerprint), "", signature)

    def admit(self, verdict: Verdict, what: str) -> None:
        """TrustError when the policy refuses a bundle with this verdict."""
        if self.policy == "require" and verdict.signer is None:
            raise TrustError(
                f"{what}: {verdict.reason}; bundles.policy = require ({self.where}) "
                "refuses a bundle no trusted key signed"
            )

    def warning(self, verdict: Verdict) -> str | None:
        return NOT_TRUSTED if verdict.signer is None and self.policy != "off" else None


def signature_document(key: Ed25519PrivateKey, manifest: bytes) -> bytes:
    """``MANIFEST.sig``: the signer's fingerprint and the signature over ``manifest``."""
    document = {
        "format": SIGNATURE_FORMAT,
        "key": fingerprint(key.public_key()),
        "signature": base64.b64encode(key.sign(manifest)).decode("ascii"),
    }
    return (json.dumps(document, indent=2) + "\n").encode("ascii")


def check_folder(bundle: Bundle, trust: Trust) -> Verdict:
    """Check the signature an installed folder's record keeps against the folder itself."""
    return trust.check(manifest_bytes(bundle), _stored_signature(bundle.path))


def write_record(folder: Path, verdict: Verdict, trust: Trust) -> None:
    """Keep what the check decided in the installed folder (replacing one before)."""
    signer = verdict.signer
    write_json_atomic(
        folder / RECORD,
        {
            "signer": {"name": signer.name, "fingerprint": signer.fingerprint} if signer else None,
            "reason": verdict.reason,
            "warning": trust.warning(verdict),
            "signature": (
                base64.b64encode(verdict.signature).decode("ascii") if verdict.signature else None
            ),
        },
    )


def sign_new_version(bundle: Bundle, config: Config) -> Verdict | None:
    """Sign a version this site wrote (``train``, ``validate --recalibrate``) with the
    site's key, ``bundles.signing_key``, and keep the verdict in its folder as an
    install would; None when the site has no key."""
    key = site_signing_key(config)
    if key is None:
        return None
    trust = Trust.of(config)
    verdict = trust.check(manifest_bytes(bundle), signature_document(key, manifest_bytes(bundle)))
    write_record(bundle.path, verdict, trust)
    return verdict


def site_signing_key(config: Config) -> Ed25519PrivateKey | None:
    """The site's own private key (its passphrase, if any, from $CYTOEDGE_KEY_PASSPHRASE);
    None when ``bundles.signing_key`` is empty. Read before the work that needs it, so a
    wrong key stops a command before it trains for an hour."""
    if not config.bundles.signing_key:
        return None
    path = Path(config.bundles.signing_key).expanduser()
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        if is_encrypted(path) and not passphrase:
            raise SigningKeyError(f"{path}: the key is encrypted; set ${PASSPHRASE_ENV}")
        return load_private_key(path, passphrase.encode() if passphrase else None)
    except SigningKeyError as exc:
        raise TrustError(f"bundles.signing_key in {config.source}: {exc}") from None


def _parse(signature: bytes) -> tuple[str, bytes]:
    document = json.loads(signature)
    if not isinstance(document, dict) or document.get("format") != SIGNATURE_FORMAT:
        raise ValueError("not a signature")
    key_hex, text = document.get("key"), document.get("signature")
    if not isinstance(key_hex, str) or not isinstance(text, str):
        raise ValueError("not a signature")
    try:
        return key_hex, base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("not base64") from None


def _stored_signature(folder: Path) -> bytes | None:
    record = record_json(folder) or {}
    try:
        return base64.b64decode(record["signature"], validate=True)
    except (KeyError, TypeError, binascii.Error):
        return None
