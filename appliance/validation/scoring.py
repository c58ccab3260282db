"""A processed cohort scored with a bundle, case by case, as the service scores it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from appliance.pipeline.cases import score_case
from appliance.validation.cohort import CohortCase
from appliance.validation.measures import ValidationCase
from runtime.backends import RuntimeSettings
from runtime.bundle_format import Bundle


def lost_scans(case: CohortCase) -> tuple[str, ...]:
    return tuple(f"{path.name}: {reason}" for path, reason in case.rejected)


def score_cohort(
    cohort: Sequence[CohortCase],
    bundle: Bundle,
    outbox: Path,
    settings: RuntimeSettings | None = None,
) -> list[ValidationCase]:
    """Each case through ``appliance.pipeline.cases.score_case`` (its result folder written to
    ``outbox``, without the PDF); a case whose every scan was rejected is kept as
    rejected, with the readers' reasons."""
    scored = []
    for case in cohort:
        if not case.slides:
            scored.append(
                ValidationCase(
                    case.case_id,
                    case.case.labels,
                    "rejected",
                    case.left_out(bundle.cells.min_cells),
                    rejected_scans=lost_scans(case),
                )
            )
            continue
        result = score_case(
            case.case_id, case.slides, bundle, outbox, settings=settings, write_pdf=False
        ).result
        scored.append(
            ValidationCase(
                case.case_id,
                case.case.labels,
                result.status,
                result.abstain_reason,
                {head.name: head for head in result.heads},
                lost_scans(case),
            )
        )
    return scored
