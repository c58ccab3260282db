"""Checking the audit trail's hash chain and the result files its records hash.

``verify_trail`` reads every file of the trail in order (``appliance.service.audit``
for the format), follows the chain from record to record and stops at its first
break, naming the line and what happened to it: edited, deleted, moved out of
order, copied, or added without a hash. Each ``finished`` or ``signed_off`` record
that lists ``result_files`` has its version folder hashed again: a file whose bytes
changed, one missing and one added since are each a problem. Records from before
the chain are accepted only as the trail's leading lines, and counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from appliance.service.audit import GENESIS, line_hash, rotated_files, rotated_name, trail_files
from runtime.files import sha256_file


@dataclass(frozen=True)
class Line:
    where: str  # "<file> line <n>"
    raw: bytes
    record: dict[str, Any] | None  # None: not a JSON object

    @cached_property
    def hash(self) -> str:
        return line_hash(self.raw)


@dataclass
class TrailReport:
    """What ``cytoedge audit verify`` prints: the problems (one line each) and a summary."""

    path: Path
    problems: list[str] = field(default_factory=list)
    files: int = 0
    records: int = 0
    before_chain: int = 0  # records from before the chain, at the start of the trail
    versions: int = 0  # result version folders checked
    result_files: int = 0
    last_seq: int = 0  # the last line's record number
    head: str = ""  # hash of the last line: what a copy kept elsewhere is compared with

    @property
    def intact(self) -> bool:
        return not self.problems

    @property
    def summary(self) -> str:
        if not self.files and self.intact:
            return f"audit trail {self.path}: no records yet"
        verdict = "intact" if self.intact else f"{len(self.problems)} problem(s)"
        older = f", {self.before_chain} from before the chain" if self.before_chain else ""
        return (
            f"audit trail {self.path}: {verdict}: {self.records} records in {self.files} "
            f"file(s){older}; {self.result_files} result files in {self.versions} versions "
            f"checked; last record {self.last_seq}, sha256 {self.head}"
        )


def verify_trail(path: Path) -> TrailReport:
    """Check the trail whose current file is ``path`` (``<state>/audit.jsonl``). Files
    are read one at a time, twice: a trail of years need not fit in memory."""
    report = TrailReport(path)
    report.problems.extend(_missing_files(path))
    files = trail_files(path)
    at_seq: dict[int, str] = {}  # record number -> where it first is: moved or deleted?
    first_of: dict[str, str] = {}  # line hash -> where it first is: a copy?
    results: list[str] = []
    last: Line | None = None
    for line in _read(files, report):
        first_of.setdefault(line.hash, line.where)
        last = line
        if line.record is None:
            continue
        report.records += 1
        seq = line.record.get("seq")
        if isinstance(seq, int):
            at_seq.setdefault(seq, line.where)
        if isinstance(line.record.get("result_files"), dict):
            results.extend(_check_results(line, report))
    if last is not None:
        report.head = last.hash
        seq = (last.record or {}).get("seq")
        report.last_seq = seq if isinstance(seq, int) else 0
    _check_chain(_read(files), at_seq, first_of, report)
    report.problems.extend(results)
    return report


def _read(files: list[Path], report: TrailReport | None = None) -> Iterator[Line]:
    """The lines of the trail's files in order; an unreadable file is a problem (and
    counted as read) on the ``report`` given."""
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as exc:
            if report is not None:
                report.problems.append(f"{file.name}: cannot be read: {exc.strerror or exc}")
            continue
        if report is not None:
            report.files += 1
        yield from _lines(file.name, data)


def _missing_files(path: Path) -> list[str]:
    """Rotated files are numbered from 1 without gaps: each gap is a deleted file."""
    numbers = {number for number, _ in rotated_files(path)}
    return [
        f"{rotated_name(path, number).name}: missing (the trail's files are numbered "
        f"1 to {max(numbers)})"
        for number in range(1, max(numbers, default=0))
        if number not in numbers
    ]


def _lines(name: str, data: bytes) -> list[Line]:
    pieces = data.split(b"\n")
    raws = [piece + b"\n" for piece in pieces[:-1]]
    if pieces[-1]:  # the last line, cut short by a crash
        raws.append(pieces[-1])
    lines = []
    for number, raw in enumerate(raws, start=1):
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        record = record if isinstance(record, dict) else None
        lines.append(Line(f"{name} line {number}", raw, record))
    return lines


def _check_chain(
    lines: Iterator[Line], at_seq: dict[int, str], first_of: dict[str, str], report: TrailReport
) -> None:
    """Follow ``prev_sha256`` and ``seq`` from line to line; report the first break."""
    chained, last_seq = False, 0
    previous: Line | None = None
    for line in lines:
        before, previous = previous, line
        if line.record is None:
            report.problems.append(f"{line.where}: not a whole JSON record (cut short or edited)")
            continue
        if "prev_sha256" not in line.record:
            if not chained:
                report.before_chain += 1
                continue
            report.problems.append(
                f"{line.where}: no chain hash after the chain began: added or edited"
            )
            return
        chained = True
        problem = _break(line, before, last_seq, at_seq, first_of)
        if problem:
            report.problems.append(problem)
            return
        last_seq = line.record["seq"]


def _break(
    line: Line,
    before: Line | None,
    last_seq: int,
    at_seq: dict[int, str],
    first_of: dict[str, str],
) -> str:
    """What is wrong where ``line`` follows ``before`` ("" when it chains to it)."""
    assert line.record is not None
    seq, expected = line.record.get("seq"), last_seq + 1
    chains = line.record.get("prev_sha256") == (before.hash if before else GENESIS)
    if not isinstance(seq, int):
        return f"{line.where}: edited: its record number {seq!r} is not a number"
    if chains:
        if seq == expected:
            return ""
        return f"{line.where}: edited: it is record {seq}, but follows record {last_seq}"
    if first_of[line.hash] != line.where:
        return f"{line.where}: a copy of {first_of[line.hash]}"
    if seq == expected:
        if before is None:
            return f"{line.where}: edited: the trail's first record does not start the chain"
        return (
            f"{before.where}: edited: its bytes no longer match the hash {line.where} holds of it"
        )
    if seq < expected:
        return f"{line.where}: out of order: record {seq} comes after record {last_seq}"
    if expected in at_seq:
        return (
            f"{line.where}: out of order: record {seq} comes before record {expected} "
            f"({at_seq[expected]})"
        )
    gone = f"record {expected} is" if seq == expected + 1 else f"records {expected}-{seq - 1} are"
    first = line.where.endswith(" line 1")
    return f"{line.where}: {gone} missing before it (deleted{', or a file' if first else ''})"


def _check_results(line: Line, report: TrailReport) -> list[str]:
    """The version folder a record hashed: each file's bytes, and nothing added."""
    assert line.record is not None
    folder = Path(str(line.record.get("result_dir") or ""))
    recorded: dict[str, Any] = line.record["result_files"]
    report.versions += 1
    if not folder.is_dir():
        return [f"{folder}: result folder missing (recorded in {line.where})"]
    problems = []
    for name, digest in recorded.items():
        file = folder / name
        report.result_files += 1
        if not file.is_file():
            problems.append(f"{file}: missing (recorded in {line.where})")
            continue
        try:
            same = sha256_file(file) == digest
        except OSError as exc:
            problems.append(f"{file}: cannot be read: {exc.strerror or exc}")
            continue
        if not same:
            problems.append(f"{file}: changed since {line.where} recorded it")
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.relative_to(folder).as_posix() not in recorded:
            problems.append(f"{file}: added after {line.where} recorded the folder")
    return problems
