"""Review and sign-off: which results wait for a person, and the sign-off itself.

A result waits for a person (*to review*) when the case abstained or was
rejected, a call is indeterminate, a slide's QC warned or failed, the case carries
a warning (below the plasma-cell burden the model was validated on), the cell head
left cells unsure, or the bundle that scored it is not verified on this site
(``appliance.site.verification``). Any result may be signed off; one that waits is
not sent on until it is. The reviewer accepts it, rejects it with a reason, or
sends it for FISH, and may enter what the laboratory confirmed (the diagnosis, FISH
markers, the karyotype, a panel's mutations): the labels similar-case retrieval and
the next training learn from. A sign-off never edits the result it signs: it is
version N+1 of the case (version N's files with a ``review`` record, the report
printed again), a ``signed_off`` line in the audit trail, and, where a FHIR outbox
is set, the result written as FHIR for the laboratory system
(``appliance.review.fhir``). docs/review.md has the rules.
"""

from __future__ import annotations

import getpass
import logging
import pwd
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.results import (
    CaseResult,
    ConfirmedFindings,
    ResultError,
    ResultFolder,
    ResultWriteError,
    ReviewRecord,
    WrongCaseError,
    check_case,
    read_result,
    write_reviewed_version,
)
from appliance.results.case_index import add_to_case_index
from appliance.results.schema import Decision
from appliance.review.fhir import write_fhir_report
from appliance.service.audit import AuditLog, result_file_hashes
from appliance.site.verification import is_verified
from runtime.typed_json import dump

log = logging.getLogger(__name__)


class ReviewError(RuntimeError):
    """A sign-off that could not be written; the message is one line for the technician."""


def waiting_reasons(result: CaseResult, *, bundle_verified: bool) -> tuple[str, ...]:
    """Why this result needs a person before it goes out (empty: it does not)."""
    reasons: list[str] = []
    if result.status != "scored":
        word = "no call" if result.status == "abstained" else "rejected"
        reasons.append(f"{word}: {result.abstain_reason or 'no reason recorded'}")
    else:
        undecided = [p.label for p in result.predictions if p.call == "indeterminate"]
        undecided += [
            f.label for head in result.heads for f in head.findings if f.call == "indeterminate"
        ]
        if undecided:
            reasons.append(f"indeterminate: {', '.join(undecided)}")
    for verdict, words in (("fail", "QC failed"), ("warn", "QC warning")):
        names = [scan.name for scan in result.scans if scan.qc.verdict == verdict]
        if names:
            reasons.append(f"{words} on {', '.join(names)}")
    reasons.extend(result.warnings)
    if result.differential is not None and result.differential.unsure:
        # A pre-classification a person confirms (CellaVision's workflow, CytoDINO's lesson).
        reasons.append(
            f"{result.differential.unsure} cells unsure: below the cell head's operating point"
        )
    if not bundle_verified:
        bundle = result.bundle
        reasons.append(f"bundle {bundle.name} {bundle.version} not verified on this site")
    return tuple(reasons)


def needs_review(result: CaseResult, *, bundle_verified: bool) -> bool:
    """True while the result waits for a person: it must be, and nobody has signed it."""
    return result.review is None and bool(waiting_reasons(result, bundle_verified=bundle_verified))


def login_name() -> str:
    """The workstation login's full name (its GECOS field), else the login itself."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        return ""
    try:
        full = pwd.getpwnam(user).pw_gecos.split(",")[0].strip()
    except KeyError:
        full = ""
    return full or user


@dataclass(frozen=True)
class SignOff:
    """What the reviewer decided, in their name, with what the laboratory confirmed
    (``ConfirmedFindings.entered`` reads what a person typed)."""

    decision: Decision
    reviewer: str
    reason: str = ""
    confirmed: ConfirmedFindings | None = None


@dataclass(frozen=True)
class SignedOff:
    folder: ResultFolder
    result: CaseResult
    fhir: Path | None  # the FHIR document written for the laboratory system, if any


def sign_off(
    version_folder: Path,
    decision: SignOff,
    *,
    data_dir: Path,
    audit: AuditLog,
    fhir_outbox: Path | None = None,
    write_pdf: bool = True,
    case_id: str | None = None,
) -> SignedOff:
    """Write the sign-off of the result in ``version_folder`` as the case's next version,
    record it in the audit trail, and write its FHIR document; ReviewError says why not.
    ``data_dir`` holds the site's bundle verifications (``appliance.site.verification``).
    With ``case_id`` (the case the reviewer chose), a result of another case is refused."""
    reviewer, reason = decision.reviewer.strip(), decision.reason.strip()
    if not reviewer:
        raise ReviewError("a sign-off needs the reviewer's name")
    if decision.decision == "rejected" and not reason:
        raise ReviewError("a rejection needs a reason")
    problem = decision.confirmed.problem() if decision.confirmed is not None else None
    if problem is not None:
        raise ReviewError(f"confirmed findings: {problem}")
    try:
        seen = read_result(version_folder)
        if case_id is not None:
            check_case(seen.case_id, case_id, version_folder)
        verified = is_verified(data_dir, seen.bundle.sha256)
        review = ReviewRecord(
            decision=decision.decision,
            reviewer=reviewer,
            signed_at=datetime.now(UTC).isoformat(timespec="seconds"),
            reviewed_version=seen.version,
            reason=reason,
            waited_for=waiting_reasons(seen, bundle_verified=verified),
            confirmed=decision.confirmed,
        )
        folder, result = write_reviewed_version(version_folder, review, write_pdf=write_pdf)
    except (ResultError, ResultWriteError, WrongCaseError) as exc:
        raise ReviewError(str(exc)) from None
    except PermissionError as exc:
        raise ReviewError(
            f"no permission to write the result folder {Path(exc.filename or version_folder)}: "
            "the site gives the technicians' group write access to the outbox"
        ) from None
    except OSError as exc:
        raise ReviewError(f"the sign-off could not be written: {exc.strerror or exc}") from None
    try:
        audit.record(
            "signed_off",
            case=result.case_id,
            reviewed_version=review.reviewed_version,
            version=result.version,
            decision=review.decision,
            reviewer=review.reviewer,
            reason=review.reason,
            waited_for=list(review.waited_for),
            **({"confirmed": dump(review.confirmed)} if review.confirmed is not None else {}),
            result_dir=str(folder.path),
            result_files=result_file_hashes(folder.path),
            bundle_sha256=result.bundle.sha256,
        )
    except OSError as exc:
        raise ReviewError(
            f"the sign-off is version {result.version} of case {result.case_id}, but the audit "
            f"trail {audit.path} could not be written: {exc.strerror or exc}"
        ) from None
    add_to_case_index(folder.path, data_dir)
    fhir = None
    if fhir_outbox is not None:
        try:
            fhir = write_fhir_report(result, folder.path, fhir_outbox)
        except OSError as exc:  # the sign-off stands; `cytoedge fhir` writes it again
            log.error("FHIR document for %s not written: %s", result.case_id, exc)
    return SignedOff(folder, result, fhir)
