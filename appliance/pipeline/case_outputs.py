"""What a scored case's result folder shows of its cells: each scan's record with what
its bag left out, the slides' tables (every kept cell, with the heads' attention for
the cells in their bag and the cell head's call), the cells that weighed most, the
crops of classified cells by class and of the unsure ones, and the bag's embeddings."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from appliance.pipeline.bags import CaseBag
from appliance.pipeline.cells import CellCallLabels, csv_with_calls, geojson_with_calls
from appliance.pipeline.slide_cache import SlideCells
from appliance.pipeline.slides import SlideResult
from appliance.results import GALLERY_CELLS, GalleryCell, ScanRecord, SlideContent, TopCell
from runtime.bundle_format import Bundle
from runtime.head_kinds import CellCalls

CLASS_GALLERY_CELLS = 12  # per class, the most confident
UNSURE_GALLERY_CELLS = 40  # the least confident first: what a person should look at
UNSURE_FOLDER = "unsure"


class CaseViews:
    """The case's cells as the result folder shows them (see the module)."""

    def __init__(
        self,
        bundle: Bundle,
        passed: Sequence[SlideResult],
        kept: Mapping[str, SlideCells],
        calls: Mapping[str, CellCalls],
        bag: CaseBag,
        attention: np.ndarray,
        *,
        attended: bool,
    ) -> None:
        self.bundle, self.passed, self.kept, self.calls = bundle, passed, kept, calls
        self.bag, self.attention, self.attended = bag, attention, attended
        self.classes = bundle.cell_classes

    def scan_record(self, slide: SlideResult) -> ScanRecord:
        """The scan as the case used it: ``cells`` in the bag, the rest set aside (beyond
        its share of the case's budget) or of other classes."""
        sid = slide.slide_id
        if sid not in self.kept:
            return slide.scan
        kept = len(self.kept[sid].embeddings)
        used = len(self.bag.union[sid])
        candidates = len(self.bag.candidates[sid])
        return dataclasses.replace(
            slide.scan,
            cells=used,
            cells_set_aside=candidates - used,
            cells_other_classes=kept - candidates,
        )

    def _labels(self, sid: str) -> CellCallLabels | None:
        calls = self.calls.get(sid)
        if calls is None:
            return None
        taxonomy = self.bundle.cell_head.params.taxonomy  # type: ignore[union-attr]
        names = [self.classes[i] for i in calls.classes]
        return CellCallLabels(
            names=names,
            labels=[taxonomy.cell_class(n).label for n in names],
            colours=[taxonomy.cell_class(n).colour for n in names],
            confidence=calls.confidence,
            sure=calls.sure,
        )

    def _bag_attention(self, sid: str) -> np.ndarray:
        start = self.bag.start[sid]
        return self.attention[start : start + len(self.bag.union[sid])]

    def slide_contents(self) -> list[SlideContent]:
        """Per slide: its picture, the heatmap of its cells in the bag, and its tables."""
        contents = []
        for slide in self.passed:
            sid = slide.slide_id
            cells = self.kept[sid]
            # No head attended (none ran, or a probe on the patient embedding): the
            # heatmap is the bare thumbnail, not a field of cells all marked low.
            union = self.bag.union[sid] if self.attended else np.zeros(0, np.int64)
            share = self._bag_attention(sid) if self.attended else np.zeros(0, np.float32)
            every = np.full(len(cells.embeddings), np.nan)  # NaN: outside the heads' bag
            every[union] = share
            shown = every if self.attended else None
            labels = self._labels(sid)
            contents.append(
                SlideContent(
                    slide_id=sid,
                    thumbnail=cells.thumbnail,
                    thumbnail_scale=cells.thumbnail_scale,
                    cell_xy=cells.xy[union],
                    attention=share,
                    cells_csv=csv_with_calls(cells.table_csv, shown, labels),
                    geojson=geojson_with_calls(cells.geojson, sid, shown, labels),
                )
            )
        return contents

    def _call(self, sid: str, index: int) -> tuple[str | None, float | None, bool | None]:
        calls = self.calls.get(sid)
        if calls is None:
            return None, None, None
        return (
            self.classes[int(calls.classes[index])],
            round(float(calls.confidence[index]), 4),
            bool(calls.sure[index]),
        )

    def top_cells(self) -> list[tuple[TopCell, np.ndarray, str]]:
        """The cells that weighed most, in rank order: (record, crop, gallery caption)."""
        top = []
        for rank, position in enumerate(np.argsort(-self.attention)[:GALLERY_CELLS], start=1):
            sid, index = self.bag.owner(int(position))
            cells = self.kept[sid]
            x, y = (float(v) for v in cells.xy[index])
            cell_id = int(cells.cell_ids[index])
            cell_class, confidence, sure = self._call(sid, index)
            weight = float(self.attention[position])
            record = TopCell(
                rank=rank,
                slide=sid,
                cell_id=cell_id,
                x=x,
                y=y,
                attention=weight,
                image=f"top_cells/{rank:02d}.png",
                cell_class=cell_class,
                confidence=confidence,
                sure=sure,
            )
            caption = f"#{rank} a={weight:.4f}\n{sid[:14]} cell {cell_id}"
            top.append((record, np.asarray(cells.patches[index]), caption))
        return top

    def cell_gallery(self) -> list[tuple[GalleryCell, np.ndarray]]:
        """Crops of classified cells: per class the most confident, and the unsure ones,
        least confident first (none without a cell head)."""
        if not self.calls:
            return []
        rows = [
            (sid, index, int(calls.classes[index]), float(calls.confidence[index]))
            for sid, calls in self.calls.items()
            for index in range(len(calls.classes))
        ]
        sure = [bool(self.calls[sid].sure[index]) for sid, index, _, _ in rows]
        chosen = []
        for class_index, name in enumerate(self.classes):
            mine = [r for r, ok in zip(rows, sure, strict=True) if ok and r[2] == class_index]
            mine.sort(key=lambda r: -r[3])
            chosen += [(r, name, True) for r in mine[:CLASS_GALLERY_CELLS]]
        unsure = [r for r, ok in zip(rows, sure, strict=True) if not ok]
        unsure.sort(key=lambda r: r[3])
        chosen += [(r, UNSURE_FOLDER, False) for r in unsure[:UNSURE_GALLERY_CELLS]]
        gallery, numbers = [], dict.fromkeys([*self.classes, UNSURE_FOLDER], 0)
        for (sid, index, class_index, confidence), folder, is_sure in chosen:
            numbers[folder] += 1
            cells = self.kept[sid]
            record = GalleryCell(
                slide=sid,
                cell_id=int(cells.cell_ids[index]),
                cell_class=self.classes[class_index],
                confidence=round(confidence, 4),
                sure=is_sure,
                image=f"cells/{folder}/{numbers[folder]:02d}.png",
            )
            gallery.append((record, np.asarray(cells.patches[index])))
        return gallery

    def embeddings(self) -> dict[str, np.ndarray]:
        """embeddings.npz: every cell of the bag in bag order, with its attention and
        place (and its class and confidence with a cell head)."""
        if not self.kept:
            return {}
        union = self.bag.union
        arrays = {
            "embeddings": np.concatenate([c.embeddings[union[s]] for s, c in self.kept.items()]),
            "attention": self.attention,
            "slide": np.array([s for s in self.kept for _ in union[s]]),
            "cell_id": np.concatenate([c.cell_ids[union[s]] for s, c in self.kept.items()]),
            "xy": np.concatenate([c.xy[union[s]] for s, c in self.kept.items()]),
        }
        if self.calls:
            arrays["cell_class"] = np.array(
                [self.classes[i] for s in self.kept for i in self.calls[s].classes[union[s]]]
            )
            arrays["class_confidence"] = np.concatenate(
                [self.calls[s].confidence[union[s]] for s in self.kept]
            )
        return arrays
