"""A case from its processed slides: the heads over all their cells, the decision
whether a call can be made, and the next version of the case's result folder.

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

from appliance.pipeline.cell_folders import CELL_FOLDER_FORMAT
from appliance.pipeline.cells import csv_with_attention, geojson_with_attention
from appliance.pipeline.progress import ProgressCallback, StageTimer, no_progress
from appliance.pipeline.slide_cache import SlideCells
from appliance.pipeline.slides import SlideResult
from appliance.results import (
    GALLERY_CELLS,
    SCHEMA_VERSION,
    BundleRecord,
    CaseContent,
    CaseOutputs,
    CaseResult,
    FindingRecord,
    HeadRecord,
    PredictionRecord,
    ResultFolder,
    ScanRecord,
    SlideContent,
    TopCell,
    write_case_result,
)
from runtime.backends import RuntimeSettings
from runtime.bundle_format import Bundle
from runtime.head_kinds import INDETERMINATE
from runtime.heads import HeadResult, load_heads

TOP_CELLS = GALLERY_CELLS
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
) -> ScoredCase:
    """Run the bundle's heads over all cells of the case's slides; write version N+1."""
    if not slides:
        raise ValueError("a case needs at least one slide")
    timer = StageTimer(progress)
    progress("heads", 0.0)
    with timer.stage("load cells"):
        passed = [s for s in slides if s.qc_passed]
        cells = case_cells(passed, bundle.cells.max_cells_per_case)
    qc_failures = [f"{s.slide_id}: {s.qc_reason}" for s in slides if not s.qc_passed]
    n_cells = sum(len(c.embeddings) for c in cells.values())

    head_results: list[HeadResult] = []
    attention = np.zeros(n_cells, np.float32)
    backend = slides[0].backend
    inputs = case_inputs(slides)
    no_head = (
        None
        if bundle.heads_for(inputs)
        else f"no head of bundle {bundle.name} {bundle.version} scores {inputs_words(inputs)}"
    )
    if not no_head and n_cells >= bundle.cells.min_cells and len(qc_failures) < len(slides):
        bag = np.concatenate([c.embeddings for c in cells.values()])
        with timer.stage("heads"):
            runners = load_heads(bundle, settings, inputs)
            try:
                head_results = [runner.predict(bag) for runner in runners.values()]
                backend = next(iter(runners.values())).backend_name
            finally:
                for runner in runners.values():
                    runner.close()
        attention = np.mean([h.attention for h in head_results], axis=0).astype(np.float32)
    progress("heads", 1.0)

    heads = tuple(head_record(h) for h in head_results)
    reason = abstain_reason(
        n_cells,
        bundle.cells.min_cells,
        qc_failures,
        len(slides),
        [p for h in heads for p in h.predictions],
        no_head=no_head,
    )
    top = _top_cells(passed, cells, attention) if head_results else []
    draft = CaseResult(
        schema_version=SCHEMA_VERSION,
        case_id=case_id,
        version=0,  # the writer numbers it
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        status="abstained" if reason else "scored",
        abstain_reason=reason,
        bundle=BundleRecord(bundle.name, bundle.version, bundle.sha256, bundle.intended_use),
        backend=backend,
        scans=tuple(_scan_record(s, cells.get(s.slide_id)) for s in slides),
        heads=heads,
        top_cells=tuple(cell for cell, _, _ in top),
        attention_top20_mass=top_attention_mass(attention) if n_cells else None,
        timings_s={**_slide_timings(slides), **timer.rounded()},
        outputs=CaseOutputs(report_html="report.html", cells_geojson="cells.geojson"),
    )
    content = CaseContent(
        result=draft,
        slides=_slide_contents(passed, cells, attention, scored=bool(head_results)),
        gallery_patches=[patch for _, patch, _ in top],
        gallery_captions=[caption for _, _, caption in top],
        embeddings=_embeddings(passed, cells, attention),
    )
    progress("write", 0.0)
    folder, result = write_case_result(outbox, content, write_pdf=write_pdf)
    progress("write", 1.0)
    log.info(
        "case %s scored: %s (version %d)",
        case_id,
        f"abstained: {reason}" if reason else result.status,
        result.version,
        extra={"case": case_id, "status": result.status, "cells": n_cells},
    )
    return ScoredCase(result, folder, tuple(slides))


def case_shares(counts: Sequence[int], budget: int) -> list[int]:
    """How many of each slide's cells go into the case's bag.

    All of them when they fit in ``budget`` (0: no budget); else an equal share each,
    a slide with fewer cells giving all it has and its unused share going to the others.
    """
    if budget <= 0 or sum(counts) <= budget:
        return list(counts)
    shares = [0] * len(counts)
    left = budget
    by_size = sorted(range(len(counts)), key=lambda index: counts[index])
    for done, index in enumerate(by_size):
        shares[index] = min(counts[index], left // (len(by_size) - done))
        left -= shares[index]
    return shares


def case_cells(slides: Sequence[SlideResult], budget: int) -> dict[str, SlideCells]:
    """The cells the heads see, by slide id: each slide's share of the case's budget
    (``case_shares``) from the start of its visit, which is spread over its zone.

    Scoring, training and validation all take a case's bag from here. The shares depend
    on the case's slides only, not on the order they arrived in, so a re-score after a
    late slide gives what scoring all of them at once gives.
    """
    loaded = {slide.slide_id: slide.cells() for slide in slides}
    by_id = sorted(loaded)  # equal slides share the remainder the same way in any order
    counts = [len(loaded[slide_id].embeddings) for slide_id in by_id]
    shares = dict(zip(by_id, case_shares(counts, budget), strict=True))
    return {slide_id: cells.first(shares[slide_id]) for slide_id, cells in loaded.items()}


def _scan_record(slide: SlideResult, cells: SlideCells | None) -> ScanRecord:
    """The slide's scan as the case used it: ``cells`` in the bag, the rest set aside."""
    if cells is None or len(cells.embeddings) == slide.scan.cells:
        return slide.scan
    used = len(cells.embeddings)
    return dataclasses.replace(slide.scan, cells=used, cells_set_aside=slide.scan.cells - used)


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
) -> str | None:
    """Why the case gets no call, or None when it can be scored.

    ``qc_failures`` lists "<slide>: <reason>" for slides that failed QC; they
    contribute no cells. The case abstains when no slide passed QC, when no head
    of the bundle scores its kind of input (``no_head`` says so), when too few
    cells remain, or when every task came out indeterminate.
    """
    if qc_failures and len(qc_failures) >= n_slides:
        return "slide QC failed: " + "; ".join(qc_failures)
    if no_head:
        return no_head
    if n_cells < min_cells:
        return f"too few cells: {n_cells} (the bundle needs at least {min_cells})"
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


def _slide_contents(
    slides: Sequence[SlideResult],
    cells: dict[str, SlideCells],
    attention: np.ndarray,
    scored: bool,
) -> list[SlideContent]:
    """Per-slide pictures and tables with the attention of each cell."""
    contents, start = [], 0
    for slide in slides:
        c = cells[slide.slide_id]
        share = attention[start : start + len(c.embeddings)]
        start += len(c.embeddings)
        contents.append(
            SlideContent(
                slide_id=slide.slide_id,
                thumbnail=c.thumbnail,
                thumbnail_scale=c.thumbnail_scale,
                cell_xy=c.xy,
                attention=share,
                cells_csv=csv_with_attention(c.table_csv, share if scored else None),
                geojson=geojson_with_attention(
                    c.geojson, slide.slide_id, share if scored else None
                ),
            )
        )
    return contents


def _top_cells(
    slides: Sequence[SlideResult], cells: dict[str, SlideCells], attention: np.ndarray
) -> list[tuple[TopCell, np.ndarray, str]]:
    """The cells that weighed most, in rank order: (record, crop, gallery caption)."""
    owners, start = [], 0
    for slide in slides:
        owners.append((slide.slide_id, start, cells[slide.slide_id]))
        start += len(cells[slide.slide_id].xy)
    top = []
    for rank, index in enumerate(np.argsort(-attention)[:TOP_CELLS], start=1):
        slide_id, offset, c = next(o for o in owners if o[1] <= index < o[1] + len(o[2].xy))
        local = int(index - offset)
        x, y = (float(v) for v in c.xy[local])
        cell_id = int(c.cell_ids[local])
        record = TopCell(
            rank=rank,
            slide=slide_id,
            cell_id=cell_id,
            x=x,
            y=y,
            attention=float(attention[index]),
            image=f"top_cells/{rank:02d}.png",
        )
        caption = f"#{rank} a={attention[index]:.4f}\n{slide_id[:14]} cell {cell_id}"
        top.append((record, np.asarray(c.patches[local]), caption))
    return top


def _embeddings(
    slides: Sequence[SlideResult], cells: dict[str, SlideCells], attention: np.ndarray
) -> dict[str, np.ndarray]:
    """embeddings.npz: every cell of the case in bag order, with its attention and place."""
    if not cells:
        return {}
    return {
        "embeddings": np.concatenate([cells[s.slide_id].embeddings for s in slides]),
        "attention": attention,
        "slide": np.array([s.slide_id for s in slides for _ in cells[s.slide_id].cell_ids]),
        "cell_id": np.concatenate([cells[s.slide_id].cell_ids for s in slides]),
        "xy": np.concatenate([cells[s.slide_id].xy for s in slides]),
    }
