"""Annotated fields for training the segmenter, in the three layouts annotators produce.

A folder of field photos, each with one annotation file beside it (docs/training.md,
"Training the segmenter"):

- ``X.labels.tif`` / ``X.labels.png``: an instance label image, one integer per cell;
- ``X.mask.tif`` / ``X.mask.png``: a binary mask, split into cells by connected
  components. Cells that touch become one component; a component with a neck (its
  core, the pixels deeper inside than half its deepest, falls into pieces) is counted
  as such a merge, so the run can say how often it happened;
- ``X.geojson``: QuPath's GeoJSON export of the cells' polygons (x, y in the
  photo's pixels), each polygon one cell.

Every photo is read by the appliance's own reader (``appliance.readers.open_scan``),
which finds its pixel size (sidecar ``X.png.json``, the folder's ``manifest.json``,
the file's metadata, or ``--pixel-size``) and resamples it to the 0.25 um/px working
grid, exactly as serving reads a field. Its labels go through the same resampling
geometry (``LabelScan``: nearest neighbour instead of bilinear), so a cell's label
lands on the pixels the network is given. ``as_served`` then gives the photos the
colour serving gives a field before StarDist sees it (``appliance.pipeline.fields``:
white balance from each photo's own glass, the folder's stains estimated once over all
its balanced photos, normalisation to the bundle's stain reference), through serving's
own functions, so training and the held-out comparison see the pixels serving
segments. Anything unusable is ``AnnotationError``, one line naming the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from appliance.pipeline import fields as served
from appliance.pipeline import stain
from appliance.pipeline.cell_finding import SlideParams
from appliance.readers import FieldFolder, open_scan
from appliance.readers.base import Level, Scan
from appliance.readers.errors import ScanError
from appliance.readers.formats import FIELD_EXTENSIONS
from appliance.readers.pixel_size import Calibration, read_json, stated_um
from appliance.readers.pixel_size import calibration as pixel_calibration
from appliance.validation.cell_layouts import geojson_features

LABELS = "instance labels"
MASK = "binary masks"
QUPATH = "QuPath GeoJSON"
LABEL_SUFFIXES = (".labels.tif", ".labels.tiff", ".labels.png")
MASK_SUFFIXES = (".mask.tif", ".mask.tiff", ".mask.png")
GEOJSON_SUFFIX = ".geojson"
MANIFEST = "manifest.json"
# Where two round cells touch, the component is narrower than half its widest point;
# a single cell, even an elongated one, is not.
NECK_DEPTH = 0.5
MIN_COMPONENT_PX = 4  # specks smaller than this in a binary mask are not cells


class AnnotationError(ValueError):
    """Annotated fields that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class AnnotatedField:
    """One photo and its cells, both at the 0.25 um/px working grid."""

    name: str  # the photo's file name
    layout: str  # LABELS | MASK | QUPATH
    rgb: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) int32, 0 background, 1..n the cells
    pixel_size_um: float  # the photo's own (x)
    pixel_size_source: str  # sidecar | manifest | metadata | config
    merged: int = 0  # binary masks: components that look like touching cells

    @property
    def cells(self) -> int:
        return len(np.unique(self.labels[self.labels > 0]))


@dataclass(frozen=True)
class AnnotatedSet:
    folder: Path
    fields: tuple[AnnotatedField, ...]
    calibration: Calibration  # what the photos' pixel sizes fell back on
    sources: dict[str, Path] = field(default_factory=dict)  # every file read, by name

    def layouts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.fields:
            counts[item.layout] = counts.get(item.layout, 0) + 1
        return counts

    @property
    def cells(self) -> int:
        return sum(item.cells for item in self.fields)

    @property
    def merged(self) -> int:
        return sum(item.merged for item in self.fields)

    @property
    def components(self) -> int:
        """Cells of the binary-mask fields (the merges' denominator)."""
        return sum(item.cells for item in self.fields if item.layout == MASK)


class LabelScan(Scan):
    """A label image on its photo's geometry: resampled as the photo is, but nearest
    neighbour (labels are not blended) and 0 (background) outside."""

    format = "labels"
    resample = Image.Resampling.NEAREST

    def __init__(self, path: Path, labels: np.ndarray, photo: Scan) -> None:
        self._labels = labels.astype(np.int32)
        height, width = labels.shape
        super().__init__(
            path, (Level(width, height, 1.0),), photo.mpp_x, photo.mpp_y, photo.pixel_size_source
        )

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._labels[y : y + h, x : x + w]

    def _blank(self, h: int, w: int) -> np.ndarray:
        return np.zeros((h, w), np.int32)


def read_annotated_fields(folder: Path, calibration: Calibration | float = 0.0) -> AnnotatedSet:
    """Every photo of ``folder`` with its annotation, at the working grid.

    ``calibration``: the configuration's (a camera, or ``--pixel-size``) for photos whose
    sidecar, manifest and metadata state no size; a number is a pixel size alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AnnotationError(f"{folder}: not a folder of annotated fields")
    calibration = _with_manifest(folder, pixel_calibration(calibration))
    entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    annotations = [p for p in entries if _annotation_kind(p) is not None]
    photos = [
        p
        for p in entries
        if p not in annotations and p.suffix.lower() in FIELD_EXTENSIONS and p.name != MANIFEST
    ]
    if not photos:
        raise AnnotationError(f"{folder}: no field photos ({', '.join(sorted(FIELD_EXTENSIONS))})")
    claimed: set[Path] = set()
    fields, sources = [], {}
    for photo in photos:
        annotation = _annotation_of(photo, annotations)
        claimed.add(annotation)
        fields.append(read_field(photo, annotation, calibration))
        sources[photo.name] = photo
        sources[annotation.name] = annotation
    for orphan in sorted(set(annotations) - claimed):
        raise AnnotationError(f"{orphan}: no photo of the same name beside it")
    result = AnnotatedSet(folder, tuple(fields), calibration, sources)
    if not result.cells:
        raise AnnotationError(f"{folder}: the annotations hold no cells")
    return result


def as_served(annotated: AnnotatedSet, params: SlideParams) -> AnnotatedSet:
    """``annotated`` with each photo's pixels as serving gives that photo, one of a
    folder of fields, to StarDist under ``params`` (a bundle's ``SlideParams``): balanced
    to the reference's glass, then normalised with the stains of the whole folder."""
    photos = FieldFolder(
        annotated.folder,
        tuple(annotated.sources[item.name] for item in annotated.fields),
        annotated.calibration,
    )
    target = served.glass_target(params.reference)
    surveyed, samples = served.survey(photos, target)
    try:
        stains = stain.estimate_stains(samples)
    except stain.StainError as exc:
        raise AnnotationError(f"{annotated.folder}: {exc.reason}") from None
    fields = []
    for item, info in zip(annotated.fields, surveyed, strict=True):
        balanced = served.white_balanced(item.rgb, info.taken.glass, target)
        fields.append(dataclasses.replace(item, rgb=params.normalised(balanced, stains)))
    return dataclasses.replace(annotated, fields=tuple(fields))


def _with_manifest(folder: Path, calibration: Calibration) -> Calibration:
    """The run's fallback size, with the folder's manifest when it has one."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return calibration
    try:
        data = read_json(manifest, manifest, MANIFEST)
        stated = stated_um(manifest, data, MANIFEST, calibration)
    except ScanError as exc:
        raise AnnotationError(f"{manifest}: {exc.reason}") from None
    if stated is None:
        raise AnnotationError(f'{manifest}: must give the size, e.g. {{"pixel_size_um": 0.25}}')
    return calibration.for_folder(stated[0], stated[1], "manifest")


def _annotation_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(LABEL_SUFFIXES):
        return LABELS
    if name.endswith(MASK_SUFFIXES):
        return MASK
    if name.endswith(GEOJSON_SUFFIX):
        return QUPATH
    return None


def _stem(annotation: Path) -> str:
    name = annotation.name
    for suffix in (*LABEL_SUFFIXES, *MASK_SUFFIXES, GEOJSON_SUFFIX):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _annotation_of(photo: Path, annotations: list[Path]) -> Path:
    """The one annotation file named after the photo (``X.png`` <- ``X.labels.tif``, or
    QuPath's ``X.png.geojson``)."""
    found = [a for a in annotations if _stem(a) in (photo.stem, photo.name)]
    if not found:
        raise AnnotationError(
            f"{photo}: no annotation beside it ({photo.stem}.labels.tif, "
            f"{photo.stem}.mask.png or {photo.stem}.geojson)"
        )
    if len(found) > 1:
        names = ", ".join(a.name for a in found)
        raise AnnotationError(f"{photo}: several annotations ({names}); keep one")
    return found[0]


def read_field(photo: Path, annotation: Path, calibration: Calibration) -> AnnotatedField:
    """One photo and its annotation, both brought to the working grid."""
    try:
        with open_scan(photo, calibration) as scan:
            rgb = scan.read_region(0, 0, scan.width, scan.height)
            native = (scan.levels[0].height, scan.levels[0].width)
            kind = _annotation_kind(annotation)
            merged = 0
            if kind == QUPATH:
                labels = _rasterise_geojson(annotation, native)
            else:
                raster = _read_raster(annotation)
                if raster.shape != native:
                    raise AnnotationError(
                        f"{annotation}: {raster.shape[1]} x {raster.shape[0]} px, but "
                        f"{photo.name} is {native[1]} x {native[0]} px"
                    )
                if kind == LABELS:
                    labels = _instance_labels(annotation, raster)
                else:
                    labels, merged = _mask_components(annotation, raster)
            working = LabelScan(annotation, labels, scan).read_region(0, 0, scan.width, scan.height)
            size, source = scan.mpp_x, scan.pixel_size_source
    except ScanError as exc:
        raise AnnotationError(f"{photo}: {exc.reason}") from None
    return AnnotatedField(photo.name, str(kind), rgb, working, size, source, merged)


def _read_raster(path: Path) -> np.ndarray:
    """A label or mask image as a 2-D integer array."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            raster = np.asarray(tifffile.imread(path))
        else:
            with Image.open(path) as image:
                raster = np.asarray(image)
    except Exception:  # every decoder has its own errors; the reason is the same
        raise AnnotationError(f"{path}: cannot be read as an image") from None
    if raster.ndim == 3 and raster.shape[2] in (3, 4) and _grey(raster):
        raster = raster[..., 0]
    if raster.ndim != 2:
        raise AnnotationError(
            f"{path}: a label image has one channel, this has shape {raster.shape}"
        )
    if raster.dtype.kind == "f":
        if not np.all(np.mod(raster, 1) == 0):
            raise AnnotationError(f"{path}: holds fractional values; labels are integers")
        raster = raster.astype(np.int64)
    if raster.dtype.kind == "b":
        raster = raster.astype(np.int64)
    if raster.dtype.kind not in "iu":
        raise AnnotationError(f"{path}: pixel type {raster.dtype} is not an integer label")
    if raster.size and raster.min() < 0:
        raise AnnotationError(f"{path}: holds negative labels")
    return raster.astype(np.int64)


def _grey(rgb: np.ndarray) -> bool:
    """An RGB(A) picture whose three channels are equal (a mask saved in colour)."""
    return bool(
        np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    )


def _instance_labels(path: Path, raster: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    values = np.unique(raster[raster > 0])
    if len(values) == 1:
        _, pieces = ndimage.label(raster > 0)
        if pieces > 1:
            raise AnnotationError(
                f"{path}: one label over {pieces} separate regions is a binary mask; "
                f"name it {_stem(path)}.mask{path.suffix}"
            )
    if np.any(values > np.iinfo(np.int32).max):
        raise AnnotationError(f"{path}: labels exceed 2^31")
    return raster.astype(np.int32)


def _mask_components(path: Path, raster: np.ndarray) -> tuple[np.ndarray, int]:
    """Cells of a binary mask by 8-connected components, and how many look merged."""
    from scipy import ndimage

    values = np.unique(raster)
    if len(values) > 2:
        raise AnnotationError(
            f"{path}: {len(values)} different values, not a binary mask; an instance label "
            f"image is named {_stem(path)}.labels{path.suffix}"
        )
    labels, _ = ndimage.label(raster > 0, structure=np.ones((3, 3), bool))
    merged = 0
    for index, window in enumerate(ndimage.find_objects(labels), start=1):
        component = labels[window] == index
        if component.sum() < MIN_COMPONENT_PX:
            labels[window][component] = 0
        elif _has_neck(component):
            merged += 1
    return labels.astype(np.int32), merged


def _has_neck(component: np.ndarray) -> bool:
    """Whether the component's core (pixels deeper than ``NECK_DEPTH`` of its deepest)
    falls apart: a neck, as where two cells touch."""
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(np.pad(component, 1))
    _, pieces = ndimage.label(depth > NECK_DEPTH * depth.max())
    return pieces > 1


def _rasterise_geojson(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Each polygon of a QuPath export drawn with its own label (later ones on top)."""
    from skimage.draw import polygon as draw_polygon

    labels = np.zeros(shape, np.int32)
    rings = _polygons(path)
    for number, (at, ring) in enumerate(rings, start=1):
        if ring[:, 0].max() < 0 or ring[:, 1].max() < 0:
            raise AnnotationError(f"{at}: lies outside the photo")
        if ring[:, 0].min() > shape[1] or ring[:, 1].min() > shape[0]:
            raise AnnotationError(f"{at}: lies outside the photo ({shape[1]} x {shape[0]} px)")
        rows, cols = draw_polygon(ring[:, 1], ring[:, 0], shape)
        labels[rows, cols] = number
    return labels


def _polygons(path: Path) -> list[tuple[str, np.ndarray]]:
    """(where, outer ring as (x, y)) of every polygon of a QuPath GeoJSON export."""
    features = geojson_features(path, AnnotationError)
    rings = []
    for number, feature in enumerate(features, start=1):
        at = f"{path} feature {number}"
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        if kind == "Polygon":
            parts = [geometry.get("coordinates")]
        elif kind == "MultiPolygon":
            parts = geometry.get("coordinates")
        else:
            raise AnnotationError(
                f"{at}: geometry {kind or 'missing'}; a cell's outline is a Polygon or MultiPolygon"
            )
        for part in parts if isinstance(parts, list) else [None]:
            rings.append((at, _ring(part, at)))
    return rings


def _ring(polygon: Any, at: str) -> np.ndarray:
    try:
        ring = np.asarray(polygon[0], np.float64)
    except (TypeError, IndexError, ValueError):
        raise AnnotationError(f"{at}: its coordinates are not numbers") from None
    if ring.ndim != 2 or ring.shape[0] < 3 or ring.shape[1] < 2 or not np.isfinite(ring).all():
        raise AnnotationError(f"{at}: a polygon needs at least 3 (x, y) vertices")
    return ring[:, :2]
