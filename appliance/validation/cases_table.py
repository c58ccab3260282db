"""A labelled cases table: what ``cytoedge train`` learns from and ``cytoedge validate``
checks a bundle against (docs/training.md has the format).

One CSV file (comma-separated, UTF-8, a spreadsheet's "CSV UTF-8" export), one row
per case:

- ``case_id``: unique;
- ``scans``: the case's scans, separated by ``;``: scan files, single-cell folders,
  or a folder per case whose scans are found as the inbox finds a case folder's.
  Paths are relative to the table's folder unless absolute;
- labels: the myeloma markers ``del(17p)``, ``t(4;14)``, ``t(11;14)``, ``gain(1q)``
  as 1, 0 or empty (unknown: masked out of training, left out of its metrics);
  ``diagnosis``: one of the eight peripheral-blood classes; ``hb``: hemoglobin in
  g/dL. Each row needs at least one label;
- ``notes`` and any column whose name starts with ``#`` are ignored.

Any problem is one ``CasesTableError`` line naming the row (as a spreadsheet numbers
it: the header is row 1) and the column.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

from appliance.service.inbox_layout import scans_at
from runtime.labels import DIAGNOSIS, HEMOGLOBIN, MYELOMA_MARKERS, PB_CLASSES

CASE_ID = "case_id"
SCANS = "scans"
NOTES = "notes"
SCAN_SEPARATOR = ";"
LABEL_COLUMNS = (*MYELOMA_MARKERS, DIAGNOSIS, HEMOGLOBIN)
HEMOGLOBIN_RANGE = (1.0, 25.0)  # g/dL: outside it the value is a typo or another unit


class CasesTableError(ValueError):
    """A cases table that cannot be used; the message is one line naming row and column."""


@dataclass(frozen=True)
class LabelledCase:
    case_id: str
    scans: tuple[Path, ...]
    labels: dict[str, bool | str | float]  # only the labels the row gives
    row: int


@dataclass(frozen=True)
class CasesTable:
    path: Path
    sha256: str  # of ``data``
    columns: tuple[str, ...]  # the label columns present
    cases: tuple[LabelledCase, ...]
    data: bytes = field(repr=False)  # the bytes read: what a report keeps a copy of

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def name(self) -> str:
        """How reports and records name the table: its file name (the path may not last)."""
        return self.path.name


def read_cases_table(path: Path | str) -> CasesTable:
    """Parse and check the whole table; CasesTableError on the first problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
        text = data.decode("utf-8-sig")
    except FileNotFoundError:
        raise CasesTableError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise CasesTableError(f"{path}: not UTF-8 text; save it as CSV UTF-8") from None
    except OSError as exc:
        raise CasesTableError(f"{path}: cannot be read ({exc.strerror})") from None
    reader = csv.reader(io.StringIO(text))
    header = [name.strip() for name in next(reader, [])]
    columns = _check_header(path, header)
    cases: list[LabelledCase] = []
    seen: dict[str, int] = {}
    for values in reader:
        row = reader.line_num
        if not any(v.strip() for v in values):
            continue  # a blank line
        if len(values) != len(header):
            raise CasesTableError(
                f"{path} row {row}: {len(values)} fields where the header has {len(header)}"
            )
        case = _case(path, row, dict(zip(header, values, strict=True)), columns)
        if case.case_id in seen:
            raise CasesTableError(
                f"{path} row {row}, column {CASE_ID}: {case.case_id!r} "
                f"is already the case of row {seen[case.case_id]}"
            )
        seen[case.case_id] = row
        cases.append(case)
    if not cases:
        raise CasesTableError(f"{path}: no cases below the header")
    return CasesTable(path, hashlib.sha256(data).hexdigest(), columns, tuple(cases), data)


def _check_header(path: Path, header: list[str]) -> tuple[str, ...]:
    if not header or header == [""]:
        raise CasesTableError(f"{path}: empty; the first row names the columns")
    for required in (CASE_ID, SCANS):
        if required not in header:
            raise CasesTableError(
                f"{path} row 1: no column {required!r} (found {', '.join(header)}); "
                "the table is comma-separated with case_id, scans and label columns"
            )
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise CasesTableError(f"{path} row 1: column {repeated[0]!r} appears twice")
    known = {CASE_ID, SCANS, NOTES, *LABEL_COLUMNS}
    for name in header:
        if name not in known and not name.startswith("#"):
            raise CasesTableError(
                f"{path} row 1, column {name!r}: unknown; label columns are "
                f"{', '.join(LABEL_COLUMNS)} (start a column's name with # to keep notes)"
            )
    labels = tuple(name for name in LABEL_COLUMNS if name in header)
    if not labels:
        raise CasesTableError(
            f"{path} row 1: no label column; give {', '.join(MYELOMA_MARKERS)} or {DIAGNOSIS}"
        )
    return labels


def _case(path: Path, row: int, values: dict[str, str], columns: tuple[str, ...]) -> LabelledCase:
    def where(column: str) -> str:
        return f"{path} row {row}, column {column}"

    case_id = values[CASE_ID].strip()
    if not case_id:
        raise CasesTableError(f"{where(CASE_ID)}: empty; every case needs an id")
    labels: dict[str, bool | str | float] = {}
    for column in columns:
        text = values[column].strip()
        if not text:
            continue
        if column in MYELOMA_MARKERS:
            if text not in ("0", "1"):
                raise CasesTableError(f"{where(column)}: {text!r} is not 1, 0 or empty")
            labels[column] = text == "1"
        elif column == DIAGNOSIS:
            labels[column] = _diagnosis(text, where(column))
        else:
            labels[column] = _hemoglobin(text, where(column))
    if not labels:
        raise CasesTableError(f"{path} row {row}: case {case_id!r} has no label")
    return LabelledCase(case_id, _scans(path, values[SCANS], where(SCANS)), labels, row)


def _diagnosis(text: str, where: str) -> str:
    by_lower = {name.lower(): name for name in PB_CLASSES}
    if text.lower() not in by_lower:
        raise CasesTableError(f"{where}: {text!r} is not one of {', '.join(PB_CLASSES)}")
    return by_lower[text.lower()]


def _hemoglobin(text: str, where: str) -> float:
    try:
        value = float(text.replace(",", "."))
    except ValueError:
        raise CasesTableError(f"{where}: {text!r} is not a number (g/dL)") from None
    low, high = HEMOGLOBIN_RANGE
    if not low <= value <= high:
        raise CasesTableError(f"{where}: {text} g/dL is outside {low:g}-{high:g} g/dL")
    return value


def _scans(table: Path, text: str, where: str) -> tuple[Path, ...]:
    entries = [part.strip() for part in text.split(SCAN_SEPARATOR) if part.strip()]
    if not entries:
        raise CasesTableError(f"{where}: empty; name the case's scans or its folder")
    found: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else table.parent / path
        if not path.exists():
            raise CasesTableError(f"{where}: {entry} does not exist (relative to {table.parent})")
        scans = scans_at(path)
        if not scans:
            raise CasesTableError(f"{where}: {entry} is a folder without scans")
        found.extend(scans)
    return tuple(dict.fromkeys(found))
