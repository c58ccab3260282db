"""``cytoedge sign-off TARGET``: a person's sign-off of a result at a terminal.

It writes what the window's sign-off dialog writes (``appliance.review.sign_off``):
the next version of the case with the review record, the ``signed_off`` audit line
and the FHIR document. It also serves the common late step: FISH, the karyotype or
a panel arrive days after the smear, and the reviewer signs the case off again with
what the laboratory confirmed (``--fish``, ``--karyotype``, ``--mutation``,
``--diagnosis``), which the similar-case index and the next training read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import typer

from appliance.cli.shared import ConfigOption, fail, setup
from appliance.logs import console_only_warnings

if TYPE_CHECKING:
    from appliance.results.schema import Decision

REFUSED_EXIT = 1


# What a person types -> the decision the review record keeps.
DECISIONS: dict[str, Decision] = {
    "accept": "accepted",
    "reject": "rejected",
    "send-for-fish": "sent_for_fish",
}


def sign_off_command(
    target: Annotated[
        str,
        typer.Argument(
            metavar="TARGET",
            help="A case id (its latest result), a case folder or a result version folder.",
        ),
    ],
    decision: Annotated[
        Literal["accept", "reject", "send-for-fish"],
        typer.Option(help="What the reviewer decided."),
    ],
    reviewer: Annotated[
        str | None,
        typer.Option(help="Who signs (default: the login's full name)."),
    ] = None,
    reason: Annotated[str, typer.Option(help="Why (required to reject); a note.")] = "",
    diagnosis: Annotated[str, typer.Option(help="The diagnosis the laboratory confirmed.")] = "",
    fish: Annotated[
        list[str] | None,
        typer.Option(help="A FISH marker found, e.g. 't(11;14)'; repeat for each."),
    ] = None,
    karyotype: Annotated[
        str, typer.Option(help="The karyotype in ISCN, e.g. '46,XY,t(11;14)(q13;q32)[20]'.")
    ] = "",
    mutation: Annotated[
        list[str] | None,
        typer.Option(help="A mutation a panel found, e.g. 'KRAS G12D'; repeat for each."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Sign off a result: accept it, reject it with a reason or send it for FISH, and
    enter what the laboratory confirmed. Writes the case's next version, the audit line
    and the FHIR document. Exit 0 when signed, 1 with one line when refused."""
    from appliance.results import DECISION_WORDS, ConfirmedFindings, FindingsError, find_version
    from appliance.review.sign_off import ReviewError, SignOff, login_name, sign_off
    from appliance.service.audit import AUDIT_FILE, AuditLog
    from appliance.service.service import software_version

    cfg = setup(config, log_to_file=False)
    found = find_version(target, cfg.outbox)
    if found is None:
        raise fail(
            f"{target}: no result found (a case id, a case folder or a version)", REFUSED_EXIT
        )
    folder, case_id = found
    try:
        confirmed = ConfirmedFindings.entered(
            diagnosis=diagnosis, fish=fish or (), karyotype=karyotype, mutations=mutation or ()
        )
    except FindingsError as exc:
        raise fail(f"confirmed findings: {exc}", REFUSED_EXIT) from None
    choice = SignOff(DECISIONS[decision], reviewer or login_name(), reason, confirmed)
    audit = AuditLog(
        cfg.state_dir / AUDIT_FILE,
        max_bytes=cfg.audit.max_bytes,
        software_version=software_version(),
        source="sign-off",
    )
    try:
        with console_only_warnings():  # the lines below say what was written
            done = sign_off(
                folder, choice, data_dir=cfg.data_dir, audit=audit,
                fhir_outbox=cfg.fhir_outbox, case_id=case_id,
            )  # fmt: skip
    except ReviewError as exc:
        raise fail(f"{target}: {exc}", REFUSED_EXIT) from None
    except OSError as exc:  # the audit trail's folder
        raise fail(f"{target}: the sign-off could not be written: {exc}", REFUSED_EXIT) from None
    words = DECISION_WORDS[choice.decision]
    typer.echo(
        f"{done.result.case_id}: {words[0].lower()}{words[1:]} by "
        f"{choice.reviewer.strip()}, version {done.result.version} ({done.folder.path})"
    )
    if done.fhir is not None:
        typer.echo(f"FHIR: {done.fhir}")
