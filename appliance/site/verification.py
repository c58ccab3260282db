"""Is a model bundle verified on this site? The one place that answers it.

A site verifies a bundle on its own scans before its results go out unreviewed;
the verification leaves one record per bundle, keyed by the bundle's sha256
(``bundle.json``'s, as results name it)::

    <data_dir>/verification/<bundle sha256>.json
        {"bundle_sha256", "bundle_name", "bundle_version", "verified_at", "verified_by",
         "summary"}

No record, an unreadable one, or one naming another bundle means *not
verified*: every result of that bundle waits for a person (docs/review.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from runtime.files import write_json_atomic
from runtime.typed_json import SpecError, dump, parse_section

VERIFICATION_DIR = "verification"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class VerificationRecord:
    """That a bundle was verified on this site: by whom, when, and what it showed."""

    bundle_sha256: str
    bundle_name: str
    bundle_version: str
    verified_at: str  # UTC, ISO 8601
    verified_by: str
    summary: str = ""  # what the verification measured, in a line

    def validate(self, where: str) -> None:
        if not _SHA256.fullmatch(self.bundle_sha256):
            raise SpecError(f"{where}bundle_sha256 must be a sha256 in lower-case hex")


def verification_path(data_dir: Path, bundle_sha256: str) -> Path:
    return data_dir / VERIFICATION_DIR / f"{bundle_sha256}.json"


def read_verification(data_dir: Path, bundle_sha256: str) -> VerificationRecord | None:
    """The bundle's record on this site, or None (missing, unreadable or another bundle's)."""
    try:
        data = json.loads(verification_path(data_dir, bundle_sha256).read_text(encoding="utf-8"))
        record = parse_section(VerificationRecord, data, "")
    except (OSError, ValueError):  # SpecError is a ValueError
        return None
    return record if record.bundle_sha256 == bundle_sha256 else None


def is_verified(data_dir: Path, bundle_sha256: str) -> bool:
    return read_verification(data_dir, bundle_sha256) is not None


def write_verification(data_dir: Path, record: VerificationRecord) -> Path:
    """Record a verified bundle (what the site's verification command writes)."""
    record.validate("")
    path = verification_path(data_dir, record.bundle_sha256)
    write_json_atomic(path, dump(record))
    return path
