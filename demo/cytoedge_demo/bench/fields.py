"""``cytoedge bench fields`` and ``cytoedge bench blur``: camera fields through the appliance.

``fields``: annotated field photos (the BCCD sample: Pascal VOC boxes labelled
WBC / RBC) scored as one field folder, per photo and overall: the annotated
white cells with a kept cell inside their box, the kept cells on white cells, on
red cells (inside an RBC box and no WBC box) and on neither, the two shares a
blood head's bag is judged by (of the kept cells, the white ones; of the white
cells, the kept ones), and seconds per field on this CPU, cold (the first folder
opens the networks) and warm (a second, uncached run). The pixel size is given;
the command prints what the red cells' boxes say it is (median box side at
7.5 um per red cell) as its check. An empty photo file is left out, and named.
With ``clear_fields`` N, each photo also gives N fields that hold no white cell (the
widest band of it clear of its white cells' boxes, mirrored to the photo's size): a
smear where most fields hold none, as a real one photographed at 100x does; every
cell kept on them is not a white cell.

``blur``: the QC blur measure on one synthetic smear at 0.25 and 0.5 um/px and
as 0.1 um/px camera photos, in focus and defocused, and on the real photos
(and their defocused copies) where given: the old rule (Laplacian variance on
the 0.25 um/px grid) against the bundle's current one (at 0.5 um/px), the
figures behind docs/qc.md's threshold.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from cytoedge_demo.bench.gemm import cpu_description

RED_CELL_UM = 7.5  # a normal red cell's diameter
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Annotations:
    wbc: dict[str, list[Box]]  # photo name -> boxes
    rbc: dict[str, list[Box]]

    @classmethod
    def read(cls, folder: Path) -> Annotations:
        wbc: dict[str, list[Box]] = {}
        rbc: dict[str, list[Box]] = {}
        for xml in sorted(folder.glob("*.xml")):
            name = xml.with_suffix(".jpg").name
            for obj in ET.parse(xml).getroot().iter("object"):
                box = obj.find("bndbox")
                if box is None:
                    continue
                corners = tuple(
                    float(box.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax")
                )
                target = {"WBC": wbc, "RBC": rbc}.get(obj.findtext("name") or "")
                if target is not None:
                    target.setdefault(name, []).append(corners)  # type: ignore[arg-type]
        return cls(wbc, rbc)

    def red_cell_um(self, pixel_size_um: float) -> float:
        """The red cells' median box side at ``pixel_size_um``: about 7.5 um if it is right."""
        sides = [(x1 - x0 + y1 - y0) / 2 for boxes in self.rbc.values() for x0, y0, x1, y1 in boxes]
        return float(np.median(sides)) * pixel_size_um


@dataclass(frozen=True)
class FieldScore:
    wbc: int  # annotated white cells
    wbc_found: int  # with a kept cell inside their box
    kept: int
    on_wbc: int
    on_rbc: int  # inside a red cell's box and no white cell's
    elsewhere: int

    @property
    def white_share(self) -> float | None:
        """Of the kept cells, the share on white cells (None without kept cells)."""
        return self.on_wbc / self.kept if self.kept else None

    @property
    def found_share(self) -> float | None:
        """Of the annotated white cells, the share with a kept cell (None without any)."""
        return self.wbc_found / self.wbc if self.wbc else None


def inside(x: float, y: float, boxes: list[Box]) -> bool:
    return any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in boxes)


def score_cells(table_csv: str, truth: Annotations, photos: list[str]) -> FieldScore:
    """Kept cells (cells.csv of a field folder: photo pixels, ``field`` column) on ``photos``
    against their boxes."""
    rows = list(csv.DictReader(io.StringIO(table_csv)))
    cells = [(r["field"], float(r["x"]), float(r["y"])) for r in rows if r["field"] in photos]
    on_wbc = sum(inside(x, y, truth.wbc.get(f, [])) for f, x, y in cells)
    on_rbc = sum(
        inside(x, y, truth.rbc.get(f, [])) and not inside(x, y, truth.wbc.get(f, []))
        for f, x, y in cells
    )
    wbc = [(f, box) for f in photos for box in truth.wbc.get(f, [])]
    found = sum(any(cf == f and inside(x, y, [box]) for cf, x, y in cells) for f, box in wbc)
    return FieldScore(len(wbc), found, len(cells), on_wbc, on_rbc, len(cells) - on_wbc - on_rbc)


def field_folder(source: Path, destination: Path, pixel_size_um: float) -> list[str]:
    """The source's readable photos as one smear's folder, with their pixel size."""
    destination.mkdir(parents=True)
    names = []
    for photo in sorted(source.glob("*.jpg")):
        if photo.stat().st_size:
            shutil.copyfile(photo, destination / photo.name)
            names.append(photo.name)
    (destination / "manifest.json").write_text(json.dumps({"pixel_size_um": pixel_size_um}))
    return names


CLEAR_MARGIN_PX = 20  # between a white cell's box and the band cut beside it


def clear_fields(folder: Path, photos: list[str], truth: Annotations, per_photo: int) -> list[str]:
    """``per_photo`` fields without a white cell from each photo of ``folder`` (named
    ``<photo>-clear-<k>.jpg``; none from a photo without a wide band clear of them)."""
    names = []
    for name in photos:
        rgb = np.asarray(Image.open(folder / name).convert("RGB"))
        band = clear_band(rgb, truth.wbc.get(name, []))
        if band is None:
            continue
        for k in range(per_photo):
            # Mirrored copies side by side, each field from another offset, every other
            # one upside down: no two fields alike.
            copies = -(-rgb.shape[1] // band.shape[1]) + 1
            strip = np.concatenate([band[:, :: (-1) ** i] for i in range(copies)], axis=1)
            start = k * 37 % band.shape[1]
            field = strip[:, start : start + rgb.shape[1]]
            field = field[::-1] if k % 2 else field
            names.append(f"{Path(name).stem}-clear-{k:02d}.jpg")
            Image.fromarray(np.ascontiguousarray(field)).save(folder / names[-1], quality=95)
    return names


def clear_band(rgb: np.ndarray, boxes: list[Box]) -> np.ndarray | None:
    """The widest band of full-height columns clear of ``boxes``, if a quarter of the
    width at least."""
    taken = np.zeros(rgb.shape[1] + 1, bool)
    taken[-1] = True  # closes a band that reaches the right edge
    for x0, _, x1, _ in boxes:
        taken[max(0, int(x0) - CLEAR_MARGIN_PX) : int(x1) + CLEAR_MARGIN_PX + 1] = True
    best, start = (0, 0), None
    for x, used in enumerate(taken):
        if not used and start is None:
            start = x
        elif used and start is not None:
            best, start = max(best, (start, x), key=lambda r: r[1] - r[0]), None
    if best[1] - best[0] < rgb.shape[1] // 4:
        return None
    return rgb[:, best[0] : best[1]]


def run_fields_bench(
    bundle_dir: Path, data: Path, pixel_size_um: float, console: Console, clear_per_photo: int = 0
) -> None:
    from appliance.pipeline.networks import SlideNetworks
    from appliance.pipeline.slides import process_slide
    from runtime.bundle_format import load_bundle

    truth = Annotations.read(data)
    bundle = load_bundle(bundle_dir)
    console.print(f"CPU: {cpu_description()}")
    console.print(f"bundle: {bundle.name} {bundle.version} ({bundle_dir})")
    console.print(
        f"pixel size {pixel_size_um} um: the red cells' median box is "
        f"{truth.red_cell_um(pixel_size_um):.2f} um across (a red cell: about {RED_CELL_UM})"
    )
    with tempfile.TemporaryDirectory(prefix="cytoedge-bench-fields-") as work:
        folder = Path(work) / "smear"
        photos = field_folder(data, folder, pixel_size_um)
        clear = clear_fields(folder, photos, truth, clear_per_photo)
        runs = []
        with SlideNetworks(bundle) as networks:
            for run in ("cold", "warm"):
                start = time.perf_counter()
                result = process_slide(folder, networks, cache_dir=Path(work) / run)
                runs.append((run, time.perf_counter() - start, result))
        table_csv = result.cells().table_csv
    empty = sorted(p.name for p in data.glob("*.jpg") if not p.stat().st_size)
    if empty:
        console.print(f"left out, empty files: {', '.join(empty)}")
    title = f"{len(photos)} field photos of {data.name}"
    if clear:
        title += f" and {len(clear)} fields cut from them without a white cell"
    scores = Table(
        title=f"{title}, as one field folder",
        caption="WBC: annotated white cells; found: those with a kept cell; on WBC / RBC: "
        "kept cells in a white cell's box / a red cell's (and no white cell's) box; "
        "WBC share: of the kept cells, those on WBC; found share: of the WBC, those found",
    )
    scores.add_column("photo", no_wrap=True)
    for column in (
        "WBC",
        "found",
        "kept",
        "on\nWBC",
        "on\nRBC",
        "other",
        "WBC\nshare",
        "found\nshare",
    ):
        scores.add_column(column, justify="right")
    rows = [(Path(p).stem, score_cells(table_csv, truth, [p])) for p in photos]
    if clear:
        rows.append((f"{len(clear)} without WBC", score_cells(table_csv, truth, clear)))
    for name, score in [*rows, ("all", score_cells(table_csv, truth, photos + clear))]:
        scores.add_row(
            name,
            str(score.wbc),
            str(score.wbc_found),
            str(score.kept),
            str(score.on_wbc),
            str(score.on_rbc),
            str(score.elsewhere),
            _share(score.white_share),
            _share(score.found_share),
            end_section=name == rows[-1][0],
        )
    console.print(scores)
    table = Table(title="QC and time")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("QC verdict", f"{result.scan.qc.verdict} {'; '.join(result.scan.qc.reasons)}")
    table.add_row("QC nuclei per mm2", f"{result.scan.qc.nuclei_per_mm2}")
    for run, seconds, outcome in runs:
        per = len(photos) + len(clear)
        table.add_row(f"seconds per field, {run}", f"{seconds / per:.2f}")
        stages = ", ".join(f"{k} {v / per:.2f}" for k, v in outcome.timings_s.items())
        table.add_row(f"  per stage ({run})", stages)
    console.print(table)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# --- the blur measure across resolutions ---------------------------------------------------


def resampled(
    rgb: np.ndarray, from_um: float, to_um: float, method: Image.Resampling
) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = from_um / to_um
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, method))


def synthetic_inputs() -> list[tuple[str, str, np.ndarray]]:
    """(input, focus, image at the 0.25 um/px working grid as the readers give it)."""
    from cytoedge_demo.synthetic import SmearSpec, render_field

    rows = []
    bilinear, box, bicubic = (
        Image.Resampling.BILINEAR,
        Image.Resampling.BOX,
        Image.Resampling.BICUBIC,
    )
    for seed, density in ((1, 480.0), (2, 2400.0), (4, 60.0)):
        for variant in ("good", "blurred"):
            spec = SmearSpec(
                width=800, height=800, seed=seed, variant=variant, nucleated_per_mm2=density
            )
            image = render_field(spec).image
            focus = "in focus" if variant == "good" else "defocused 1 um"
            rows.append(("synthetic, 0.25 um/px scan", focus, image))
            scan_05 = resampled(image, 0.25, 0.5, box)  # a 20x scanner's pixels
            rows.append(
                ("synthetic, 0.5 um/px scan", focus, resampled(scan_05, 0.5, 0.25, bilinear))
            )
            photo = resampled(image, 0.25, 0.1, bicubic)  # an oversampled 100x camera
            rows.append(
                ("synthetic, 0.1 um/px photo", focus, resampled(photo, 0.1, 0.25, bilinear))
            )
    return rows


def real_inputs(folder: Path, um: float) -> list[tuple[str, str, np.ndarray]]:
    from scipy import ndimage

    rows = []
    for photo in sorted(folder.glob("*.jpg")):
        if not photo.stat().st_size:
            continue
        rgb = np.asarray(Image.open(photo).convert("RGB"))
        for focus, sigma_um in (
            ("in focus", 0.0),
            ("defocused 0.5 um", 0.5),
            ("defocused 1 um", 1.0),
        ):
            soft = (
                ndimage.gaussian_filter(rgb, (sigma_um / um, sigma_um / um, 0)) if sigma_um else rgb
            )
            image = resampled(soft, um, 0.25, Image.Resampling.BILINEAR)
            rows.append((f"{folder.name}, {um} um/px photo", focus, image))
    return rows


def run_blur_bench(real: list[tuple[Path, float]], console: Console) -> None:
    from appliance.pipeline import qc
    from runtime.bundle_format import QcSpec

    old, new = QcSpec(), QcSpec.current()
    rules = {
        name: qc.QCParams(laplacian_min=spec.laplacian_min, blur_um_per_px=spec.blur_um_per_px)
        for name, spec in (("old", old), ("new", new))
    }
    inputs = synthetic_inputs()
    for folder, um in real:
        inputs += real_inputs(folder, um)
    found: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for name, focus, image in inputs:
        values = (qc.sharpness(image, rules["old"]), qc.sharpness(image, rules["new"]))
        found.setdefault((name, focus), []).append(values)
    title = (
        f"Laplacian variance: old rule at {old.blur_um_per_px} um/px (blurred below "
        f"{old.laplacian_min:g}), current at {new.blur_um_per_px} um/px "
        f"(below {new.laplacian_min:g})"
    )
    table = Table(title=title)
    for column in (
        "input",
        "focus",
        "n",
        "old: range",
        "old: blurred",
        "current: range",
        "current: blurred",
    ):
        table.add_column(column)
    for (name, focus), values in found.items():
        olds, news = zip(*values, strict=True)
        table.add_row(
            name,
            focus,
            str(len(values)),
            _span(olds),
            _blurred(olds, old.laplacian_min),
            _span(news),
            _blurred(news, new.laplacian_min),
        )
    console.print(table)


def _span(values: tuple[float, ...]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}"


def _blurred(values: tuple[float, ...], limit: float) -> str:
    return f"{sum(v < limit for v in values)} / {len(values)}"
