"""The model bundle: ``bundle.json`` (format_version 1) and the files it lists.

``load_bundle`` validates the JSON against the typed sections below and the
sha256 of every listed file; any problem raises ``BundleError`` whose one-line
message names the bundle and the key or file. ``write_bundle`` assembles a
bundle folder from files and sections (no torch: the export side and the demo
builder both call it). Sections the slide pipeline reads (segmenter, qc, cells,
stain_reference) keep unknown keys in their ``extra`` mapping, so a stage can
add a parameter without a format change; everything else is strict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from runtime.backends.base import ModelVariants
from runtime.files import sha256_file
from runtime.head_kinds import HeadKind, head_kind, head_kind_names
from runtime.typed_json import SpecError, dump, parse_section

FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
ENGINES_DIR = "engines"
INTENDED_USES = ("demo", "research", "clinical")
ENCODER_VARIANTS = ("fp32", "fp16", "int8", "int8_static")
PATIENT_ENCODER_VARIANTS = ("fp32", "fp16", "int8")
SEGMENTER_VARIANTS = ("int8",)  # fp32 is the section's ``file``
DEFAULT_GLASS_RGB = (240.0, 240.0, 240.0)  # a stain reference written without its glass
# What a head can score: slide scans and microscope-camera field photos (both segmented),
# single-cell folders.
HeadInput = Literal["scans", "fields", "cells"]
INPUT_KINDS: tuple[HeadInput, ...] = ("scans", "fields", "cells")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(SpecError):
    """A bundle that cannot be used; the message is one line naming the file or key."""


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int

    def validate(self, where: str) -> None:
        if not _SHA256.match(self.sha256):
            raise BundleError(f"{where}.sha256 must be 64 lower-case hex digits")


@dataclass(frozen=True)
class InputSpec:
    """Encoder input: square RGB patches of ``size`` px, ``(x/255 - mean) / std``.

    ``crop_px`` > 0: the encoder's graph does that itself (``export.crop_input``) and
    takes the uint8 crops (N, crop_px, crop_px, 3) as they are; 0: the runtime resizes
    and normalises, and feeds float32 (N, 3, size, size).
    """

    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_px: int = 0

    @property
    def fed_px(self) -> int:
        """The side of the uint8 patches the encoder is given."""
        return self.crop_px or self.size

    def validate(self, where: str) -> None:
        if self.size <= 0 or self.crop_px < 0:
            raise BundleError(f"{where}.size must be positive and crop_px 0 or more")
        if min(self.std) <= 0:
            raise BundleError(f"{where}.std must be positive")


@dataclass(frozen=True)
class EncoderSpec:
    architecture: str  # e.g. vit_base_patch14_dinov2
    embed_dim: int
    variants: dict[
        str, str
    ]  # fp32 always; fp16, int8, int8_static only when they passed their gates
    input: InputSpec = field(default_factory=InputSpec)
    int8_note: str = ""  # why int8 was accepted (its fidelity) or why the bundle has none

    def validate(self, where: str) -> None:
        if self.embed_dim <= 0:
            raise BundleError(f"{where}.embed_dim must be positive")
        if "fp32" not in self.variants:
            raise BundleError(f"{where}.variants must name the fp32 model")
        unknown = sorted(set(self.variants) - set(ENCODER_VARIANTS))
        if unknown:
            raise BundleError(
                f"{where}.variants: unknown {unknown} (allowed: {', '.join(ENCODER_VARIANTS)})"
            )


@dataclass(frozen=True)
class PairedEncoder:
    """The cell encoder a patient encoder was trained on (its ``architecture`` and width)."""

    architecture: str
    embed_dim: int


@dataclass(frozen=True)
class PatientEncoderSpec:
    """A network from a case's cell embeddings (cells, cell_dim) to one patient embedding
    (1, embed_dim), e.g. GenBloom (export/patient_encoder.py). It is paired with the
    encoder it was trained on: a bundle whose encoder is another is refused."""

    kind: str  # genbloom-v | genbloom-g
    output: str  # cls | projection
    cell_dim: int
    embed_dim: int
    encoder: PairedEncoder
    variants: dict[str, str]  # fp32 always; fp16 and int8 when they passed their gates
    max_cells: int = 2000  # longer bags are evenly thinned to this many cells
    fp16_note: str = ""  # why fp16 was accepted (its gate figures) or why there is none
    int8_note: str = ""

    def validate(self, where: str) -> None:
        if min(self.cell_dim, self.embed_dim, self.max_cells) <= 0:
            raise BundleError(f"{where}: cell_dim, embed_dim and max_cells must be positive")
        if "fp32" not in self.variants:
            raise BundleError(f"{where}.variants must name the fp32 model")
        unknown = sorted(set(self.variants) - set(PATIENT_ENCODER_VARIANTS))
        if unknown:
            raise BundleError(
                f"{where}.variants: unknown {unknown} "
                f"(allowed: {', '.join(PATIENT_ENCODER_VARIANTS)})"
            )

    def model_variants(self, root: Path) -> ModelVariants:
        """Its files; each backend loads the one it prefers (``Backend.files``): fp16 on
        ONNX Runtime's CUDA provider, int8 on its CPU provider, else fp32."""
        optional = {
            k: root / self.variants[k] if k in self.variants else None
            for k in PATIENT_ENCODER_VARIANTS[1:]
        }
        return ModelVariants(fp32=root / self.variants["fp32"], **optional)


@dataclass(frozen=True)
class SegmenterSpec:
    """StarDist network (outputs prob, dist) and its post-processing parameters."""

    file: str
    n_rays: int
    grid: tuple[int, int]
    div_by: tuple[int, int]  # input sides must be multiples of these (grid x 2^depth)
    prob_thresh: float
    nms_thresh: float
    input_channels: int
    normalisation: dict[str, Any] = field(default_factory=dict)
    # Besides ``file`` (fp32): "int8" only when it passed its detection gate (export/
    # segmenter_int8.py). Bundles without it run fp32 everywhere.
    variants: dict[str, str] = field(default_factory=dict)
    int8_note: str = ""  # why int8 was accepted (its gate figures) or why there is none
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        unknown = sorted(set(self.variants) - set(SEGMENTER_VARIANTS))
        if unknown:
            raise BundleError(f"{where}.variants: unknown {unknown} (allowed: int8)")
        if min(self.grid) <= 0 or min(self.div_by) <= 0:
            raise BundleError(f"{where}: grid and div_by must be positive")
        if self.n_rays < 3:  # fewer rays make no polygon
            raise BundleError(f"{where}.n_rays must be >= 3, got {self.n_rays}")
        if any(d % g for d, g in zip(self.div_by, self.grid, strict=True)):
            raise BundleError(f"{where}.div_by {self.div_by} is not a multiple of grid {self.grid}")
        if self.input_channels not in (1, 3):
            raise BundleError(f"{where}.input_channels must be 1 or 3, got {self.input_channels}")
        if not (0 < self.prob_thresh < 1 and 0 <= self.nms_thresh < 1):
            raise BundleError(f"{where}: prob_thresh must lie in (0, 1), nms_thresh in [0, 1)")


def segmenter_variants(folder: Path, spec: SegmenterSpec) -> ModelVariants:
    """The files of a segmenter whose paths are relative to ``folder``: fp32 (``file``)
    and int8 when the section lists it (listed means its gate passed); each backend
    loads the one it prefers (``Backend.files``: int8 on ONNX Runtime's CPU)."""
    int8 = spec.variants.get("int8")
    return ModelVariants(fp32=Path(folder) / spec.file, int8=Path(folder) / int8 if int8 else None)


@dataclass(frozen=True)
class HeadSpec:
    """One head: an ensemble of ONNX files whose outputs are averaged, read by its kind.

    The keys every head has are fields; the keys of its kind (``runtime.head_kinds``:
    gated_attention_mil's ``tasks`` and ``high_risk``, transformer_mil's ``classes``
    and ``malignant_classes``, ...) stay in ``extra`` and are parsed and checked by
    the kind, so a new kind brings its own keys without a change here. A probability
    within ``indeterminate_band`` of its threshold is called indeterminate;
    ``calibration`` is applied to the ensemble mean in the way the kind says.
    ``inputs``: the kinds of slide it scores (a myeloma head's smears are scans, a
    peripheral blood head's crops are single-cell folders and the white cells found on
    blood field photos); a case runs only the heads whose inputs hold every kind of its
    slides. ``bag_classes``: the classes of the bundle's cell head a case head reads
    (plasma cells for a myeloma head, white cells for a blood head); empty: every
    kept cell. The bundle's ``cell_head`` is a HeadSpec too, of a per-cell kind.
    """

    name: str
    kind: str
    files: tuple[str, ...]
    labels: dict[str, str] = field(default_factory=dict)  # display names
    thresholds: dict[str, float] = field(default_factory=dict)
    indeterminate_band: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[HeadInput, ...] = INPUT_KINDS
    bag_classes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # the kind's own keys

    @property
    def head_kind(self) -> HeadKind:
        return head_kind(self.kind)

    @property
    def params(self) -> Any:
        """The kind's own keys as its typed parameters."""
        return self.head_kind.params(self)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The names of the model's probabilities, in output order."""
        return self.head_kind.outputs(self)

    def label(self, output: str) -> str:
        return self.labels.get(output, output)

    def validate(self, where: str) -> None:
        if not _NAME.match(self.name):
            raise BundleError(f"{where}.name {self.name!r} must be letters, digits, _ . -")
        if self.kind not in head_kind_names():
            raise BundleError(f"{where}.kind must be one of {', '.join(head_kind_names())}")
        if not self.files:
            raise BundleError(f"{where}.files must list at least one ONNX file")
        if not 0 <= self.indeterminate_band < 0.5:
            raise BundleError(f"{where}.indeterminate_band must lie in [0, 0.5)")
        for key, value in self.thresholds.items():
            if not 0 < value < 1:
                raise BundleError(f"{where}.thresholds.{key} must lie in (0, 1)")
        if not self.inputs or len(set(self.inputs)) != len(self.inputs):
            raise BundleError(f"{where}.inputs must list each of its kinds once, at least one")
        self.head_kind.validate(self, where)


@dataclass(frozen=True)
class StainReference:
    """Macenko reference (METHOD.md A): the stain vectors (basophilic, eosinophilic) as
    unit OD rows, each dye's 99th-percentile concentration, the 5th / 95th percentile
    of a good tile's mean intensity (0-255, QC's range), and the glass colour (RGB)
    that normalised pixels are lit by and camera fields are white-balanced to."""

    stain_matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    max_concentrations: tuple[float, float]
    intensity_p5: float
    intensity_p95: float
    background: tuple[float, float, float] = DEFAULT_GLASS_RGB
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if not 0 <= self.intensity_p5 <= self.intensity_p95:
            raise BundleError(f"{where}: need 0 <= intensity_p5 <= intensity_p95")
        if not all(0 < value <= 255 for value in self.background):
            raise BundleError(f"{where}.background must be an RGB colour in (0, 255]")
        if not all(value > 0 for value in self.max_concentrations):
            raise BundleError(f"{where}.max_concentrations must be positive")


@dataclass(frozen=True)
class QcSpec:
    """Tile QC (METHOD.md A; docs/qc.md). The defaults read a bundle as it was written:
    one without ``blur_um_per_px`` judged blur on the 0.25 um/px working grid against
    the paper's ``laplacian_min`` 100, and raw tile intensities against the stain
    reference's range. New bundles carry ``current()``."""

    tile_um: float = 200.0
    laplacian_min: float = 100.0
    min_nuclei_per_tile: int = 5
    max_artefact_fraction: float = 0.2
    min_plasma_cell_fraction: float = 0.10
    # The paper's inclusion rule (IMWG minimum) for a case of slide scans, once the
    # bundle's cell head knows plasma cells: below min_plasma_cell_fraction of its
    # classified cells the result is "outside the burden the model was validated on":
    # a warning for a person (warn), no call (abstain), or nothing (off).
    plasma_cell_rule: Literal["warn", "abstain", "off"] = "warn"
    blur_um_per_px: float = 0.25
    intensity_relative_to_glass: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def current(cls) -> QcSpec:
        """What bundles are written with: blur judged at 0.5 um/px, which a 20x scan and
        every camera field resolve, against a Laplacian variance calibrated there; a
        tile's intensity taken relative to its slide's glass, as a camera field's is."""
        return cls(laplacian_min=35.0, blur_um_per_px=0.5, intensity_relative_to_glass=True)

    def validate(self, where: str) -> None:
        if not 0.1 <= self.blur_um_per_px <= 2.0:
            raise BundleError(f"{where}.blur_um_per_px must lie in [0.1, 2] um per pixel")


@dataclass(frozen=True)
class CellsSpec:
    """Cell filters and patches at ``pixel_size_um`` (METHOD.md A)."""

    pixel_size_um: float = 0.25
    min_cells: int = 50  # fewer cells in a case: abstain
    min_object_px: int = 200
    min_area_px: int = 500
    max_area_px: int = 5000
    min_circularity: float = 0.6
    max_eccentricity: float = 0.85
    min_confidence: float = 0.7
    min_nucleus_ratio: float = 0.2
    max_nucleus_ratio: float = 0.8
    patch_px: int = 128
    # A scan's tiles are visited best-first until this many cells are kept (0: the
    # whole cellular zone). The paper's yield is 243 plasma cells per patient
    # (median; IQR 186-314, over 3-6 smears): 400 a slide gives a one-smear case
    # more than a typical patient's worth, and bounds a slide's work whatever its size.
    max_cells_per_slide: int = 400
    # The cells a case's heads see (0: every slide's). A slide's share is an equal
    # part, taken from the start of its visit (best tiles, spread over the zone); the
    # paper's cases are 3-6 smears, so three slides' budgets by default.
    max_cells_per_case: int = 1200
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if self.pixel_size_um <= 0 or self.patch_px < 8:
            raise BundleError(f"{where}: pixel_size_um must be > 0 and patch_px >= 8")
        if not self.min_area_px <= self.max_area_px:
            raise BundleError(f"{where}: min_area_px exceeds max_area_px")
        if self.max_cells_per_slide < 0 or self.max_cells_per_case < 0:
            raise BundleError(f"{where}: cell budgets must be 0 (none) or more")
        if 0 < self.max_cells_per_case < self.min_cells:
            raise BundleError(
                f"{where}.max_cells_per_case ({self.max_cells_per_case}) is below "
                f"min_cells ({self.min_cells}): every case would abstain"
            )


@dataclass(frozen=True)
class Bundle:
    path: Path
    sha256: str  # of bundle.json's bytes; it lists every file's hash, so it names the whole
    format_version: int
    name: str
    version: str
    intended_use: str
    created: str
    files: dict[str, FileEntry]
    encoder: EncoderSpec
    heads: tuple[HeadSpec, ...]
    segmenter: SegmenterSpec | None = None
    cell_head: HeadSpec | None = None
    stain_reference: StainReference | None = None
    qc: QcSpec = field(default_factory=QcSpec)
    cells: CellsSpec = field(default_factory=CellsSpec)
    provenance: dict[str, Any] = field(default_factory=dict)
    patient_encoder: PatientEncoderSpec | None = None

    @property
    def engines_dir(self) -> Path:
        return self.path / ENGINES_DIR

    @property
    def is_demo(self) -> bool:
        return self.intended_use == "demo"

    def file(self, relative: str) -> Path:
        return self.path / relative

    def head(self, name: str) -> HeadSpec:
        for head in self.heads:
            if head.name == name:
                return head
        raise BundleError(f"{self.path}: no head named {name!r} ({', '.join(self.head_names)})")

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(head.name for head in self.heads)

    def heads_for(self, kinds: Collection[str]) -> tuple[HeadSpec, ...]:
        """The heads that score a case whose slides are of these kinds (INPUT_KINDS)."""
        return tuple(head for head in self.heads if set(kinds) <= set(head.inputs))

    @property
    def cell_classes(self) -> tuple[str, ...]:
        """The classes of the cell head, in its output order (none without one)."""
        return self.cell_head.outputs if self.cell_head is not None else ()

    def budget_classes(self, kind: str) -> tuple[str, ...]:
        """The cell-head classes a slide of this kind (INPUT_KINDS) is visited for:
        the union of the bags of the heads that read such a slide, when every one of
        them reads only some classes; empty: every kept cell counts."""
        heads = [head for head in self.heads if kind in head.inputs]
        if self.cell_head is None or not heads or not all(h.bag_classes for h in heads):
            return ()
        wanted = {name for head in heads for name in head.bag_classes}
        return tuple(name for name in self.cell_classes if name in wanted)

    @property
    def slide_sha256(self) -> str:
        """A digest of what shapes a slide's cells and embeddings: the encoder,
        segmenter, stain reference, QC and cell sections and their files' hashes.
        Bundles that differ only in their heads (a retrained or recalibrated version)
        share it, so their slide-cache entries are shared too."""
        sections = {
            name: dump(getattr(self, name))
            for name in ("encoder", "segmenter", "cell_head", "stain_reference", "qc", "cells")
        }
        if self.cell_head is None:  # a bundle made before cell heads: the same digest
            sections.pop("cell_head")
        else:  # the visit counts the bags' classes; calibration applies when a case is scored
            for key in ("calibration", "thresholds", "labels"):
                sections["cell_head"].pop(key)
            sections["budget_classes"] = {k: self.budget_classes(k) for k in INPUT_KINDS}
        sections["cells"].pop("max_cells_per_case")  # chosen when a case is scored
        sections["qc"].pop("plasma_cell_rule")  # likewise
        segmenter = sections["segmenter"]
        for key in ("variants", "int8_note"):  # a bundle made before they existed: same digest
            if isinstance(segmenter, dict) and not segmenter.get(key):
                segmenter.pop(key, None)
        if not self.encoder.input.crop_px:  # likewise for an encoder that takes float pixels
            sections["encoder"]["input"].pop("crop_px")
        used = [*self.encoder.variants.values()]
        if self.segmenter is not None:
            used += [self.segmenter.file, *self.segmenter.variants.values()]
        if self.cell_head is not None:
            used += list(self.cell_head.files)
        files = {rel: self.files[rel].sha256 for rel in sorted(used) if rel in self.files}
        text = json.dumps({"sections": sections, "files": files}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def segmenter_variants(self) -> ModelVariants | None:
        """The segmenter's files (fp32, int8 when listed); None without a segmenter."""
        if self.segmenter is None:
            return None
        return segmenter_variants(self.path, self.segmenter)

    def encoder_variants(self) -> ModelVariants:
        variants = self.encoder.variants
        optional = {
            k: self.file(variants[k]) if k in variants else None for k in ENCODER_VARIANTS[1:]
        }
        return ModelVariants(fp32=self.file(variants["fp32"]), **optional)

    def to_json(self) -> dict[str, Any]:
        """The ``bundle.json`` content (without path and sha256, which are not stored)."""
        data: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name in ("path", "sha256") or value is None:
                continue
            data[item.name] = dump(value)
        return data


# ---------------------------------------------------------------- loading

_TOP_REQUIRED = ("format_version", "name", "version", "intended_use", "files", "encoder", "heads")
_TOP_OPTIONAL = (
    "created",
    "segmenter",
    "cell_head",
    "stain_reference",
    "qc",
    "cells",
    "provenance",
    "patient_encoder",
)


def load_bundle(path: Path | str, *, verify_files: bool = True) -> Bundle:
    """Parse and check ``<path>/bundle.json`` and (by default) every file's sha256."""
    root = Path(path)
    manifest = root / BUNDLE_FILE
    try:
        raw_bytes = manifest.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{root}: no {BUNDLE_FILE}") from None
    except OSError as exc:
        raise BundleError(f"{manifest}: cannot read: {exc}") from None
    try:
        raw = json.loads(raw_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest}: not valid JSON: {exc}") from None
    try:
        bundle = _parse_bundle(raw, root, hashlib.sha256(raw_bytes).hexdigest())
        if verify_files:
            verify_bundle_files(bundle)
    except SpecError as exc:
        raise BundleError(f"{manifest}: {exc}") from None
    return bundle


def _parse_bundle(raw: Any, root: Path, digest: str) -> Bundle:
    if not isinstance(raw, dict):
        raise BundleError("must hold a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"format_version {version!r} is not supported (this cytoedge reads {FORMAT_VERSION})"
        )
    missing = [key for key in _TOP_REQUIRED if key not in raw]
    if missing:
        raise BundleError(f"missing {', '.join(missing)}")
    unknown = sorted(set(raw) - set(_TOP_REQUIRED) - set(_TOP_OPTIONAL))
    if unknown:
        raise BundleError(f"unknown key(s) {', '.join(unknown)}")
    values = {key: raw[key] for key in (*_TOP_REQUIRED, *_TOP_OPTIONAL) if key in raw}
    values.setdefault("created", "")
    bundle = parse_section(Bundle, values | {"path": str(root), "sha256": digest}, "")
    _check_cross_references(bundle)
    return bundle


def _check_cross_references(bundle: Bundle) -> None:
    if bundle.intended_use not in INTENDED_USES:
        raise BundleError(f"intended_use must be one of {', '.join(INTENDED_USES)}")
    if not bundle.name.strip() or not bundle.version.strip():
        raise BundleError("name and version must not be empty")
    for relative in bundle.files:
        _check_relative(relative, f"files[{relative!r}]")
    _unique([h.name for h in bundle.heads], "heads[].name")
    referenced = [(f"encoder.variants.{k}", v) for k, v in bundle.encoder.variants.items()]
    if bundle.segmenter is not None:
        referenced.append(("segmenter.file", bundle.segmenter.file))
        referenced += [(f"segmenter.variants.{k}", v) for k, v in bundle.segmenter.variants.items()]
    for head in bundle.heads:
        referenced += [(f"heads[{head.name}].files", f) for f in head.files]
        if head.head_kind.per_cell:
            raise BundleError(f"heads[{head.name}]: a {head.kind} head belongs in cell_head")
        if head.bag_classes:
            if bundle.cell_head is None:
                raise BundleError(f"heads[{head.name}].bag_classes needs the bundle's cell_head")
            unknown = sorted(set(head.bag_classes) - set(bundle.cell_head.outputs))
            if unknown:
                raise BundleError(
                    f"heads[{head.name}].bag_classes: {unknown} are not classes of the cell head"
                )
    if bundle.cell_head is not None:
        if not bundle.cell_head.head_kind.per_cell:
            raise BundleError(f"cell_head: a {bundle.cell_head.kind} head is a case head")
        referenced += [("cell_head.files", f) for f in bundle.cell_head.files]
    patient = bundle.patient_encoder
    if patient is not None:
        paired, encoder = patient.encoder, bundle.encoder
        if (paired.architecture, paired.embed_dim) != (encoder.architecture, encoder.embed_dim):
            raise BundleError(
                f"patient_encoder was trained on {paired.architecture} ({paired.embed_dim}-d); "
                f"this bundle's encoder is {encoder.architecture} ({encoder.embed_dim}-d)"
            )
        if patient.cell_dim != encoder.embed_dim:
            raise BundleError(
                f"patient_encoder.cell_dim {patient.cell_dim} != encoder.embed_dim "
                f"{encoder.embed_dim}"
            )
        referenced += [(f"patient_encoder.variants.{k}", v) for k, v in patient.variants.items()]
    _check_patient_heads(bundle)
    for where, relative in referenced:
        if relative not in bundle.files:
            raise BundleError(f"{where}: {relative} is not listed in files")


def _check_patient_heads(bundle: Bundle) -> None:
    """A head on the patient embedding needs the patient encoder it learnt on."""
    patient = bundle.patient_encoder
    for head in bundle.heads:
        if head.head_kind.reads != "patient":
            continue
        if patient is None:
            raise BundleError(f"heads[{head.name}]: a {head.kind} head needs a patient_encoder")
        entry = bundle.files.get(patient.variants["fp32"])
        learnt_on = head.params.patient_encoder_sha256
        if entry is None or entry.sha256 != learnt_on:
            raise BundleError(
                f"heads[{head.name}] learnt on patient encoder {learnt_on[:12]}; this bundle's "
                f"is {entry.sha256[:12] if entry else 'unlisted'}: train the head again"
            )


def verify_bundle_files(bundle: Bundle) -> None:
    """Every listed file exists with its recorded size and sha256."""
    for relative, entry in bundle.files.items():
        path = bundle.file(relative)
        if not path.is_file():
            raise BundleError(f"{relative}: listed in files but missing")
        size = path.stat().st_size
        if size != entry.bytes:
            raise BundleError(f"{relative}: {size} bytes, bundle.json records {entry.bytes}")
        if sha256_file(path) != entry.sha256:
            raise BundleError(f"{relative}: sha256 does not match bundle.json (changed or corrupt)")


class FileCheck:
    """A loaded bundle's files checked again while it is in use (a file damaged or
    replaced on disk under a running service). Cheap between checks: a file is hashed
    again only when its size or mtime changed since it last matched; ``full`` hashes
    every file."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        # (size, mtime_ns) of each file when it last matched; load_bundle verified them.
        self._matched: dict[str, tuple[int, int]] = {}
        for relative in bundle.files:
            with contextlib.suppress(OSError):
                self._matched[relative] = _stamp(bundle.file(relative))

    def problem(self, *, full: bool = False) -> str:
        """The first file that does not match bundle.json, in words ("" when all do)."""
        for relative, entry in self.bundle.files.items():
            path = self.bundle.file(relative)
            try:
                stamp = _stamp(path)
                if not full and self._matched.get(relative) == stamp:
                    continue
                intact = stamp[0] == entry.bytes and sha256_file(path) == entry.sha256
            except OSError:
                self._matched.pop(relative, None)
                return f"bundle file {relative} is missing or unreadable"
            if not intact:
                self._matched.pop(relative, None)
                return f"bundle file {relative} does not match its sha256 (damaged)"
            self._matched[relative] = stamp
        return ""


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _check_relative(relative: str, where: str) -> None:
    pure = PurePosixPath(relative)
    if (
        not relative
        or pure.is_absolute()
        or ".." in pure.parts
        or "\\" in relative
        or pure.parts[0] == ENGINES_DIR
        or relative == BUNDLE_FILE
    ):
        raise BundleError(
            f"{where}: files must be relative paths inside the bundle, "
            f"not {BUNDLE_FILE} or under {ENGINES_DIR}/"
        )


def _unique(values: Sequence[str], where: str) -> None:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise BundleError(f"{where}: {sorted(set(seen))} appear more than once")


# ---------------------------------------------------------------- writing


def write_bundle(
    destination: Path,
    *,
    name: str,
    version: str,
    intended_use: str,
    sources: Mapping[str, Path],
    encoder: EncoderSpec,
    heads: Sequence[HeadSpec],
    segmenter: SegmenterSpec | None = None,
    cell_head: HeadSpec | None = None,
    stain_reference: StainReference | None = None,
    qc: QcSpec | None = None,
    cells: CellsSpec | None = None,
    provenance: Mapping[str, Any] | None = None,
    patient_encoder: PatientEncoderSpec | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Copy ``sources`` ({path inside the bundle: file}) and write ``bundle.json``.

    The folder is assembled under a temporary name, loaded back with every check,
    and only then renamed into place, so a half-written bundle never exists.
    """
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise BundleError(f"{destination} exists; pass overwrite to replace it")
    for relative, source in sources.items():
        _check_relative(relative, f"sources[{relative!r}]")
        if not Path(source).is_file():
            raise BundleError(f"{relative}: source file {source} not found")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    try:
        files: dict[str, FileEntry] = {}
        for relative, source in sorted(sources.items()):
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            files[relative] = FileEntry(sha256_file(target), target.stat().st_size)
        manifest = Bundle(
            path=staging,
            sha256="",
            format_version=FORMAT_VERSION,
            name=name,
            version=version,
            intended_use=intended_use,
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            files=files,
            encoder=encoder,
            heads=tuple(heads),
            segmenter=segmenter,
            cell_head=cell_head,
            stain_reference=stain_reference,
            qc=qc or QcSpec.current(),
            cells=cells or CellsSpec(),
            provenance=dict(provenance or {}),
            patient_encoder=patient_encoder,
        )
        text = json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n"
        (staging / BUNDLE_FILE).write_text(text, encoding="utf-8")
        load_bundle(staging)  # the same checks a site runs, before anything is renamed
        if destination.exists():
            retired = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            os.replace(destination, retired)
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_bundle(destination)
