"""Earlier synthetic cases for the demo's similar-case retrieval.

A site's case index holds the cases it signed off before; a fresh demo data directory
holds none, so the demo patient would have no similar earlier cases to show. Before
it scores the demo patient, ``cytoedge demo`` writes a few earlier myeloma patients
(one smear each, hidden marker labels drawn as the training cohort's are: each
marker positive on half of them), scores them as it scores its own cases
(``score_inputs``, which adds them to the site's case index), and signs each off
through the sign-off code a reviewer's sign-off runs, with the markers its smear was
drawn with as the confirmed FISH findings. The demo patient's result then lists the
nearest of them with what was "confirmed" for them.

Their ids (``demo-earlier-01`` ...), the reviewer and the diagnosis say they are
synthetic. A case whose latest version is signed off and was embedded by the bundle's
patient encoder is left as it is, so running the demo again adds nothing; after a
rebuilt bundle they are scored and signed off again (a new version each). No FHIR
document is written for them: synthetic cases never go to the laboratory system.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from appliance.cli.score_command import ScoreRun, score_inputs
from appliance.config import Config
from appliance.pipeline.patients import patient_encoder_sha256
from appliance.results import ConfirmedFindings, latest_version
from appliance.results.case_index import row_of
from appliance.review.sign_off import ReviewError, SignOff, sign_off
from appliance.service.audit import AUDIT_FILE, AuditLog
from appliance.service.service import software_version
from cytoedge_demo import synthetic
from runtime.bundle_format import Bundle
from runtime.labels import MYELOMA_MARKERS

CASE_PREFIX = "demo-earlier-"
CASES = 10
DIAGNOSIS = "multiple myeloma (synthetic)"
REVIEWER = "Demo reviewer (synthetic)"
SEED = 20261206  # apart from the cohorts' and the demo patient's smears
SLIDE_PX = 768  # as the training cohort's smears (DemoRecipe.slide_px)


@dataclass(frozen=True)
class EarlierCase:
    case_id: str
    scan: Path
    markers: tuple[str, ...]  # the markers the smear was drawn with: its confirmed FISH


@dataclass(frozen=True)
class EarlierCases:
    signed: tuple[str, ...]  # signed off by this run
    kept: tuple[str, ...]  # signed off before, with this patient encoder


def earlier_labels(count: int, seed: int = SEED) -> list[dict[str, bool]]:
    """Each marker positive on half the cases (rounded up), in an order of its own."""
    rng = np.random.default_rng(seed)
    columns = [rng.permutation(np.arange(count) % 2 == 0) for _ in MYELOMA_MARKERS]
    return [{m: bool(columns[t][i]) for t, m in enumerate(MYELOMA_MARKERS)} for i in range(count)]


def write_earlier_scans(
    folder: Path,
    count: int = CASES,
    *,
    seed: int = SEED,
    nucleated_per_mm2: float,
    plasma_fraction: float,
) -> list[EarlierCase]:
    """One smear per earlier case under ``folder`` (kept when already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for index, labels in enumerate(earlier_labels(count, seed)):
        case_id = f"{CASE_PREFIX}{index + 1:02d}"
        path = folder / f"{case_id}.tif"
        if not path.is_file():
            spec = synthetic.SmearSpec(
                width=SLIDE_PX,
                height=SLIDE_PX,
                seed=seed + index,
                labels=labels,
                nucleated_per_mm2=nucleated_per_mm2,
                plasma_fraction=plasma_fraction,
            )
            synthetic.write_smear(path, spec)
            synthetic.truth_path(path).unlink(missing_ok=True)
        markers = tuple(m for m in MYELOMA_MARKERS if labels[m])
        cases.append(EarlierCase(case_id, path, markers))
    return cases


def is_signed_off(outbox: Path, case_id: str, encoder_sha256: str) -> bool:
    """True when the case's latest version is signed off and holds an embedding of
    this patient encoder: it is in the case index as a similar case could be."""
    latest = latest_version(outbox, case_id)
    found = row_of(latest.path) if latest is not None else None
    return found is not None and bool(found[0].decision) and found[1] == encoder_sha256


def confirmed_findings(case: EarlierCase) -> ConfirmedFindings:
    return ConfirmedFindings(diagnosis=DIAGNOSIS, fish=case.markers)


def add_earlier_cases(
    cases: Sequence[EarlierCase], bundle: Bundle, config: Config, console: Console
) -> EarlierCases:
    """Score the earlier cases not yet signed off with the bundle's patient encoder into
    the site's case index and sign each off, accepted, with its confirmed markers."""
    if bundle.patient_encoder is None:
        return EarlierCases((), ())
    sha = patient_encoder_sha256(bundle)
    kept = tuple(c.case_id for c in cases if is_signed_off(config.outbox, c.case_id, sha))
    todo = [case for case in cases if case.case_id not in kept]
    if not todo:
        return EarlierCases((), kept)
    console.print(f"Scoring and signing off {len(todo)} earlier synthetic cases")
    run = score_inputs([(c.case_id, [c.scan]) for c in todo], bundle, config, console)
    audit = AuditLog(
        config.state_dir / AUDIT_FILE,
        max_bytes=config.audit.max_bytes,
        software_version=software_version(),
        source="demo",
    )
    by_id = {case.case_id: case for case in todo}
    signed = []
    for scored in run.cases:
        findings = confirmed_findings(by_id[scored.case_id])
        decision = SignOff("accepted", REVIEWER, confirmed=findings)
        try:
            sign_off(
                scored.folder.path,
                decision,
                data_dir=config.data_dir,
                audit=audit,
                fhir_outbox=None,
                case_id=scored.case_id,
            )
        except ReviewError as exc:
            console.print(f"{scored.case_id}: not signed off, so not a similar case: {exc}")
            continue
        signed.append(scored.case_id)
    return EarlierCases(tuple(signed), kept)


def similar_summary(run: ScoreRun, earlier: EarlierCases, case_id: str) -> str:
    """One line on the similar earlier cases ``case_id``'s result lists."""
    signed = len(earlier.signed) + len(earlier.kept)
    ready = f"{signed} earlier synthetic cases signed off ({len(earlier.signed)} by this run)"
    scored = next((case.result for case in run.cases if case.case_id == case_id), None)
    if scored is None:
        return f"{ready}; {case_id} has no result to compare"
    similar = scored.similar_cases
    if not similar:
        return f"{ready}; {case_id}: no similar earlier case (no patient embedding)"
    nearest = similar[0]
    fish = ", ".join(nearest.fish) or "no marker"
    return (
        f"{ready}; {case_id}: {len(similar)} similar earlier cases, nearest {nearest.case_id} "
        f"(similarity {nearest.similarity:.3f}, FISH {fish}): the window's Similar tab"
    )
