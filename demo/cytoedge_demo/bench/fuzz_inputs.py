"""Mutated real files for the readers, and what the pipeline does with each one.

``seed_files`` gathers the files mutations start from: field photos (BCCD, Chula),
crops of them (for cell folders), OpenSlide's own test slides (SVS, TIFF, PNG, the
damaged ones too) and small TIFFs written here with tifffile (a tiled pyramid, an
OME-TIFF with a sub-IFD pyramid, an untiled field). ``fuzz_inputs`` is a hypothesis
strategy: a seed, one to three mutations, and the path that reads the result (a scan
file, a cell folder, a field folder). Mutations know the formats' structure (TIFF
directory entries, the JPEG frame header and JFIF density, PNG's IHDR with its CRC
kept right) or are
plain byte flips, inserts, deletions, overwrites and truncations.

``exercise`` reads an input the way the service does (``probe``, then the pipeline's
own reads: the thumbnail, the cellular zone and a few tiles of a scan; every field
of a folder read whole; every cell of a cell folder) and ``outcome`` sorts how that
ended: read, rejected with a one-line reason, or a failure named by its exception
type and where it was raised. Both the suite (tests/test_reader_fuzz.py) and
``cytoedge bench fuzz`` use them.
"""

from __future__ import annotations

import io
import json
import struct
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from hypothesis import strategies as st
from PIL import Image

from appliance.pipeline import tiles
from appliance.pipeline.cell_finding import thumbnail_grid
from appliance.pipeline.fields import read_field
from appliance.readers import (
    Calibration,
    FieldFolder,
    ScanError,
    is_field_file,
    open_cell_folder,
    open_field_folder,
    open_scan,
    probe,
    single_field,
)
from appliance.readers.formats import MANIFEST_FILE

# What a technician's site would configure: files without a pixel size are at 0.1 um/px.
CALIBRATION = Calibration(pixel_size_um=0.1)
FILE, CELLS, FIELDS = "file", "cells", "fields"
_PHOTOS_PER_SET = 2
_CROP_PX = 96

Draw = Callable[[st.SearchStrategy], object]


@dataclass(frozen=True)
class Seed:
    """A real file to mutate: its name, bytes, and the paths that read it."""

    name: str
    data: bytes
    targets: tuple[str, ...]


@dataclass(frozen=True)
class FuzzInput:
    """One mutated file and the path that reads it."""

    seed: str
    data: bytes
    target: str
    mutations: tuple[str, ...]

    @property
    def suffix(self) -> str:
        return Path(self.seed).suffix.lower()


@dataclass(frozen=True)
class Outcome:
    """How an input ended: ``read``, ``rejected`` (a ScanError) or ``failure``."""

    kind: str
    detail: str  # the ScanError's class, or the failure's type and where it was raised
    reason: str = ""  # a rejection's reason


# -- seeds --------------------------------------------------------------------------------


def _encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _tiff_bytes(write: Callable[[tifffile.TiffWriter], None]) -> bytes:
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        write(tif)
    return buffer.getvalue()


def _pyramid(rgb: np.ndarray, tif: tifffile.TiffWriter) -> None:
    """Levels as pages (OpenSlide's generic tiled TIFF), zlib tiles, 0.25 um/px."""
    for factor in (1, 2, 4):
        tif.write(
            rgb[::factor, ::factor],
            tile=(128, 128),
            photometric="rgb",
            compression="zlib",
            resolution=(40_000 / factor, 40_000 / factor),
            resolutionunit="CENTIMETER",
            subfiletype=0 if factor == 1 else 1,
        )


def _ome_pyramid(rgb: np.ndarray, tif: tifffile.TiffWriter) -> None:
    """An OME-TIFF whose pyramid is in sub-IFDs (read by tifffile, not OpenSlide)."""
    options = {"tile": (128, 128), "photometric": "rgb", "compression": "zlib"}
    tif.write(
        rgb,
        subifds=1,
        metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
        **options,
    )
    tif.write(rgb[::2, ::2], subfiletype=1, **options)


def seed_files(data: Path, slides: Path | None) -> list[Seed]:
    """The seeds under ``data`` (bccd-sample, chula-sample) and ``slides`` (OpenSlide's
    test files), plus TIFFs written from a photo; folders that are missing are skipped."""
    seeds: list[Seed] = []
    photos = [
        path
        for name in ("bccd-sample", "chula-sample")
        for path in sorted((data / name).glob("*.jpg"))[:_PHOTOS_PER_SET]
    ]
    for path in photos:
        seeds.append(Seed(f"{path.parent.name}-{path.name}", path.read_bytes(), (FILE, FIELDS)))
    if slides is not None and slides.is_dir():
        for name in ("small.svs", "boxes.tiff", "boxes.png", "unreadable.svs", "unopenable.tiff"):
            if (slides / name).is_file():
                seeds.append(Seed(name, (slides / name).read_bytes(), (FILE,)))
    if photos:
        with Image.open(photos[0]) as image:
            rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        top, left = (height - _CROP_PX) // 2, (width - _CROP_PX) // 2
        crop = Image.fromarray(rgb[top : top + _CROP_PX, left : left + _CROP_PX])
        seeds += [
            Seed("crop.png", _encoded(crop, "PNG"), (CELLS, FILE)),
            Seed("crop.jpg", _encoded(crop, "JPEG", quality=90), (CELLS, FILE)),
            Seed("crop.tif", _encoded(crop, "TIFF"), (CELLS, FILE)),
            Seed("pyramid.tif", _tiff_bytes(lambda tif: _pyramid(rgb[:384, :512], tif)), (FILE,)),
            Seed("ome.tif", _tiff_bytes(lambda tif: _ome_pyramid(rgb[:384, :512], tif)), (FILE,)),
            Seed(
                "field.tif",
                _tiff_bytes(lambda tif: tif.write(rgb, photometric="rgb", compression="zlib")),
                (FILE, FIELDS),
            ),
        ]
    return seeds


# -- mutations ----------------------------------------------------------------------------

INTERESTING = (0, 1, 2, 3, 7, 8, 16, 127, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 60_000, 65_536)
INTERESTING_32 = (*INTERESTING, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1_000_000, 2**24)
# ImageWidth, ImageLength, BitsPerSample, Compression, Photometric, StripOffsets,
# SamplesPerPixel, RowsPerStrip, StripByteCounts, PlanarConfig, TileWidth, TileLength,
# TileOffsets, TileByteCounts, SubIFDs, JPEGTables, SampleFormat, XResolution,
# YResolution, ResolutionUnit, NewSubfileType.
TIFF_TAGS = (
    *(256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 322, 323, 324, 325, 330, 347, 339),
    *(282, 283, 296, 254),
)
_TIFF_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}
# Pixels per inch or per cm: screen, print, and microscope-like (1 to 10 um/px) values.
DENSITIES = (0, 1, 72, 96, 300, 1000, 2540, 5000, 10_000, 25_400, 65_535)
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB})


@dataclass(frozen=True)
class TiffEntry:
    """One directory entry of a classic TIFF: where its value lies and how wide it is."""

    tag: int
    value_at: int  # offset of the first value
    size: int  # bytes per value
    count: int


def tiff_entries(data: bytes, limit: int = 64) -> tuple[str, list[TiffEntry]]:
    """The byte order and every entry of a classic TIFF's directory chain (at most
    ``limit`` directories); an empty list when the header is no classic TIFF."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 8 or struct.unpack(order + "H", data[2:4])[0] != 42:
        return "<", []
    entries: list[TiffEntry] = []
    offset = struct.unpack(order + "I", data[4:8])[0]
    seen: set[int] = set()
    while 0 < offset < len(data) - 2 and offset not in seen and len(seen) < limit:
        seen.add(offset)
        (n,) = struct.unpack(order + "H", data[offset : offset + 2])
        end = offset + 2 + 12 * n
        if end + 4 > len(data):
            break
        for at in range(offset + 2, end, 12):
            tag, kind, count = struct.unpack(order + "HHI", data[at : at + 8])
            size = _TIFF_TYPE_SIZE.get(kind, 1)
            inline = size * count <= 4
            value_at = at + 8 if inline else struct.unpack(order + "I", data[at + 8 : at + 12])[0]
            if value_at + size * max(count, 1) <= len(data):
                entries.append(TiffEntry(tag, value_at, size, count))
        (offset,) = struct.unpack(order + "I", data[end : end + 4])
    return order, entries


def _mutate_tiff_tag(draw: Draw, data: bytearray) -> str:
    order, entries = tiff_entries(bytes(data))
    if not entries:
        return _flip_bit(draw, data)
    chosen = [e for e in entries if e.tag in TIFF_TAGS] or entries
    entry = draw(st.sampled_from(chosen))
    index = draw(st.integers(0, max(entry.count, 1) - 1))
    at = entry.value_at + index * entry.size
    width = min(entry.size, 4)
    bound = 2 ** (8 * width) - 1
    value = draw(st.one_of(st.sampled_from(INTERESTING_32), st.integers(0, bound))) & bound
    data[at : at + width] = value.to_bytes(width, "little" if order == "<" else "big")
    return f"tiff tag {entry.tag}[{index}]={value}"


def _jpeg_frame(data: bytes) -> int | None:
    """Offset of the JPEG frame header's precision byte (after SOFn and its length)."""
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        if marker in _SOF_MARKERS:
            return at + 4 if at + 10 <= len(data) else None
        if marker == 0xDA:
            return None
        at += 2 + length
    return None


def _mutate_jpeg_frame(draw: Draw, data: bytearray) -> str:
    frame = _jpeg_frame(bytes(data))
    if frame is None:
        return _flip_bit(draw, data)
    field = draw(st.sampled_from(("precision", "height", "width", "components", "sampling")))
    at, width = {
        "precision": (frame, 1),
        "height": (frame + 1, 2),
        "width": (frame + 3, 2),
        "components": (frame + 5, 1),
        "sampling": (frame + 7, 1),
    }[field]
    value = draw(st.sampled_from(INTERESTING)) & (2 ** (8 * width) - 1)
    data[at : at + width] = value.to_bytes(width, "big")
    return f"jpeg {field}={value}"


def _mutate_jfif_density(draw: Draw, data: bytearray) -> str:
    """The JFIF header's unit and density: the pixel size a photo states for itself."""
    if data[6:11] != b"JFIF\0" or len(data) < 18:
        return _flip_bit(draw, data)
    unit = draw(st.sampled_from((0, 1, 2, 3)))
    density = draw(st.one_of(st.sampled_from(DENSITIES), st.integers(0, 0xFFFF)))
    data[13] = unit
    data[14:18] = struct.pack(">HH", density, density)
    return f"jfif unit {unit} density {density}"


def _mutate_png_header(draw: Draw, data: bytearray) -> str:
    if data[12:16] != b"IHDR" or len(data) < 33:
        return _flip_bit(draw, data)
    field = draw(st.sampled_from(("width", "height", "depth", "colour", "interlace")))
    at, width = {
        "width": (16, 4),
        "height": (20, 4),
        "depth": (24, 1),
        "colour": (25, 1),
        "interlace": (28, 1),
    }[field]
    value = draw(st.sampled_from(INTERESTING_32)) & (2 ** (8 * width) - 1)
    data[at : at + width] = value.to_bytes(width, "big")
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the header stays valid
    return f"png {field}={value}"


def _position(draw: Draw, data: bytearray) -> int:
    """Anywhere, though headers (the first KiB) are hit as often as the rest."""
    head = st.integers(0, min(len(data), 1024) - 1)
    return draw(st.one_of(head, st.integers(0, len(data) - 1)))


def _flip_bit(draw: Draw, data: bytearray) -> str:
    at = _position(draw, data)
    bit = draw(st.integers(0, 7))
    data[at] ^= 1 << bit
    return f"flip {at}.{bit}"


def _overwrite(draw: Draw, data: bytearray) -> str:
    at = _position(draw, data)
    width = draw(st.sampled_from((1, 2, 4)))
    value = draw(st.sampled_from(INTERESTING_32)) & (2 ** (8 * width) - 1)
    order = draw(st.sampled_from(("little", "big")))
    data[at : at + width] = value.to_bytes(width, order)  # type: ignore[arg-type]
    return f"set {at}={value}"


def _insert(draw: Draw, data: bytearray) -> str:
    at = _position(draw, data)
    extra = draw(st.binary(min_size=1, max_size=16))
    data[at:at] = extra
    return f"insert {at}+{len(extra)}"


def _delete(draw: Draw, data: bytearray) -> str:
    at = _position(draw, data)
    count = draw(st.integers(1, 64))
    del data[at : at + count]
    return f"delete {at}-{count}"


def _truncate(draw: Draw, data: bytearray) -> str:
    at = draw(st.integers(0, len(data) - 1))
    del data[at:]
    return f"truncate {at}"


MUTATORS = (
    _mutate_tiff_tag,
    _mutate_jpeg_frame,
    _mutate_jfif_density,
    _mutate_png_header,
    _flip_bit,
    _overwrite,
    _insert,
    _delete,
    _truncate,
)


@st.composite
def fuzz_inputs(draw: Draw, seeds: Sequence[Seed]) -> FuzzInput:
    """A seed with one to three mutations, and the path that reads it."""
    seed = draw(st.sampled_from(seeds))
    data = bytearray(seed.data)
    done = []
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        done.append(draw(st.sampled_from(MUTATORS))(draw, data))
    target = draw(st.sampled_from(seed.targets))
    return FuzzInput(seed.name, bytes(data), target, tuple(done))


# -- reading them -------------------------------------------------------------------------

_GOOD_CROP_PX = 64


def place(item: FuzzInput, folder: Path) -> Path:
    """Write ``item`` under ``folder`` as what its target reads; returns the path to read.

    A cell folder holds the mutated crop beside a good one; a field folder lists the
    mutated photo (with its pixel size) in its manifest.
    """
    if item.target == FILE:
        path = folder / f"input{item.suffix}"
        path.write_bytes(item.data)
        return path
    scan = folder / item.target
    scan.mkdir()
    (scan / f"a{item.suffix}").write_bytes(item.data)
    if item.target == CELLS:
        good = np.full((_GOOD_CROP_PX, _GOOD_CROP_PX, 3), (230, 200, 210), np.uint8)
        Image.fromarray(good).save(scan / "b.png")
    else:
        manifest = {"fields": [f"a{item.suffix}"], "pixel_size_um": CALIBRATION.pixel_size_um}
        (scan / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    return scan


def _read_scan(path: Path) -> None:
    """The pipeline's reads of a scan file: thumbnail, cellular zone, and of the zone's
    tiles the first, a middle one and the last."""
    with open_scan(path, CALIBRATION) as scan:
        scan.thumbnail(thumbnail_grid(scan.width, scan.height)[0])
        zone = tiles.cellular_zone(scan)
        specs = tiles.tile_grid(scan, zone)
        picks = {0, len(specs) // 2, len(specs) - 1} if specs else set()
        for index in sorted(picks):
            tiles.read_tile(scan, specs[index])


def _read_fields(folder: FieldFolder) -> None:
    """Each field photo read whole at the working grid, by the pipeline's own function."""
    for index in range(len(folder)):
        read_field(folder, index)


def exercise(path: Path) -> None:
    """Read ``path`` as the service does: ``probe``, then what the pipeline reads.

    Raises what the readers raise; a ``ScanError`` is the input's fault said in words.
    """
    probe(path, CALIBRATION)
    if path.is_dir() and (path / MANIFEST_FILE).is_file() and path.name == FIELDS:
        _read_fields(open_field_folder(path, CALIBRATION))
    elif path.is_dir():
        for _ in open_cell_folder(path):
            pass
    elif is_field_file(path):
        _read_fields(single_field(path, CALIBRATION))
    else:
        _read_scan(path)


def where_raised(exc: BaseException) -> str:
    """The innermost frame of the project's code that ``exc`` passed (else the innermost)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/appliance/" in f.filename] or frames
    if not ours:
        return "?"
    frame = ours[-1]
    name = frame.filename.split("/appliance/", 1)[-1]
    return f"{name}:{frame.lineno} ({frame.name})"


def outcome(path: Path) -> Outcome:
    """``exercise(path)``, sorted: read, rejected with a one-line reason, or a failure."""
    try:
        exercise(path)
    except ScanError as exc:
        if not exc.reason or "\n" in exc.reason or "Traceback" in exc.reason:
            return Outcome("failure", f"{type(exc).__name__} without a one-line reason")
        return Outcome("rejected", type(exc).__name__, exc.reason)
    except Exception as exc:
        return Outcome("failure", f"{type(exc).__name__} at {where_raised(exc)}")
    return Outcome("read", "")
