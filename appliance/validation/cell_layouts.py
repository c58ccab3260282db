"""The three layouts labelled cells come in, read and checked before any image is
processed (``labelled_cells`` embeds what they name; docs/cells.md, "Labelled cells: the
three layouts"): class folders of crops, a points table, a folder of images with
QuPath GeoJSON exports. Anything that cannot be used is ``LabelledCellsError``, one
line naming the file and the row. No network runs here.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.readers import CellFolderError, formats, open_cell_folder
from appliance.readers.members import is_ignored_name
from runtime.taxonomy import Taxonomy

CLASS_FOLDERS = "class folders"
POINTS_TABLE = "points table"
QUPATH = "QuPath GeoJSON"
POINT_COLUMNS = ("image", "x_px", "y_px", "class")
GROUP_COLUMN = "group"
GEOJSON_SUFFIX = ".geojson"


class LabelledCellsError(ValueError):
    """Labelled cells that cannot be used; one line naming the file (and the row)."""


@dataclass(frozen=True)
class ClassFolder:
    folder: Path
    cell_class: str
    group: str | None  # None: each crop its own group
    crops: int


@dataclass(frozen=True)
class Label:
    """What a labelled cell is, where it came from, and its cross-validation group."""

    cell_class: str
    group: str
    source: str


@dataclass(frozen=True)
class Point:
    x: float  # in the image file's pixels (a scan: level 0)
    y: float
    label: Label


@dataclass
class Plan:
    """What the input holds, checked, before any image is processed."""

    layout: str
    grouping: str
    folders: list[ClassFolder] = field(default_factory=list)
    points: dict[Path, list[Point]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def cells(self) -> int:
        return sum(f.crops for f in self.folders) + sum(len(p) for p in self.points.values())


# --- what a path is ------------------------------------------------------------------


def layout_of(path: Path) -> str | None:
    """The layout ``path`` holds labelled cells in, or None (a cases table, whose header
    is ``case_id,scans,...``, holds none)."""
    path = Path(path)
    if path.is_file():
        return POINTS_TABLE if _points_header(path) is not None else None
    return _folder_layout(path) if path.is_dir() else None


def _points_header(path: Path) -> list[str] | None:
    """The header of a points table (lower-case, stripped), or None for another file."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    columns = [c.strip().lower() for c in header]
    return columns if set(POINT_COLUMNS) <= set(columns) else None


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not is_ignored_name(p.name))


def _folder_layout(folder: Path) -> str | None:
    try:
        entries = _visible(folder)
    except OSError:
        return None
    if any(p.is_file() and p.suffix.lower() == GEOJSON_SUFFIX for p in entries):
        return QUPATH
    if any(p.is_dir() for p in entries):
        return CLASS_FOLDERS
    return None


# --- labels --------------------------------------------------------------------------


def _class_names(taxonomy: Taxonomy) -> dict[str, str]:
    """Every way a label may name a class (name or label, any case) -> the class name."""
    names = {c.label.strip().lower(): c.name for c in taxonomy.classes}
    names.update({c.name.lower(): c.name for c in taxonomy.classes})
    return names


def _known(taxonomy: Taxonomy) -> str:
    shown = ", ".join(taxonomy.names[:8])
    more = f" and {len(taxonomy.names) - 8} more" if len(taxonomy.names) > 8 else ""
    return f"taxonomy {taxonomy.name} ({shown}{more})"


def _class_of(text: str, taxonomy: Taxonomy, where: str) -> str:
    name = _class_names(taxonomy).get(text.strip().lower())
    if name is None:
        raise LabelledCellsError(f"{where}: {text.strip()!r} is not a class of {_known(taxonomy)}")
    return name


# --- reading the layouts ---------------------------------------------------------------


def read_plan(path: Path, taxonomy: Taxonomy) -> Plan:
    """What ``path`` holds, every file and row checked; no image is processed."""
    if not path.exists():
        raise LabelledCellsError(f"{path}: no such file or folder")
    if path.is_file():
        if _points_header(path) is None:
            raise LabelledCellsError(
                f"{path} row 1: a points table needs the columns {', '.join(POINT_COLUMNS)}"
            )
        return _points_table(path, taxonomy)
    layout = _folder_layout(path)
    if layout == QUPATH:
        return _qupath_folder(path, taxonomy)
    if layout == CLASS_FOLDERS:
        return _class_folders(path, taxonomy)
    raise LabelledCellsError(
        f"{path}: the folder holds neither class folders of crops (<class>/*.png) nor "
        "images with QuPath GeoJSON files (docs/cells.md)"
    )


def _class_folders(root: Path, taxonomy: Taxonomy) -> Plan:
    entries = _visible(root)
    _no_loose_images(root, entries)
    subfolders = [p for p in entries if p.is_dir()]
    groups = [d for d in subfolders if any(p.is_dir() for p in _visible(d))]
    flat = [d for d in subfolders if d not in groups]
    if groups and flat:
        raise LabelledCellsError(
            f"{flat[0]}: a class folder beside group folders such as {groups[0].name}; "
            "put every class folder in a group folder, or none"
        )
    if groups:
        plan = Plan(
            CLASS_FOLDERS,
            f"the {len(groups)} folders above the class folders (a patient or image group each)",
        )
        for group in groups:
            entries = _visible(group)
            _no_loose_images(group, entries)
            for folder in (p for p in entries if p.is_dir()):
                plan.folders.append(_class_folder(folder, taxonomy, group.name))
    else:
        plan = Plan(
            CLASS_FOLDERS,
            "none given (no folder above the class folders), so each crop is its own group: "
            "cross-validation is by crop, and crops of one patient may sit on both sides",
        )
        plan.folders = [_class_folder(folder, taxonomy, None) for folder in flat]
    return plan


def _no_loose_images(folder: Path, entries: Sequence[Path]) -> None:
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in formats.CELL_EXTENSIONS]
    if loose:
        raise LabelledCellsError(
            f"{loose[0]}: a crop beside the class folders; put each crop in its class's folder"
        )


def _class_folder(folder: Path, taxonomy: Taxonomy, group: str | None) -> ClassFolder:
    cell_class = _class_of(folder.name, taxonomy, f"{folder} (the folder's name)")
    inner = [p for p in _visible(folder) if p.is_dir()]
    if inner:
        raise LabelledCellsError(f"{inner[0]}: a class folder holds crops, not folders")
    images = [
        p for p in _visible(folder) if p.is_file() and p.suffix.lower() in formats.CELL_EXTENSIONS
    ]
    if not images:
        extensions = ", ".join(sorted(formats.CELL_EXTENSIONS))
        raise LabelledCellsError(f"{folder}: the class folder holds no images ({extensions})")
    try:
        crops = len(open_cell_folder(folder))  # each crop as a served cell folder takes it
    except CellFolderError as exc:
        raise LabelledCellsError(f"{folder}: {exc.reason}") from None
    return ClassFolder(folder, cell_class, group, crops)


def _number(text: str, where: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise LabelledCellsError(f"{where}: {text.strip()!r} is not a pixel position")
    return value


class _Bounds:
    """Image sizes from their headers, to refuse a point outside its image."""

    def __init__(self) -> None:
        self.sizes: dict[Path, tuple[int, int] | None] = {}

    def check(self, image: Path, x: float, y: float, where: str) -> None:
        if image not in self.sizes:
            self.sizes[image] = formats.image_size(image)
        size = self.sizes[image]
        if size is not None and not (x < size[0] and y < size[1]):
            raise LabelledCellsError(
                f"{where}: ({x:g}, {y:g}) lies outside {image.name} ({size[0]} x {size[1]} px)"
            )


def _points_table(path: Path, taxonomy: Taxonomy) -> Plan:
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError:
        raise LabelledCellsError(f"{path}: not UTF-8 text; save it as CSV UTF-8") from None
    except (OSError, csv.Error) as exc:
        raise LabelledCellsError(f"{path}: cannot be read as CSV ({exc})") from None
    header = [c.strip().lower() for c in rows[0]]
    grouped = GROUP_COLUMN in header
    plan = Plan(
        POINTS_TABLE,
        "the group column (a patient each)"
        if grouped
        else "the image of each point (its field or scan)",
    )
    bounds = _Bounds()
    for number, row in enumerate(rows[1:], start=2):
        if not any(value.strip() for value in row):
            continue
        at = f"{path} row {number}"
        if len(row) != len(header):
            raise LabelledCellsError(f"{at}: {len(row)} fields where the header has {len(header)}")
        values = dict(zip(header, row, strict=True))
        name = values["image"].strip()
        if not name:
            raise LabelledCellsError(f"{at}, column image: empty; name the image of the point")
        image = path.parent / name
        if not image.is_file():
            raise LabelledCellsError(
                f"{at}, column image: {name} does not exist (relative to {path.parent})"
            )
        x = _number(values["x_px"], f"{at}, column x_px")
        y = _number(values["y_px"], f"{at}, column y_px")
        cell_class = _class_of(values["class"], taxonomy, f"{at}, column class")
        bounds.check(image, x, y, at)
        group = (values.get(GROUP_COLUMN) or "").strip() or name
        point = Point(x, y, Label(cell_class, group, f"{path.name}:{number}"))
        plan.points.setdefault(image, []).append(point)
    if not plan.points:
        raise LabelledCellsError(f"{path}: no points below the header")
    return plan


def _image_beside(geojson: Path) -> Path:
    """The image a QuPath export belongs to: ``X.geojson`` beside ``X.<ext>`` (or ``X``
    itself, for an export named after the image's whole file name)."""
    stem = geojson.stem
    found = [
        p
        for p in _visible(geojson.parent)
        if p.is_file()
        and p.suffix.lower() in formats.SCAN_EXTENSIONS
        and (p.name == stem or p.stem == stem)
    ]
    if not found:
        raise LabelledCellsError(f"{geojson}: no image named {stem}.* beside it")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise LabelledCellsError(f"{geojson}: several images named {stem}.* ({names}); keep one")
    return found[0]


def _qupath_folder(folder: Path, taxonomy: Taxonomy) -> Plan:
    plan = Plan(QUPATH, "the image of each point (its field or scan)")
    bounds = _Bounds()
    unclassified = polygons = 0
    for geojson in (p for p in _visible(folder) if p.suffix.lower() == GEOJSON_SUFFIX):
        image = _image_beside(geojson)
        for number, x, y, name, polygon in _features(geojson):
            at = f"{geojson} feature {number}"
            if name is None:
                unclassified += 1
                continue
            cell_class = _class_of(name, taxonomy, f"{at}, classification")
            bounds.check(image, x, y, at)
            polygons += polygon
            point = Point(x, y, Label(cell_class, image.name, f"{geojson.name}:{number}"))
            plan.points.setdefault(image, []).append(point)
    if polygons:
        plan.notes.append(f"{polygons} polygons counted as the point at their centroid")
    if unclassified:
        plan.notes.append(f"{unclassified} features without a classification left out")
    if not plan.points:
        raise LabelledCellsError(f"{folder}: its GeoJSON files hold no classified points")
    return plan


def geojson_features(path: Path, error: type[Exception]) -> list[Any]:
    """The features of a QuPath GeoJSON export (a FeatureCollection, one Feature or a
    bare list, as QuPath writes each); ``error`` with one line naming the file if not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise error(f"{path}: not a readable GeoJSON (JSON) file") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        features = data
    if not isinstance(features, list):
        raise error(f"{path}: not a FeatureCollection or a list of features")
    return features


def _features(geojson: Path) -> Iterator[tuple[int, float, float, str | None, bool]]:
    """(feature number, x, y, classification name or None, whether a polygon) of each
    point of a QuPath export; a MultiPoint gives each of its points."""
    features = geojson_features(geojson, LabelledCellsError)
    for number, feature in enumerate(features, start=1):
        at = f"{geojson} feature {number}"
        if not isinstance(feature, dict):
            raise LabelledCellsError(f"{at}: not a GeoJSON feature")
        properties = feature.get("properties") or {}
        classification = properties.get("classification") if isinstance(properties, dict) else None
        name = classification.get("name") if isinstance(classification, dict) else None
        name = str(name) if name not in (None, "") else None
        for x, y, polygon in _points_of(feature.get("geometry"), at):
            yield number, x, y, name, polygon


def _points_of(geometry: Any, at: str) -> list[tuple[float, float, bool]]:
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    coordinates = geometry.get("coordinates") if isinstance(geometry, dict) else None
    try:
        if kind == "Point":
            return [(*_xy(coordinates, at), False)]
        if kind == "MultiPoint":
            return [(*_xy(point, at), False) for point in coordinates]
        if kind == "Polygon":
            return [(*_centroid(np.array(coordinates[0], np.float64), at), True)]
    except (TypeError, IndexError, ValueError):
        raise LabelledCellsError(f"{at}: its {kind} coordinates are not numbers") from None
    raise LabelledCellsError(
        f"{at}: geometry {kind or 'missing'}; a labelled cell is a Point, MultiPoint or Polygon"
    )


def _xy(point: Any, at: str) -> tuple[float, float]:
    x, y = float(point[0]), float(point[1])
    if not (math.isfinite(x) and math.isfinite(y)) or x < 0 or y < 0:
        raise LabelledCellsError(f"{at}: ({x:g}, {y:g}) is not a pixel position")
    return x, y


def _centroid(ring: np.ndarray, at: str) -> tuple[float, float]:
    """The area centroid of a polygon's outer ring (its vertices' mean when degenerate)."""
    if ring.ndim != 2 or ring.shape[0] < 3 or ring.shape[1] < 2:
        raise ValueError(at)
    x, y = ring[:, 0], ring[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    area = cross.sum() / 2
    if abs(area) < 1e-9:
        return _xy((x.mean(), y.mean()), at)
    cx = ((x + np.roll(x, -1)) * cross).sum() / (6 * area)
    cy = ((y + np.roll(y, -1)) * cross).sum() / (6 * area)
    return _xy((cx, cy), at)
