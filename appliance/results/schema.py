"""``result.json``: the one typed, versioned result of a case.

The pipeline builds a ``CaseResult``; the result writer stores it (``to_json``)
and the worker, the report, the window and the sample queue read it back
(``read_result`` / ``from_json``). Every field is typed and checked on reading;
an unknown key or a ``schema_version`` this code does not read is refused with
one line (``ResultError``). ``docs/result.schema.json`` is this module's JSON
Schema (``python -m appliance.results.publish_schema`` writes it), for a LIS
integrator to validate against.

Version history: 1, the first result folders (top-level ``predictions``,
``high_risk``, ``malignancy_probability``, ``top2``, ``outputs`` as a flat map);
2, each head's calls and findings under ``heads``, per-scan ``outputs``,
``review``: a person's sign-off, written as a new version of the case
(``appliance.results.review``), and field folders (``scans[].fields``,
``qc.nuclei_per_mm2``); all added to 2 before it was released; 3, the cell head's
differential (``differential``), the burden of a group of classes with the inclusion
rule (``burden``), case-level ``warnings``, the crops of classified cells
(``cell_gallery``), each top cell's class, and what a class-restricted bag left out
(``scans[].cells_other_classes``, ``examined.budget_classes`` and ``.counted``), and
who signed the bundle (``bundle.signer``) or the site's warning that no trusted key
did (``bundle.signature_warning``). A version 2 document reads as version 3 without
them. Added to 3 before it was released: the findings the laboratory confirmed, entered
at sign-off (``review.confirmed``), absent where none were entered; the case's patient
embedding (``patient_embedding``, ``outputs.patient_embedding``) and the signed-off
cases nearest to it when it was scored (``similar_cases``), for bundles with a patient
encoder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from runtime.typed_json import OMIT_NONE, SpecError, dump, json_schema, parse_section

SCHEMA_VERSION = 3
READABLE_VERSIONS = (2, 3)  # a version 2 result is a version 3 one without the cell head
RESULT_FILE = "result.json"

Status = Literal["scored", "abstained", "rejected"]
Call = Literal["positive", "negative", "indeterminate"]
Verdict = Literal["pass", "warn", "fail"]
Decision = Literal["accepted", "rejected", "sent_for_fish"]
DECISION_WORDS: dict[str, str] = {
    "accepted": "Accepted",
    "rejected": "Rejected",
    "sent_for_fish": "Sent for FISH",
}


class ResultError(ValueError):
    """A result.json that cannot be read: one line naming the file and the key."""


class FindingsError(ValueError):
    """Confirmed findings a person entered that cannot be kept; one line saying which."""


@dataclass(frozen=True)
class QcRecord:
    """A slide's quality control: the verdict and why (tile or field fractions by reason)."""

    verdict: Verdict
    reasons: tuple[str, ...] = ()
    fractions: dict[str, float] = field(default_factory=dict)
    n_tiles: int = 0  # tiles judged (a field folder: 0; its scan record counts the fields)
    nuclei_per_mm2: float | None = None  # nuclei counted by QC over the area judged


@dataclass(frozen=True)
class SlideOutputs:
    """A slide's files in the result folder, relative to it."""

    thumbnail: str
    heatmap: str
    cells_csv: str
    cells_geojson: str


def cells_of(classes: Sequence[str]) -> str:
    """ "cells", or the classes a bag reads in words: "plasma cells", "blasts or lymphocytes"."""
    if not classes:
        return "cells"
    return " or ".join(name.replace("_", " ") + "s" for name in classes)


@dataclass(frozen=True)
class ExaminedRecord:
    """How much of a scan's cellular zone was examined, and why it stopped."""

    tiles: int  # 200 x 200 um tiles visited, best first
    zone_tiles: int  # tiles in the cellular zone
    budget: int  # the bundle's cells per slide (0: no budget)
    stopped: str  # "budget": that many cells kept; "zone": every zone tile visited
    # The cell-head classes the budget counted (a class-restricted bag, e.g. plasma
    # cells), with how many of them the visit kept; empty: every kept cell counted.
    budget_classes: tuple[str, ...] = ()
    counted: int | None = None

    @property
    def fraction(self) -> float:
        return self.tiles / self.zone_tiles if self.zone_tiles else 0.0

    def sentence(self) -> str:
        """ "Examined 87 of 121 tiles of the cellular zone (72 %): ..." """
        counted = cells_of(self.budget_classes)
        why = (
            f"stopped at the bundle's budget of {self.budget} {counted}"
            if self.stopped == "budget"
            else "the whole zone"
        )
        if self.budget_classes and self.counted is not None:
            why += f" ({self.counted} {counted} kept)"
        return (
            f"Examined {self.tiles} of {self.zone_tiles} tiles of the cellular zone "
            f"({100 * self.fraction:.0f} %): {why}"
        )


@dataclass(frozen=True)
class ScanRecord:
    """One scan of the case: what it was, its QC, the cells it gave."""

    slide_id: str  # its folder under slides/ and the name top_cells[].slide uses
    path: str
    sha256: str
    format: str
    bytes: int
    pixel_size_um: float | None
    qc: QcRecord
    cells: int  # in the case's bag (what the heads saw, the rows of its cell table)
    width: int | None = None  # pixels at 0.25 um/px (a cell folder: none; fields: the sheet)
    height: int | None = None
    fields: int | None = None  # a field folder's photos (a single photo: 1); None for scans
    encoder_variant: str | None = None  # fp32 | fp16 | int8: what embedded its cells
    segmenter_variant: str | None = None  # fp32 | int8: what segmented it (None: cell folder)
    examined: ExaminedRecord | None = None  # a scan's share of its zone (not cells, fields)
    outputs: SlideOutputs | None = None  # absent when the case wrote no slide files
    cells_set_aside: int = 0  # kept cells beyond the scan's share of the case's budget
    cells_other_classes: int = 0  # kept cells of classes no head of the case reads

    @property
    def name(self) -> str:
        return Path(self.path).name or self.slide_id

    def set_aside_sentence(self) -> str | None:
        """What the case's bag left out of this scan's kept cells, or None."""
        parts = []
        if self.cells_set_aside:
            parts.append(
                f"{self.cells_set_aside} more cells were set aside: "
                "beyond this scan's share of the bundle's cell budget per case"
            )
        if self.cells_other_classes:
            parts.append(
                f"{self.cells_other_classes} kept cells are of classes the heads do not read"
            )
        return "; ".join(parts) or None


@dataclass(frozen=True)
class SignerRecord:
    """The trusted key that signed the bundle (appliance.site.bundle_trust)."""

    name: str
    fingerprint: str  # sha256 of the raw Ed25519 public key, hex


@dataclass(frozen=True)
class BundleRecord:
    """The model bundle that scored the case."""

    name: str
    version: str
    sha256: str
    intended_use: str  # demo | research | clinical
    signer: SignerRecord | None = None
    # "bundle not signed by a trusted key" when the site's policy warns about it
    signature_warning: str | None = None

    @property
    def signed_words(self) -> str | None:
        """Who signed the bundle, for a person; None when the result does not say."""
        if self.signer is not None:
            return f"signed by {self.signer.name} ({self.signer.fingerprint[:16]})"
        return self.signature_warning


@dataclass(frozen=True)
class PredictionRecord:
    """A probability called against its threshold (one bar in the window and report)."""

    task: str
    label: str
    probability: float
    threshold: float
    call: Call


@dataclass(frozen=True)
class FindingRecord:
    """A case-level statement a head's kind makes besides its calls (one row)."""

    key: str
    label: str
    call: Call | None = None
    value: float | None = None
    text: str = ""


@dataclass(frozen=True)
class HeadRecord:
    """One head's outcome: every output's probability, its calls and its findings."""

    name: str
    kind: str
    probabilities: dict[str, float]
    predictions: tuple[PredictionRecord, ...] = ()
    findings: tuple[FindingRecord, ...] = ()


@dataclass(frozen=True)
class TopCell:
    """One of the cells that weighed most, in rank order (the gallery)."""

    rank: int
    slide: str
    cell_id: int
    x: float  # pixels of the 0.25 um/px working grid from the scan's top-left
    y: float
    attention: float
    image: str  # its crop, relative to the version folder
    cell_class: str | None = None  # the cell head's class (None without one)
    confidence: float | None = None
    sure: bool | None = None  # False: below the cell head's operating point (unsure)


@dataclass(frozen=True)
class ClassCount:
    """One class of the differential: its cells and their share of the classified ones."""

    name: str
    label: str
    count: int
    percent: float  # of the classified (sure) cells
    low: float  # Wilson 95 % interval of the percent
    high: float
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class Differential:
    """Every kept cell of the slides that passed QC, classified by the bundle's cell head;
    the cells below its operating point are unsure and counted apart, for a person."""

    head: str
    taxonomy: str
    cells: int  # kept cells the cell head saw
    classified: int  # at or above the operating point
    unsure: int
    operating_point: float  # the confidence a call needs
    target_accuracy: float  # the out-of-fold accuracy the operating point was chosen for
    classes: tuple[ClassCount, ...]


@dataclass(frozen=True)
class BurdenRecord:
    """The share of a group of classes among the classified cells, against the minimum the
    bundle's models were validated on (the paper's 10 % plasma cells, IMWG)."""

    group: str  # e.g. plasma_cells
    label: str  # e.g. "Plasma cells"
    count: int
    classified: int
    percent: float
    low: float
    high: float
    minimum: float  # percent
    rule: Literal["warn", "abstain", "off"]

    @property
    def measured(self) -> bool:
        return self.classified > 0

    @property
    def below(self) -> bool:
        """Below the minimum, or not measured (no cell classified surely): either way the
        case is not shown to lie inside the burden the model was validated on."""
        return not self.measured or self.percent < self.minimum

    @property
    def outside(self) -> str | None:
        """What a share below the minimum, or none measured, means (None at or above it)."""
        if not self.below:
            return None
        if not self.measured:
            return (
                "not measured: no cell was classified surely, so the case is not shown to be "
                "inside the burden the model was validated on"
            )
        return f"below {self.minimum:.0f} %, outside the burden the model was validated on"

    def sentence(self) -> str:
        """ "Plasma cells 23.1 % (19.0-27.8 %) of 412 classified cells" and, below the
        minimum or when none was classified, what that means."""
        if not self.measured:
            return f"{self.label} {self.outside}"
        text = (
            f"{self.label} {self.percent:.1f} % ({self.low:.1f}-{self.high:.1f} %) "
            f"of {self.classified} classified cells"
        )
        return f"{text}: {self.outside}" if self.outside else text


@dataclass(frozen=True)
class GalleryCell:
    """A classified cell whose crop the result keeps: the window's gallery by class, the
    unsure cells for a person, and what a reviewer re-labels."""

    slide: str
    cell_id: int
    cell_class: str
    confidence: float
    sure: bool
    image: str  # its crop, relative to the version folder


@dataclass(frozen=True)
class CaseOutputs:
    """The case's files, relative to the version folder; absent ones were not written."""

    report_html: str
    cells_geojson: str
    report_pdf: str | None = None  # absent without PySide6 or when the printer failed
    gallery: str | None = None
    embeddings: str | None = None
    patient_embedding: str | None = None  # with a patient encoder: (embed_dim,) float32 .npy


# ISCN, loosely: each clone ("/" between clones, "//" before a donor's) is the chromosome
# count (46, 45~47, 92<4n>), the sex chromosomes (XY, X, XXYc, or idem / sl / sdl for a
# clone described from another), any abnormalities, and its cell count ([20], [cp10]).
_ISCN_CLONE = re.compile(
    r"\d{1,3}(~\d{1,3})?(<\d+n>)?,([XY?]+c?|idem|sl|sdl\d*)(,[^,\[\]/]+)*(\[(cp)?\d+\])?"
)
ISCN_EXAMPLE = "46,XY,t(11;14)(q13;q32)[20]"


def looks_like_iscn(karyotype: str) -> bool:
    """True when a karyotype reads as ISCN: each clone well formed, brackets balanced."""
    depth = 0
    for char in karyotype:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    clones = re.split(r"/{1,2}", karyotype)
    return depth == 0 and all(_ISCN_CLONE.fullmatch(clone) for clone in clones)


def _one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class ConfirmedFindings:
    """What the laboratory confirmed for the case, entered by the reviewer at sign-off:
    the labels that similar-case retrieval and the next training learn from.

    Free text as the laboratory words it, one marker or mutation per entry; the
    karyotype in ISCN. ``entered`` normalises what a person typed."""

    diagnosis: str = ""
    fish: tuple[str, ...] = ()  # FISH markers found, e.g. t(11;14), del(17p)
    karyotype: str = ""  # ISCN, e.g. 46,XY,t(11;14)(q13;q32)[20]
    mutations: tuple[str, ...] = ()  # a panel's, e.g. KRAS G12D

    @classmethod
    def entered(
        cls,
        *,
        diagnosis: str = "",
        fish: Iterable[str] = (),
        karyotype: str = "",
        mutations: Iterable[str] = (),
    ) -> ConfirmedFindings | None:
        """The findings a person typed, each entry on one line with single spaces and the
        karyotype without spaces; None when nothing was entered. FindingsError says what
        cannot be kept: an empty or repeated entry, a karyotype that is not ISCN."""
        findings = cls(
            diagnosis=_one_line(diagnosis),
            fish=tuple(_one_line(entry) for entry in fish),
            karyotype="".join(karyotype.split()),
            mutations=tuple(_one_line(entry) for entry in mutations),
        )
        if not any((findings.diagnosis, findings.fish, findings.karyotype, findings.mutations)):
            return None
        problem = findings.problem()
        if problem is not None:
            raise FindingsError(problem)
        return findings

    def problem(self) -> str | None:
        """What is wrong with these findings, in a line, or None."""
        for name, entries in (("FISH", self.fish), ("mutations", self.mutations)):
            seen: set[str] = set()
            for number, entry in enumerate(entries, 1):
                if not entry.strip():
                    return f"{name} entry {number} is empty"
                if entry.casefold() in seen:
                    return f"{name} lists {entry} twice"
                seen.add(entry.casefold())
        if self.karyotype and not looks_like_iscn(self.karyotype):
            return (
                f"karyotype {self.karyotype} does not read as ISCN: the chromosome count, "
                f"the sex chromosomes, then any abnormalities, e.g. {ISCN_EXAMPLE}"
            )
        if not any((self.diagnosis.strip(), self.fish, self.karyotype, self.mutations)):
            return "holds no finding (leave it out when none was entered)"
        return None

    def validate(self, where: str) -> None:
        problem = self.problem()
        if problem is not None:
            raise SpecError(f"{where}: {problem}")

    def lines(self) -> list[tuple[str, str]]:
        """(what, the findings) for a person, leaving out what was not entered."""
        rows = [
            ("Diagnosis", self.diagnosis),
            ("FISH", ", ".join(self.fish)),
            ("Karyotype", self.karyotype),
            ("Mutations", ", ".join(self.mutations)),
        ]
        return [(what, text) for what, text in rows if text]


@dataclass(frozen=True)
class ReviewRecord:
    """A person's sign-off of the result of one version, kept in the next version.

    ``waited_for`` is why the result waited for a person when it was signed
    (empty when it did not have to); ``reason`` is required for a rejection;
    ``confirmed`` is what the laboratory confirmed, absent when nothing was entered.
    """

    decision: Decision
    reviewer: str
    signed_at: str  # UTC, ISO 8601
    reviewed_version: int  # the version the reviewer saw; this one repeats it with the review
    reason: str = ""
    waited_for: tuple[str, ...] = ()
    confirmed: ConfirmedFindings | None = field(
        default=None,
        metadata={
            OMIT_NONE: True,
            "doc": "What the laboratory confirmed, entered at sign-off; absent when nothing was",
        },
    )

    def validate(self, where: str) -> None:
        if not self.reviewer.strip():
            raise SpecError(f"{where}.reviewer must name the person who signed")
        if self.decision == "rejected" and not self.reason.strip():
            raise SpecError(f"{where}.reason must say why the result was rejected")
        if self.reviewed_version < 1:
            raise SpecError(f"{where}.reviewed_version must be 1 or more")


@dataclass(frozen=True)
class PatientEmbeddingRecord:
    """The case's patient embedding (``outputs.patient_embedding``), and the network that
    made it: the site's case index keeps one index per patient encoder."""

    kind: str  # the bundle's patient_encoder.kind, e.g. genbloom-v
    output: str  # cls | projection
    dim: int
    encoder_sha256: str  # of its fp32 ONNX file
    cells: int  # the cells it read (after thinning to the section's max_cells)
    variant: str = "fp32"  # fp32 | fp16 | int8: what ran


@dataclass(frozen=True)
class SimilarCase:
    """A signed-off case whose patient embedding is near this one's, with what was
    confirmed for it (its review's decision and confirmed findings, when entered)."""

    case_id: str
    version: int  # its version the index held when this case was scored
    similarity: float  # cosine of the two patient embeddings
    decision: str
    diagnosis: str = ""
    fish: tuple[str, ...] = ()
    karyotype: str = ""
    mutations: tuple[str, ...] = ()

    def confirmed(self) -> str:
        """What was confirmed for it, in words ("" when nothing was entered)."""
        parts = [self.diagnosis] if self.diagnosis else []
        if self.fish:
            parts.append(f"FISH: {', '.join(self.fish)}")
        if self.karyotype:
            parts.append(f"karyotype: {self.karyotype}")
        if self.mutations:
            parts.append(f"mutations: {', '.join(self.mutations)}")
        return "; ".join(parts)


@dataclass(frozen=True)
class CaseResult:
    """The result of one case at one version: ``<outbox>/<case>/v<version>/result.json``."""

    schema_version: int
    case_id: str
    version: int  # set by the result writer as it renames the version into place
    created: str  # UTC, ISO 8601
    status: Status
    abstain_reason: str | None
    bundle: BundleRecord
    backend: str
    scans: tuple[ScanRecord, ...]
    heads: tuple[HeadRecord, ...]
    top_cells: tuple[TopCell, ...]
    attention_top20_mass: float | None
    timings_s: dict[str, float]
    outputs: CaseOutputs  # set by the result writer: the files it wrote
    review: ReviewRecord | None = None  # a person's sign-off (a version of its own)
    differential: Differential | None = None  # with a cell head
    burden: BurdenRecord | None = None  # a case of scans, when the cell head knows the group
    warnings: tuple[str, ...] = ()  # case-level, for a person (the inclusion rule's)
    cell_gallery: tuple[GalleryCell, ...] = ()
    patient_embedding: PatientEmbeddingRecord | None = None  # with a patient encoder
    similar_cases: tuple[SimilarCase, ...] = ()  # nearest signed-off cases when it was scored

    @property
    def predictions(self) -> tuple[PredictionRecord, ...]:
        return tuple(p for head in self.heads for p in head.predictions)

    @property
    def cells(self) -> int:
        return sum(scan.cells for scan in self.scans)

    @property
    def is_demo(self) -> bool:
        return self.bundle.intended_use == "demo"

    def to_json(self) -> dict[str, Any]:
        return dump(self)

    @classmethod
    def from_json(cls, data: Any) -> CaseResult:
        """Parse and check a result.json object; ResultError names the key at fault."""
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version not in READABLE_VERSIONS:
            readable = " or ".join(map(str, READABLE_VERSIONS))
            raise ResultError(
                f"schema_version {version!r} is not one this cytoedge reads ({readable}); "
                "score the case again to write it in the current form"
            )
        try:
            return parse_section(cls, data, "")
        except SpecError as exc:
            raise ResultError(str(exc)) from None

    def validate(self, where: str) -> None:
        if self.version < 1:
            raise SpecError("version must be 1 or more")


def read_result(folder: Path) -> CaseResult:
    """The result in a version folder; ResultError with one line when there is none."""
    path = Path(folder) / RESULT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultError(f"{path}: no result here") from None
    except (OSError, ValueError) as exc:
        raise ResultError(f"{path}: unreadable ({exc})") from None
    try:
        return CaseResult.from_json(data)
    except ResultError as exc:
        raise ResultError(f"{path}: {exc}") from None


def result_json_schema() -> dict[str, Any]:
    """The JSON Schema of this version of result.json (docs/result.schema.json)."""
    schema = json_schema(
        CaseResult,
        title="cytoedge result.json",
        description=(
            f"Schema version {SCHEMA_VERSION} of the result of one case "
            "(appliance/results/schema.py is the authority)."
        ),
    )
    schema["properties"]["schema_version"] = {"const": SCHEMA_VERSION}
    return schema
