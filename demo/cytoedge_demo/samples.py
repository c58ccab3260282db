"""A sample queue and sample result folders, for the screenshots and the window's tests.

The results are written by the appliance's own result writer and the queue by
the service's own job store, so the window is shown exactly what the service
would leave behind. The pictures are drawn here (pale smear, purple
nuclei): they illustrate the layout and are labelled as a demo bundle.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from appliance.results import (
    SCHEMA_VERSION,
    BundleRecord,
    CaseContent,
    CaseOutputs,
    CaseResult,
    FindingRecord,
    HeadRecord,
    PredictionRecord,
    QcRecord,
    ResultFolder,
    ScanRecord,
    SlideContent,
    TopCell,
    read_result,
    write_case_result,
)
from appliance.service.store import STORE_FILE, JobStore
from appliance.site.verification import VerificationRecord, write_verification
from runtime.bundle_format import HeadSpec
from runtime.labels import MYELOMA_MARKERS, PB_CLASSES
from runtime.typed_json import parse_section

KINDS = ("mm_positive", "mm_negative", "abstained", "qc_failed", "pb", "research")
BAND = 0.05
SAMPLE_BUNDLE_SHA256 = "3f9c1e0b" * 8


@dataclass(frozen=True)
class SampleCase:
    key: str
    state: str
    minutes_ago: float
    slides: tuple[str, ...]
    kind: str | None = None  # the result written for done / rejected cases
    stage: str = ""
    progress: float = 0.0
    reason: str = ""
    attempts: int = 1


SAMPLE_QUEUE = (
    SampleCase(
        "MM-2611-0418",
        "running",
        1,
        ("0418_1.svs", "0418_2.svs", "0418_3.svs"),
        stage="segmentation",
        progress=0.42,
    ),
    SampleCase("MM-2611-0417", "queued", 3, ("0417_1.svs", "0417_2.svs")),
    SampleCase("PB-2611-0102", "waiting", 4, ("PB-0102 cells",)),
    SampleCase(
        "MM-2611-0416", "done", 26, ("0416_1.svs", "0416_2.svs", "0416_3.svs"), kind="mm_positive"
    ),
    SampleCase(
        "MM-2611-0415",
        "rejected",
        48,
        ("0415_1.svs",),
        kind="qc_failed",
        reason="QC failed: 71 % of tiles blurred",
    ),
    SampleCase("PB-2611-0101", "done", 75, ("PB-0101 cells",), kind="pb"),
    SampleCase("MM-2611-0414", "done", 110, ("0414_1.svs", "0414_2.svs"), kind="mm_negative"),
    SampleCase("MM-2611-0413", "done", 1540, ("0413_1.svs",), kind="abstained"),
    SampleCase(
        "MM-2611-0412",
        "failed",
        1580,
        ("0412_1.svs",),
        reason="cannot read 0412_1.svs: truncated file",
        attempts=3,
    ),
)


# --- pictures -----------------------------------------------------------------


def draw_cell(rng: np.random.Generator, size: int = 128, plasma_like: bool = False) -> np.ndarray:
    """One nucleated cell on a pale background, roughly as a Romanowsky stain shows it."""
    image = Image.new("RGB", (size, size), (236, 222, 226))
    draw = ImageDraw.Draw(image)
    c = size / 2 + rng.normal(0, 3, 2)
    r_cell = size * rng.uniform(0.28, 0.36)
    draw.ellipse(
        [c[0] - r_cell, c[1] - r_cell * 0.9, c[0] + r_cell, c[1] + r_cell * 0.9],
        fill=(170, 160, 205) if plasma_like else (205, 180, 200),
    )
    offset = r_cell * (0.35 if plasma_like else 0.05)
    r_nuc = r_cell * rng.uniform(0.45, 0.6)
    nx, ny = c[0] + offset, c[1] + rng.normal(0, 2)
    draw.ellipse([nx - r_nuc, ny - r_nuc, nx + r_nuc, ny + r_nuc * 0.9], fill=(92, 52, 128))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.2)), np.float32)
    pixels += rng.normal(0, 5, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def draw_thumbnail(
    rng: np.random.Generator, n_cells: int, size: int = 240, blur: float = 0.6
) -> np.ndarray:
    """A low-resolution smear: pale background, red cells, a few purple nuclei."""
    image = Image.new("RGB", (size, int(size * 0.75)), (240, 232, 234))
    draw = ImageDraw.Draw(image)
    for _ in range(900):
        x, y = rng.uniform(0, image.width), rng.uniform(0, image.height)
        draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=(226, 170, 176))
    for _ in range(n_cells):
        x, y = rng.uniform(0, image.width), rng.uniform(0, image.height)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(110, 70, 150))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(blur)))


# --- results --------------------------------------------------------------------

# The sample heads, as a bundle would list them; their calls and findings are made by
# the real head kinds from the made-up probabilities below.
MM_HEAD = parse_section(
    HeadSpec,
    {
        "name": "myeloma",
        "kind": "gated_attention_mil",
        "files": ["heads/myeloma.0.onnx"],
        "tasks": list(MYELOMA_MARKERS),
        "thresholds": dict(zip(MYELOMA_MARKERS, (0.42, 0.37, 0.47, 0.45), strict=True)),
        "indeterminate_band": BAND,
        "high_risk": ["del(17p)", "t(4;14)"],
    },
    "heads[myeloma]",
)
PB_HEAD = parse_section(
    HeadSpec,
    {
        "name": "pb-screen",
        "kind": "transformer_mil",
        "files": ["heads/pb-screen.0.onnx"],
        "classes": list(PB_CLASSES),
        "malignant_classes": list(PB_CLASSES[:6]),
        "thresholds": {"malignancy": 0.5},
        "indeterminate_band": BAND,
    },
    "heads[pb-screen]",
)


def _head(spec: HeadSpec, probabilities: dict[str, float], **extra: np.ndarray) -> HeadRecord:
    made = spec.head_kind.interpret(spec, probabilities, extra)
    return HeadRecord(
        name=spec.name,
        kind=spec.kind,
        probabilities=probabilities,
        predictions=tuple(PredictionRecord(**asdict(p)) for p in made.predictions),
        findings=tuple(FindingRecord(**asdict(f)) for f in made.findings),
    )


def _cells_table(ids: list[int], xy: np.ndarray, attention: np.ndarray, rng: Any) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["cell_id", "x", "y", "area_um2", "nc_ratio", "circularity", "confidence", "attention"]
    )
    for cell_id, (x, y), att in zip(ids, xy, attention, strict=True):
        writer.writerow(
            [
                cell_id,
                f"{x:.1f}",
                f"{y:.1f}",
                f"{rng.uniform(60, 160):.1f}",
                f"{rng.uniform(0.3, 0.8):.2f}",
                f"{rng.uniform(0.75, 0.97):.2f}",
                f"{rng.uniform(0.6, 0.99):.2f}",
                f"{att:.6f}",
            ]
        )
    return out.getvalue()


def sample_content(
    case_id: str, kind: str, slide_names: tuple[str, ...], seed: int = 0
) -> CaseContent:
    """What the pipeline would hand the result writer for one case of the given kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown sample kind {kind!r}; one of {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    rejected = kind == "qc_failed"
    few = kind == "abstained"
    slides: list[SlideContent] = []
    scans: list[ScanRecord] = []
    all_cells: list[tuple[str, int, float, float, float]] = []
    per_slide = 0 if rejected else (9 if few else int(rng.integers(180, 420)))
    for number, name in enumerate(slide_names):
        slide_id = Path(name).stem
        ids = list(range(1, per_slide + 1))
        xy = rng.uniform(200, 9000, (per_slide, 2))
        attention = rng.gamma(0.6, 1.0, per_slide)
        thumb = draw_thumbnail(rng, max(per_slide // 3, 6), blur=4.0 if rejected else 0.6)
        slides.append(
            SlideContent(
                slide_id=slide_id,
                thumbnail=thumb,
                thumbnail_scale=9400 / thumb.shape[1],
                cell_xy=xy,
                attention=attention,
                cells_csv=_cells_table(ids, xy, attention, rng),
                geojson={"type": "FeatureCollection", "features": []},
            )
        )
        qc = (
            QcRecord("fail", ("71 % of tiles blurred", "4 % of tiles cellular"), n_tiles=48)
            if rejected
            else QcRecord("pass", n_tiles=48)
        )
        scans.append(
            ScanRecord(
                slide_id=slide_id,
                path=f"/srv/cytoedge/inbox/{case_id}/{name}",
                sha256=f"{number:064x}",
                format="cells" if kind == "pb" else "openslide:aperio",
                bytes=int(rng.integers(200, 900)) * 1_000_000,
                pixel_size_um=0.25,
                qc=qc,
                cells=per_slide,
            )
        )
        all_cells += [
            (slide_id, i, x, y, a) for i, (x, y), a in zip(ids, xy, attention, strict=True)
        ]

    total = sum(a for *_, a in all_cells) or 1.0
    ranked = [] if rejected else sorted(all_cells, key=lambda c: c[4], reverse=True)[:20]
    top_cells = tuple(
        TopCell(rank, s, i, round(x, 1), round(y, 1), a / total, f"top_cells/{rank:02d}.png")
        for rank, (s, i, x, y, a) in enumerate(ranked, start=1)
    )
    heads: tuple[HeadRecord, ...] = ()
    if kind in ("mm_positive", "mm_negative", "research"):
        probabilities = (
            (0.81, 0.23, 0.44, 0.58) if kind != "mm_negative" else (0.12, 0.09, 0.31, 0.33)
        )
        heads = (_head(MM_HEAD, dict(zip(MYELOMA_MARKERS, probabilities, strict=True))),)
    if kind == "pb":
        probs = (0.46, 0.08, 0.21, 0.05, 0.04, 0.02, 0.09, 0.05)
        hemoglobin = np.array([11.2])
        heads = (_head(PB_HEAD, dict(zip(PB_CLASSES, probs, strict=True)), hemoglobin=hemoglobin),)
    result = CaseResult(
        schema_version=SCHEMA_VERSION,
        case_id=case_id,
        version=0,
        created="2026-11-26T09:30:00+00:00",
        status="rejected" if rejected else ("abstained" if few else "scored"),
        abstain_reason=(
            "slide QC failed: 71 % of tiles blurred"
            if rejected
            else ("too few cells: 9 (the bundle needs at least 50)" if few else None)
        ),
        bundle=BundleRecord(
            name="cytoedge-demo-pb" if kind == "pb" else "cytoedge-demo-mm",
            version="0.1.0",
            sha256=SAMPLE_BUNDLE_SHA256,
            intended_use="research" if kind == "research" else "demo",
        ),
        backend="ort-cpu",
        scans=tuple(scans),
        heads=heads,
        top_cells=top_cells,
        attention_top20_mass=None if rejected else 0.66,
        timings_s={"read": 4.2, "qc": 1.1, "segment": 38.0, "embed": 21.5, "heads": 0.3},
        outputs=CaseOutputs(report_html="report.html", cells_geojson="cells.geojson"),
    )
    patches = [draw_cell(rng, plasma_like=(kind == "mm_positive" and n < 12)) for n in range(20)]
    return CaseContent(
        result=result,
        slides=slides,
        gallery_patches=patches[: len(top_cells)],
        gallery_captions=[f"#{c.rank}  {c.attention:.3f}" for c in top_cells],
    )


def write_sample_result(
    outbox: Path,
    case_id: str,
    kind: str,
    slide_names: tuple[str, ...] = ("smear_1.svs",),
    *,
    seed: int = 0,
    write_pdf: bool = False,
) -> ResultFolder:
    """Write one sample result version with the appliance's result writer."""
    content = sample_content(case_id, kind, slide_names, seed)
    folder, _ = write_case_result(outbox, content, write_pdf=write_pdf)
    return folder


# --- the store --------------------------------------------------------------------


def add_case(
    store: JobStore, case: SampleCase, *, now: float, result: ResultFolder | None = None
) -> int:
    """Drive one sample case through the store's own transitions up to its state."""
    received = now - case.minutes_ago * 60
    scans = read_result(result.path).scans if result else ()
    slides = [
        store.add_waiting_slide(
            case.key,
            f"/srv/cytoedge/inbox/{case.key}/{name}",
            500_000_000,
            received,
            single=len(case.slides) == 1,
            now=received + number,
        )
        for number, name in enumerate(case.slides)
    ]
    case_id = slides[0].case_id
    if case.state == "waiting":
        return case_id
    for slide in slides:
        store.admit_slide(
            slide.id,
            fingerprint=f"sample:{case.key}:{slide.path}",
            bundle_hash="sample",
            size=slide.size,
            mtime=slide.mtime,
            now=received + 5,
        )
    if case.state == "queued":
        return case_id
    if case.state == "running":
        store.start_slide(slides[0].id, received + 10)
        store.slide_progress(slides[0].id, case.stage, case.progress)
        return case_id
    for number, slide in enumerate(slides):
        store.start_slide(slide.id, received + 10)
        if case.state == "failed":
            store.fail_slide(slide.id, case.reason, received + 20)
            continue
        cells = scans[number].cells if number < len(scans) else None
        state = "rejected" if case.kind == "qc_failed" else "done"
        store.finish_slide(slide.id, state, reason=case.reason, n_cells=cells, now=received + 20)
    store.set_case_ready(case_id, True, received + 21)
    store.promote_ready_cases(0.0, received + 22)
    store.start_case(case_id, 1, received + 23)
    if case.state == "failed":
        for attempt in range(1, case.attempts):  # earlier tries that were retried
            store.retry_case(case_id, case.reason, received + 30 * attempt, received + 24)
            store.start_case(case_id, 1, received + 30 * attempt)
        store.fail_case(case_id, case.reason, received + 30 * case.attempts)
    else:
        store.finish_case(
            case_id,
            case.state,
            reason=case.reason,
            result_version=result.version if result else None,
            result_dir=str(result.path) if result else "",
            now=received + 24,
        )
    return case_id


def write_sample_site(
    data_dir: Path, *, write_pdf: bool = False, verified: bool = True
) -> tuple[Path, Path]:
    """The sample queue and its results under a data directory: (store path, outbox).

    ``verified``: the sample bundle has a verification record, so that only the
    indeterminate, abstained and QC-failed cases wait for review."""
    store_path = data_dir / "state" / STORE_FILE
    outbox = data_dir / "outbox"
    now = time.time()
    store = JobStore(store_path)
    try:
        for seed, case in enumerate(SAMPLE_QUEUE):
            result = None
            if case.kind is not None:
                result = write_sample_result(
                    outbox, case.key, case.kind, case.slides, seed=seed, write_pdf=write_pdf
                )
            add_case(store, case, now=now, result=result)
        store.register_service(
            4242, "lab-scanner-01", "cytoedge-demo-mm 0.1.0", "ort-cpu", "0.1.0", now
        )
    finally:
        store.close()
    if verified:
        record = VerificationRecord(
            SAMPLE_BUNDLE_SHA256, "cytoedge-demo-mm", "0.1.0", "2026-11-20T09:00:00+00:00",
            "sample site", "the sample queue's bundle, as a verified one",
        )  # fmt: skip
        write_verification(data_dir, record)
    return store_path, outbox
