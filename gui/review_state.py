"""Which cases wait for a person, derived from the result versions and the audit trail.

The store does not hold review state (a sign-off is a result version and an
audit line, ``appliance.review.sign_off``). ``ReviewIndex`` reads each case's latest
version once and keeps the answer per (case row, version): a store change that
leaves a case's result alone costs nothing, a ``signed_off`` line appended to the
audit trail re-reads only the case it names, and a new verification record
re-derives every answer from the results already read. No Qt here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from appliance.results import (
    CaseResult,
    ResultError,
    ReviewRecord,
    case_folder,
    latest_in,
    read_result,
)
from appliance.review.sign_off import waiting_reasons
from appliance.site.verification import VERIFICATION_DIR, is_verified
from gui.store_reader import CaseRow, QueueSnapshot

SHOWS_RESULT = ("done", "rejected")
QUEUE_WORDS = {"accepted": "accepted", "rejected": "rejected", "sent_for_fish": "for FISH"}


def case_result_folder(case: CaseRow, outbox: Path) -> Path:
    """The case folder whose latest.json names the version to show: the store's result
    folder's case folder (a sign-off is newer than the version the store recorded),
    else the outbox's folder for the case."""
    if case.result_dir:
        folder = Path(case.result_dir)
        return folder.parent if (folder / "result.json").is_file() else folder
    return case_folder(outbox, case.case_key)


@dataclass(frozen=True)
class ReviewState:
    """A case's latest result as review sees it."""

    folder: Path  # the version folder
    version: int
    waiting: tuple[str, ...]  # why it needs a person (empty: it does not)
    review: ReviewRecord | None

    @property
    def to_review(self) -> bool:
        return self.review is None and bool(self.waiting)

    @property
    def text(self) -> str:
        """What the queue's Review column says (short: the column shares 1280 px)."""
        if self.review is not None:
            return QUEUE_WORDS[self.review.decision]
        return "to review" if self.waiting else ""


class ReviewIndex:
    """Review states of the queue's cases, re-read only when something says they changed."""

    def __init__(self, outbox: Path, data_dir: Path, audit_path: Path) -> None:
        self.outbox = outbox
        self.data_dir = data_dir
        self.audit_path = audit_path
        # Per case folder, its latest version's result (versions are never edited).
        self._results: dict[Path, tuple[Path, CaseResult]] = {}
        # Per case row: ((case key, the store's result version), its review state).
        self._states: dict[int, tuple[tuple[str, int | None], ReviewState | None]] = {}
        self._verified: dict[str, bool] = {}
        self._audit_read = 0
        self._audit_file: tuple[int, int] | None = None  # (device, inode) read from
        self._verification_mtime: int | None = None

    def refresh(self) -> bool:
        """Take note of sign-offs and verifications since the last call; True if any."""
        changed = False
        try:
            mtime = (self.data_dir / VERIFICATION_DIR).stat().st_mtime_ns
        except OSError:
            mtime = None
        if mtime != self._verification_mtime:
            self._verification_mtime = mtime
            self._verified.clear()
            self._states.clear()
            changed = True
        signed = self._signed_since_last_read()
        if signed:
            self._states = {k: v for k, v in self._states.items() if v[0][0] not in signed}
            changed = True
        return changed

    def _signed_since_last_read(self) -> set[str]:
        """Case keys named by ``signed_off`` lines appended since the last read."""
        try:
            stat = self.audit_path.stat()
        except OSError:
            return set()
        size, file = stat.st_size, (stat.st_dev, stat.st_ino)
        if file != self._audit_file or size < self._audit_read:
            # Rotated or replaced: lines the old file got since the last read are not
            # read, so every case is read again; the new file is read from its start.
            self._audit_file, self._audit_read = file, 0
            self._states.clear()
        if size == self._audit_read:
            return set()
        with self.audit_path.open("rb") as handle:
            handle.seek(self._audit_read)
            chunk = handle.read(size - self._audit_read)
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits its turn
        self._audit_read += len(complete)
        cases = set()
        for line in complete.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == "signed_off":
                cases.add(str(entry.get("case", "")))
        return cases

    def annotate(self, queue: QueueSnapshot) -> QueueSnapshot:
        """The queue with each case's review state (None for cases without a result)."""
        cases = [dataclasses.replace(c, review=self.state(c)) for c in queue.cases]
        return dataclasses.replace(queue, cases=cases)

    def state(self, case: CaseRow) -> ReviewState | None:
        if case.shown[0] not in SHOWS_RESULT:
            return None
        stamp = (case.case_key, case.result_version)
        cached = self._states.get(case.id)
        if cached is None or cached[0] != stamp:
            folder = case_result_folder(case, self.outbox)
            cached = (stamp, self._read_state(folder, case.case_key))
            self._states[case.id] = cached
        return cached[1]

    def _read_state(self, folder: Path, case_key: str) -> ReviewState | None:
        latest = latest_in(folder)
        if latest is None:
            return None
        known = self._results.get(folder)
        if known is not None and known[0] == latest.path:
            result = known[1]
        else:
            try:
                result = read_result(latest.path)
            except ResultError:
                return None
            self._results[folder] = (latest.path, result)
        if result.case_id != case_key:  # another case's result is never reviewed as this one
            return None
        sha = result.bundle.sha256
        if sha not in self._verified:
            self._verified[sha] = is_verified(self.data_dir, sha)
        waiting = waiting_reasons(result, bundle_verified=self._verified[sha])
        if result.review is not None:
            waiting = result.review.waited_for
        return ReviewState(latest.path, result.version, waiting, result.review)
