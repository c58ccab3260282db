"""Who vouched for an installed bundle, as its installation recorded it.

``bundle install`` (``appliance.site.bundle_trust``) checks an archive's signature
and keeps what it decided in the installed folder as ``signature.json``; the
pipeline names the signer in every result from it, and the window and doctor show
it. Reading that record needs no key and no policy, so it lives here, below
everything that names a signer. A folder without the record (the demo, a folder
named in ``paths.bundle``) was vouched for by no one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD = "signature.json"
NOT_TRUSTED = "bundle not signed by a trusted key"
SHORT = 16  # hex digits of a fingerprint shown to a person


def short(fingerprint_hex: str) -> str:
    """A fingerprint as a person reads it."""
    return fingerprint_hex[:SHORT]


@dataclass(frozen=True)
class Signer:
    """The trusted key that signed a bundle."""

    name: str
    fingerprint: str

    def __str__(self) -> str:
        return f"{self.name} ({short(self.fingerprint)})"


@dataclass(frozen=True)
class Signed:
    """What an installed folder's record says, for results, doctor and the window."""

    signer: Signer | None
    warning: str | None  # NOT_TRUSTED when the site's policy warns about this bundle
    reason: str


def read_record(folder: Path) -> Signed:
    """The record the installation kept; a folder without one is vouched for by no one."""
    record = record_json(folder)
    if record is None:
        return Signed(None, NOT_TRUSTED, "no signature record (not installed with one)")
    signer = record.get("signer")
    warning = record.get("warning")
    return Signed(
        Signer(str(signer.get("name")), str(signer.get("fingerprint")))
        if isinstance(signer, dict)
        else None,
        NOT_TRUSTED if warning else None,
        str(record.get("reason") or ""),
    )


def record_json(folder: Path) -> dict[str, Any] | None:
    """The record as written, or None when there is none (or it cannot be read)."""
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
