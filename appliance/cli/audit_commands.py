"""``cytoedge audit ...``: the audit trail checked against its own hash chain.

``verify`` walks every file of the trail (``appliance.service.audit_verify``) and
the result folders its records hash: one line per problem, then a summary line;
exit 0 only when everything is intact.
"""

from __future__ import annotations

import typer

from appliance.cli.shared import ConfigOption, setup

TAMPERED_EXIT = 1

audit_app = typer.Typer(
    help="The audit trail: check that no record and no result file changed since written.",
    no_args_is_help=True,
)


@audit_app.command()
def verify(config: ConfigOption = None) -> None:
    """Check the audit trail's hash chain, its files, and every result file it hashed.

    Prints the first edited, deleted or reordered record, each result file changed,
    missing or added, and a summary with the last record's hash (keep a copy of it
    elsewhere: only that copy shows lines cut from the end). Exit 0 when intact, else 1."""
    from appliance.service.audit import AUDIT_FILE
    from appliance.service.audit_verify import verify_trail

    cfg = setup(config, log_to_file=False)
    report = verify_trail(cfg.state_dir / AUDIT_FILE)
    for problem in report.problems:
        print(problem)
    print(report.summary)
    if not report.intact:
        raise typer.Exit(TAMPERED_EXIT)
