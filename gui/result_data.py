"""A case's result folder, read into plain values for the result pane.

Follows docs/DESIGN.md "Result folders": ``<outbox>/<case>/latest.json`` points
at ``v<N>/``, whose ``result.json`` lists the other outputs. Reading is
tolerant of optional parts (a rejected scan has no gallery) but a missing or
unreadable ``result.json`` is a ``ResultUnreadableError`` with a one-line reason.
No Qt here: the pane's logic is testable without a screen.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.heads import INDETERMINATE, NEGATIVE, POSITIVE, Prediction

CALLS = (POSITIVE, NEGATIVE, INDETERMINATE)
DEMO_BANNER = "Demo model, not for diagnosis"


class ResultUnreadableError(RuntimeError):
    """No usable result.json at the given place; the message is one line."""


@dataclass(frozen=True)
class SlideSummary:
    slide_id: str
    name: str
    qc_verdict: str
    qc_reasons: tuple[str, ...]
    cells: int | None
    pixel_size_um: float | None
    heatmap: Path | None
    thumbnail: Path | None
    cells_csv: Path | None

    @property
    def qc_passed(self) -> bool:
        return self.qc_verdict.lower() in ("pass", "passed", "ok")


@dataclass(frozen=True)
class TopCell:
    rank: int
    slide: str
    cell_id: str
    x: float
    y: float
    attention: float
    image: Path | None


@dataclass(frozen=True)
class CaseResult:
    folder: Path
    case_id: str
    version: int
    status: str  # scored | abstained | rejected
    abstain_reason: str
    bundle: dict[str, Any]
    backend: str
    predictions: tuple[Prediction, ...]
    high_risk: str | None  # positive | negative | indeterminate; None: not an MM head
    malignancy_probability: float | None
    top2: tuple[tuple[str, float], ...]
    slides: tuple[SlideSummary, ...]
    top_cells: tuple[TopCell, ...]
    attention_top20_mass: float | None
    timings_s: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)

    @property
    def is_demo(self) -> bool:
        return str(self.bundle.get("intended_use", "")).lower() == "demo"

    @property
    def cells_analysed(self) -> int:
        return sum(s.cells or 0 for s in self.slides)

    @property
    def report(self) -> Path | None:
        return self.outputs.get("report_pdf") or self.outputs.get("report_html")

    @property
    def gallery(self) -> Path | None:
        return self.outputs.get("gallery")

    def banners(self) -> list[tuple[str, str]]:
        """(kind, text) messages that must not be missed, most important first."""
        found: list[tuple[str, str]] = []
        if self.status == "rejected":
            found.append(("rejected", f"Rejected: {self.abstain_reason or 'scan not usable'}"))
        elif self.status == "abstained":
            found.append(("abstained", f"No call: {self.abstain_reason or 'model abstained'}"))
        if self.is_demo:
            found.append(("demo", DEMO_BANNER))
        return found


def resolve_version_folder(path: Path) -> Path:
    """A version folder from itself, its case folder (via latest.json) or a result.json."""
    if path.is_file() and path.name == "result.json":
        return path.parent
    if (path / "result.json").is_file():
        return path
    pointer = path / "latest.json"
    if pointer.is_file():
        try:
            latest = json.loads(pointer.read_text(encoding="utf-8"))
            folder = path / str(latest.get("path") or f"v{int(latest['version'])}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ResultUnreadableError(f"unreadable {pointer}: {exc}") from None
        if (folder / "result.json").is_file():
            return folder
        raise ResultUnreadableError(f"{pointer} points at {folder}, which holds no result.json")
    raise ResultUnreadableError(f"no result in {path}")


def _float(value: Any, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _optional_float(value: Any) -> float | None:
    return None if value is None else _float(value)


def _call_word(value: Any) -> str | None:
    """high_risk may be a call word or a boolean; both mean the same to a reader."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "positive" if value else "negative"
    if isinstance(value, dict):
        return _call_word(value.get("call"))
    word = str(value).lower()
    return word if word in CALLS else str(value)


def load_result(path: Path) -> CaseResult:
    """Read a result version folder (or a case folder, following latest.json)."""
    folder = resolve_version_folder(path)
    try:
        raw = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ResultUnreadableError(f"unreadable {folder / 'result.json'}: {exc}") from None
    if not isinstance(raw, dict):
        raise ResultUnreadableError(f"{folder / 'result.json'} is not a JSON object")

    outputs = {
        str(name): folder / str(rel)
        for name, rel in (raw.get("outputs") or {}).items()
        if isinstance(rel, str) and (folder / rel).exists()
    }
    slide_ids = [key.split(":")[1] for key in outputs if key.startswith("slide:")]
    slide_ids = list(dict.fromkeys(slide_ids))
    slides = []
    for position, scan in enumerate(raw.get("scans") or []):
        qc = scan.get("qc") or {}
        slide_id = str(
            scan.get("slide_id")
            or (
                slide_ids[position]
                if position < len(slide_ids)
                else Path(scan.get("path", "")).stem
            )
        )
        slides.append(
            SlideSummary(
                slide_id=slide_id,
                name=Path(str(scan.get("path", ""))).name or slide_id,
                qc_verdict=str(qc.get("verdict", "")),
                qc_reasons=tuple(str(r) for r in qc.get("reasons") or ()),
                cells=None if scan.get("cells") is None else int(scan["cells"]),
                pixel_size_um=_optional_float(scan.get("pixel_size_um")),
                heatmap=outputs.get(f"slide:{slide_id}:heatmap"),
                thumbnail=outputs.get(f"slide:{slide_id}:thumbnail"),
                cells_csv=outputs.get(f"slide:{slide_id}:cells_csv"),
            )
        )
    top_cells = []
    for rank, cell in enumerate(raw.get("top_cells") or [], start=1):
        # The writer stores crops as top_cells/NN.png in rank order; an explicit path wins.
        image = cell.get("image") or f"top_cells/{rank:02d}.png"
        image_path = (
            folder / image if isinstance(image, str) and (folder / image).is_file() else None
        )
        top_cells.append(
            TopCell(
                rank=rank,
                slide=str(cell.get("slide", "")),
                cell_id=str(cell.get("cell_id", "")),
                x=_float(cell.get("x")),
                y=_float(cell.get("y")),
                attention=_float(cell.get("attention")),
                image=image_path,
            )
        )
    predictions = tuple(
        Prediction(
            task=str(p.get("task", "")),
            label=str(p.get("label") or p.get("task", "")),
            probability=_float(p.get("probability")),
            threshold=_float(p.get("threshold"), 0.5),
            call=str(p.get("call", "")),
        )
        for p in raw.get("predictions") or []
    )
    top2 = tuple(
        (str(item.get("class", item.get("label", ""))), _float(item.get("probability")))
        for item in raw.get("top2") or []
        if isinstance(item, dict)
    )
    return CaseResult(
        folder=folder,
        case_id=str(raw.get("case_id", folder.parent.name)),
        version=int(raw.get("version") or 0),
        status=str(raw.get("status", "")),
        abstain_reason=str(raw.get("abstain_reason") or ""),
        bundle=dict(raw.get("bundle") or {}),
        backend=str(raw.get("backend") or ""),
        predictions=predictions,
        high_risk=_call_word(raw.get("high_risk")),
        malignancy_probability=_optional_float(raw.get("malignancy_probability")),
        top2=top2,
        slides=tuple(slides),
        top_cells=tuple(top_cells),
        attention_top20_mass=_optional_float(raw.get("attention_top20_mass")),
        timings_s={str(k): _float(v) for k, v in (raw.get("timings_s") or {}).items()},
        outputs=outputs,
    )


def cell_measurements(cells_csv: Path, cell_id: str) -> dict[str, str]:
    """The row of a slide's cell table for one cell (empty when not found)."""
    try:
        with cells_csv.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                key = row.get("cell_id", row.get("id"))
                if key is not None and str(key) == cell_id:
                    return {k: v for k, v in row.items() if k is not None}
    except OSError:
        return {}
    return {}
