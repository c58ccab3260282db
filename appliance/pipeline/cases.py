"""A case from its processed slides: the cell head's differential, the case heads
over their bags, the decision whether a call can be made, and the next version of
the case's result folder.

``score_case`` is what the service and ``cytoedge score`` call once a case's slides
are processed (``appliance.pipeline.slides.process_slide``); it reads each slide's cached
cells, so scoring a case again after a late slide costs only the heads.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.pipeline.bags import CaseBag
from appliance.pipeline.case_outputs import CaseViews
from appliance.pipeline.cell_folders import CELL_FOLDER_FORMAT
from appliance.pipeline.differential import burden, classify, differential
from appliance.pipeline.patients import embed_patient
from appliance.pipeline.progress import ProgressCallback, StageTimer, no_progress
from appliance.pipeline.slides import SlideResult
from appliance.results import (
    SCHEMA_VERSION,
    BundleRecord,
    CaseContent,
    CaseOutputs,
    CaseResult,
    FindingRecord,
    HeadRecord,
    PredictionRecord,
    ResultFolder,
    SignerRecord,
    cells_of,
    write_case_result,
)
from appliance.results.case_index import CaseIndex
from appliance.results.schema import SimilarCase
from runtime.backends import RuntimeSettings
from runtime.bundle_format import Bundle
from runtime.bundle_signer import read_record
from runtime.head_kinds import INDETERMINATE
from runtime.heads import HeadResult, load_heads

TOP_FRACTION = 0.2  # the paper's explainability figure: the top 20 % of cells hold ~68 %
INPUT_WORDS = {
    "scans": "slide scans",
    "fields": "camera field photos",
    "cells": "single-cell folders",
}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredCase:
    """A case as written: its result and the folder of that version."""

    result: CaseResult
    folder: ResultFolder
    slides: tuple[SlideResult, ...]

    @property
    def case_id(self) -> str:
        return self.result.case_id

    @property
    def version(self) -> int:
        return self.result.version


def score_case(
    case_id: str,
    slides: Sequence[SlideResult],
    bundle: Bundle,
    outbox: Path,
    *,
    settings: RuntimeSettings | None = None,
    progress: ProgressCallback = no_progress,
    write_pdf: bool = True,
    case_index: CaseIndex | None = None,
) -> ScoredCase:
    """Run the bundle's heads over the cells of the case's slides; write version N+1.

    With a patient encoder the case gets its patient embedding, and with ``case_index``
    (the site's, for that encoder) the signed-off cases nearest to it, then joins the
    index itself."""
    if not slides:
        raise ValueError("a case needs at least one slide")
    timer = StageTimer(progress)
    progress("heads", 0.0)
    passed = [s for s in slides if s.qc_passed]
    with timer.stage("load cells"):
        kept = {s.slide_id: s.cells() for s in passed}
    calls = (
        {sid: classify(bundle, c.class_probabilities) for sid, c in kept.items()}
        if bundle.cell_head is not None
        else {}
    )
    qc_failures = [f"{s.slide_id}: {s.qc_reason}" for s in slides if not s.qc_passed]
    inputs = case_inputs(slides)
    heads = bundle.heads_for(inputs)
    bag = CaseBag.of(bundle, kept, heads)
    found = differential(bundle, list(calls.values()))
    load = burden(bundle, found, inputs)
    below = load is not None and load.below and load.rule != "off"
    warnings = (load.sentence(),) if below and load.rule == "warn" else ()

    head_results: list[HeadResult] = []
    attention = np.zeros(bag.size, np.float32)
    backend = slides[0].backend
    no_head = (
        None
        if heads
        else f"no head of bundle {bundle.name} {bundle.version} scores {inputs_words(inputs)}"
    )
    outside = load.sentence() if below and load.rule == "abstain" else None
    runnable = not no_head and not outside and len(qc_failures) < len(slides)
    patient = None
    if bundle.patient_encoder is not None:
        with timer.stage("patient embedding"):
            patient = embed_patient(bundle, kept, settings)
    if runnable and bag.smallest >= bundle.cells.min_cells:
        with timer.stage("heads"):
            runners = load_heads(bundle, settings, inputs)
            try:
                for name, runner in runners.items():
                    if runner.reads_patient:  # its bag's cells made the patient embedding
                        assert patient is not None
                        head_results.append(runner.predict(patient[0][None]))
                        continue
                    result = runner.predict(bag.features(name))
                    head_results.append(result)
                    bag.add_attention(name, result.attention)
                backend = next(iter(runners.values())).backend_name
            finally:
                for runner in runners.values():
                    runner.close()
        attention = bag.attention()
    progress("heads", 1.0)
    similar: tuple[SimilarCase, ...] = ()
    if case_index is not None and patient is not None:
        try:
            similar = case_index.similar(patient[0], exclude_case=case_id)
        except OSError as exc:  # derived data: the case is scored without its neighbours
            log.error("case index %s unreadable: %s", case_index.directory, exc)

    records = tuple(head_record(h) for h in head_results)
    smallest = min(bag.sizes, key=bag.sizes.__getitem__)
    reason = abstain_reason(
        bag.smallest,
        bundle.cells.min_cells,
        qc_failures,
        len(slides),
        [p for h in records for p in h.predictions],
        no_head=no_head,
        outside=outside,
        of_classes=bundle.head(smallest).bag_classes if heads else (),
    )
    attended = any(len(h.attention) for h in head_results)  # a patient probe attends none
    views = CaseViews(bundle, passed, kept, calls, bag, attention, attended=attended)
    top = views.top_cells() if attended else []
    gallery = views.cell_gallery()
    draft = CaseResult(
        schema_version=SCHEMA_VERSION,
        case_id=case_id,
        version=0,  # the writer numbers it
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        status="abstained" if reason else "scored",
        abstain_reason=reason,
        bundle=bundle_record(bundle),
        backend=backend,
        scans=tuple(views.scan_record(s) for s in slides),
        heads=records,
        top_cells=tuple(cell for cell, _, _ in top),
        attention_top20_mass=top_attention_mass(attention) if attended and bag.size else None,
        timings_s={**_slide_timings(slides), **timer.rounded()},
        outputs=CaseOutputs(report_html="report.html", cells_geojson="cells.geojson"),
        differential=found,
        burden=load,
        warnings=warnings,
        cell_gallery=tuple(cell for cell, _ in gallery),
        patient_embedding=patient[1] if patient is not None else None,
        similar_cases=similar,
    )
    content = CaseContent(
        result=draft,
        slides=views.slide_contents(),
        gallery_patches=[patch for _, patch, _ in top],
        gallery_captions=[caption for _, _, caption in top],
        cell_gallery_patches=[patch for _, patch in gallery],
        embeddings=views.embeddings(),
        patient_embedding=patient[0] if patient is not None else None,
    )
    progress("write", 0.0)
    folder, result = write_case_result(outbox, content, write_pdf=write_pdf)
    if case_index is not None:
        try:
            case_index.add(folder.path)
        except OSError as exc:  # the version stands; a rebuild of the index takes it in
            log.error("case %s not added to the case index: %s", case_id, exc)
    progress("write", 1.0)
    log.info(
        "case %s scored: %s (version %d)",
        case_id,
        f"abstained: {reason}" if reason else result.status,
        result.version,
        extra={"case": case_id, "status": result.status, "cells": bag.size},
    )
    return ScoredCase(result, folder, tuple(slides))


def bundle_record(bundle: Bundle) -> BundleRecord:
    """The bundle as a result names it, with its signer as its installation recorded."""
    signed = read_record(bundle.path)
    signer = signed.signer
    return BundleRecord(
        bundle.name,
        bundle.version,
        bundle.sha256,
        bundle.intended_use,
        SignerRecord(signer.name, signer.fingerprint) if signer else None,
        signed.warning,
    )


def slide_input(slide: SlideResult) -> str:
    """The kind of input a slide is (``runtime.bundle_format.INPUT_KINDS``)."""
    if slide.scan.format == CELL_FOLDER_FORMAT:
        return "cells"
    return "fields" if slide.scan.fields is not None else "scans"


def case_inputs(slides: Sequence[SlideResult]) -> frozenset[str]:
    """The kinds of the case's slides: a head scores the case when it takes all of them."""
    return frozenset(slide_input(s) for s in slides)


def inputs_words(kinds: Collection[str]) -> str:
    """ "slide scans", or "slide scans and single-cell folders together"."""
    words = [INPUT_WORDS[k] for k in INPUT_WORDS if k in kinds]
    return words[0] if len(words) == 1 else " and ".join(words) + " together"


def top_attention_mass(attention: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """Share of the attention held by the top ``fraction`` of cells (paper: about 0.68)."""
    a = np.sort(np.asarray(attention, dtype=float))[::-1]
    if a.size == 0 or a.sum() <= 0:
        return 0.0
    k = max(1, int(np.ceil(fraction * a.size)))
    return float(a[:k].sum() / a.sum())


def abstain_reason(
    n_cells: int,
    min_cells: int,
    qc_failures: Sequence[str],
    n_slides: int,
    predictions: Sequence[PredictionRecord],
    *,
    no_head: str | None = None,
    outside: str | None = None,
    of_classes: Sequence[str] = (),
) -> str | None:
    """Why the case gets no call, or None when it can be scored.

    ``qc_failures`` lists "<slide>: <reason>" for slides that failed QC; they
    contribute no cells. The case abstains when no slide passed QC, when no head
    of the bundle scores its kind of input (``no_head`` says so), when its plasma
    cells are below the burden the bundle abstains under (``outside`` says so), when
    too few cells remain in a head's bag (``of_classes``: the classes it reads), or
    when every task came out indeterminate.
    """
    if qc_failures and len(qc_failures) >= n_slides:
        return "slide QC failed: " + "; ".join(qc_failures)
    if no_head:
        return no_head
    if outside:
        return outside
    if n_cells < min_cells:
        cells = f"{n_cells} {cells_of(of_classes)}" if of_classes else str(n_cells)
        return f"too few cells: {cells} (the bundle needs at least {min_cells})"
    if predictions and all(p.call == INDETERMINATE for p in predictions):
        return "all tasks indeterminate (every probability is within the band around its threshold)"
    return None


def head_record(result: HeadResult) -> HeadRecord:
    """A head's outcome as result.json keeps it."""
    return HeadRecord(
        name=result.head,
        kind=result.kind,
        probabilities=dict(result.probabilities),
        predictions=tuple(PredictionRecord(**dataclasses.asdict(p)) for p in result.predictions),
        findings=tuple(FindingRecord(**dataclasses.asdict(f)) for f in result.findings),
    )


def _slide_timings(slides: Sequence[SlideResult]) -> dict[str, float]:
    total: dict[str, float] = {}
    for slide in slides:
        for stage, seconds in slide.timings_s.items():
            total[stage] = round(total.get(stage, 0.0) + seconds, 3)
    return total
