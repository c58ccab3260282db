"""Which folder holds a case's results, and the check that a result is the asked-for case.

A case id is whatever a scanner, a folder name or a technician typed: "P 001",
"P/001", ".001", an emoji. A folder name must be safe on any file system, and
distinct case ids must never share one: "the latest result of case X" is read
by the window, the report link, FHIR and a rescore, and one patient's result
must never be shown under another's name.

``unique_name`` keeps a name readable where the id already is a safe name,
and otherwise adds a digest of the exact id after a ``~``. ``~`` is never in a
safe name, so a readable name cannot meet a digested one, and two digested
names meet only when two ids share a 64-bit digest. The same rule names slide
folders inside a version, FHIR files and labelled crops.

Every reader that asks for case X checks the ``case_id`` of what it read
(``check_case``) and refuses anything else; ``migrate_case_folders`` moves the
folders an earlier release named by ``safe_name`` alone (where "P 001" and
"P_001" shared ``P_001/``) to their own folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from runtime.files import write_json_atomic

log = logging.getLogger(__name__)

DIGEST_MARK = "~"
_DIGEST_CHARS = 16  # hex: 64 bits
_READABLE_CHARS = 100
_VERSION_DIR = re.compile(r"^v(\d+)$")


class WrongCaseError(ValueError):
    """A result folder holds another case's result; the message is one line."""


def safe_name(text: str) -> str:
    """``text`` in characters any file system takes: no separators, no dot files. Not
    injective on its own ("P 001" and "P_001" meet): name folders with ``unique_name``."""
    cleaned = re.sub(r"[^\w.+-]", "_", text, flags=re.UNICODE).strip("._")
    return cleaned[:120] or "unnamed"


def unique_name(*parts: str, separator: str = "-") -> str:
    """A file or folder name for ``parts`` (a case id; or a case id, a slide and a cell)
    that no other parts share. It is the parts joined where each already is a safe name
    and only the first may hold ``separator`` (so the join splits back one way, from the
    right); else the readable form plus ``~`` and a digest of the exact parts."""
    if all(safe_name(part) == part for part in parts) and not any(
        separator in part for part in parts[1:]
    ):
        return separator.join(parts)
    readable = separator.join(safe_name(part) for part in parts)[:_READABLE_CHARS]
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:_DIGEST_CHARS]
    return f"{readable}{DIGEST_MARK}{digest}"


def case_folder(outbox: Path, case_id: str) -> Path:
    """The folder of ``case_id``'s result versions."""
    return outbox / unique_name(case_id)


def check_case(found: str, wanted: str, where: Path) -> None:
    """Refuse (WrongCaseError) a result of case ``found`` read for case ``wanted``."""
    if found != wanted:
        raise WrongCaseError(
            f"{where} holds a result of case {found!r}, not of case {wanted!r}: refused"
        )


@dataclass(frozen=True)
class MovedVersion:
    case_id: str
    source: Path  # the version folder where an earlier release wrote it
    target: Path  # where it is now


def migrate_case_folders(outbox: Path) -> list[MovedVersion]:
    """Move every result version that is not in its case's ``case_folder`` there, keeping
    its number (a version's number is part of its identity: the audit trail and the
    job store name it), and point each touched case's latest.json at its newest own
    version. A version whose place is taken stays where it is, with a warning; a case
    folder left with no version goes. Run by the service as it starts."""
    if not outbox.is_dir():
        return []
    moved: list[MovedVersion] = []
    touched: set[Path] = set()
    for folder in sorted(p for p in outbox.iterdir() if p.is_dir() and p.name[0] != "."):
        for version in _versions(folder):
            case_id = _case_id_of(version)
            if case_id is None:
                continue
            home = case_folder(outbox, case_id)
            if home == folder:
                continue
            target = home / version.name
            if target.exists():
                log.warning(
                    "result version not moved: its place is taken",
                    extra={"case": case_id, "source": str(version), "target": str(target)},
                )
                continue
            home.mkdir(exist_ok=True)
            os.rename(version, target)
            moved.append(MovedVersion(case_id, version, target))
            touched.update((folder, home))
    for folder in touched:
        _repoint_latest(folder)
    for entry in moved:
        log.info(
            "result version moved to its case's own folder",
            extra={"case": entry.case_id, "source": str(entry.source), "target": str(entry.target)},
        )
    return moved


def _versions(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if _VERSION_DIR.match(p.name) and p.is_dir()]


def _case_id_of(version: Path) -> str | None:
    try:
        case_id = json.loads((version / "result.json").read_text(encoding="utf-8"))["case_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return case_id if isinstance(case_id, str) else None


def _repoint_latest(folder: Path) -> None:
    numbers = sorted(int(_VERSION_DIR.match(p.name).group(1)) for p in _versions(folder))
    latest = folder / "latest.json"
    if numbers:
        write_json_atomic(latest, {"version": numbers[-1], "path": f"v{numbers[-1]}"})
        return
    latest.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # something besides versions is in it: it stays
        folder.rmdir()
