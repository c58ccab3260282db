"""TIFFs OpenSlide rejects (OME-TIFF with sub-IFD pyramids, untiled fields), read with tifffile.

Tiled pages are read tile by tile straight from the file (no whole-page decode);
an untiled page is decoded whole once, so it must be small (``MAX_FIELD_PIXELS``).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile

from . import pixel_size
from .base import Level, Scan
from .errors import (
    ImageTooLargeError,
    NotBrightfieldError,
    ScanError,
    UnreadableScanError,
    UnsupportedScanError,
    fails_as,
)
from .limits import MAX_FIELD_PIXELS, check_dimensions, check_tile

_DAMAGED_STRUCTURE = "the TIFF is damaged: its header or image directory cannot be read"
_TRUNCATED_TILE = "truncated file: a tile's data stops before its end (the copy may be incomplete)"
_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_um(xml: str) -> tuple[float, float] | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("}Pixels") or element.tag == "Pixels":
            try:
                x = float(element.attrib["PhysicalSizeX"])
                y = float(element.attrib.get("PhysicalSizeY", x))
            except (KeyError, ValueError):
                return None
            scale = _OME_UNITS_UM.get(element.attrib.get("PhysicalSizeXUnit", "µm"))
            return None if scale is None else (x * scale, y * scale)
    return None


def _compression_error(path: Path, compression: int) -> ScanError:
    """A compression tifffile cannot decode here: unsupported when it is a known codec,
    unreadable (most likely damaged) when the TIFF names a code no codec has."""
    # tifffile gives a COMPRESSION member for codes it knows, the bare number otherwise.
    name = getattr(compression, "name", None)
    if name is None:
        return UnreadableScanError(
            path,
            f"the TIFF's image data uses an unknown compression (code {int(compression)}): "
            "the file is damaged or was written by software this appliance does not support",
        )
    # Reached only for TIFFs OpenSlide does not open (it decodes these codecs itself).
    return UnsupportedScanError(
        path,
        f"this TIFF cannot be decoded: it is {name.replace('_', ' ')}-compressed but not a "
        "tiled slide scan the slide reader opens (or it is damaged)",
    )


def _check_rgb_samples(path: Path, page: tifffile.TiffPage) -> None:
    """8-bit RGB, or RGBA: more samples would multiply what a decode allocates (a header
    claiming 12073 samples made a 640 x 480 field 3.7 GB)."""
    if page.samplesperpixel not in (3, 4) or page.dtype != np.uint8:
        raise NotBrightfieldError(
            path,
            f"the TIFF holds {page.samplesperpixel} samples per pixel of {page.bitspersample} "
            "bits: an 8-bit colour (RGB) scan is needed",
        )


def check_tile_count(path: Path, page: tifffile.TiffPage) -> None:
    """A tiled page must list a tile for every place of its grid. Fewer is a damaged
    directory (a dimension or a count changed), whose missing tiles every reader would
    read as glass, one by one, however large the dimensions claim the image is."""
    if not page.is_tiled:
        return
    if min(page.tilewidth, page.tilelength, page.tiledepth) <= 0:
        raise UnreadableScanError(path, _DAMAGED_STRUCTURE)
    needed = (
        math.ceil(page.imagewidth / page.tilewidth)
        * math.ceil(page.imagelength / page.tilelength)
        * math.ceil(max(page.imagedepth, 1) / page.tiledepth)
    )
    if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
        needed *= page.samplesperpixel
    if len(page.dataoffsets) < needed or len(page.databytecounts) < needed:
        raise UnreadableScanError(
            path,
            f"the TIFF is damaged: it lists {len(page.dataoffsets)} tiles where its "
            f"{page.imagewidth}x{page.imagelength} px image needs {needed}",
        )


def check_tiff_tiles(path: Path) -> None:
    """``check_tile_count`` on every page of a TIFF that tifffile parses (one it cannot
    parse is left to the reader that opens it)."""
    try:
        with tifffile.TiffFile(path) as tif:
            pages = [page for page in tif.pages if isinstance(page, tifffile.TiffPage)]
    except Exception:
        return
    for page in pages:
        check_tile_count(path, page)


def _tag_um(page: tifffile.TiffPage) -> tuple[float, float] | None:
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    unit = {2: "inch", 3: "centimeter"}.get(int(tags["ResolutionUnit"].value), "none")

    def per_unit(name: str) -> float:
        num, den = tags[name].value
        return num / den if den else 0.0

    x = pixel_size.from_resolution(per_unit("XResolution"), unit)
    y = pixel_size.from_resolution(per_unit("YResolution"), unit) if "YResolution" in tags else x
    return (x, y) if x and y else None


class TiffScan(Scan):
    def __init__(self, path: Path, configured: pixel_size.Calibration | float) -> None:
        with fails_as(UnreadableScanError, path, _DAMAGED_STRUCTURE):
            self._tif = tifffile.TiffFile(path)
        self.path = path  # the early decode below runs before Scan.__init__ sets it
        self._whole: dict[int, np.ndarray] = {}
        try:
            with fails_as(UnreadableScanError, path, _DAMAGED_STRUCTURE):
                self._pages, levels, kind, metadata = self._inspect(path)
            mpp_x, mpp_y, source = pixel_size.resolve(path, metadata, configured)
            self._read_checked(len(levels) - 1, 0, 0, 1, 1)  # decode one tile now: fail early
        except BaseException:
            self._tif.close()
            raise
        self.format = f"tifffile:{kind}"
        super().__init__(path, levels, mpp_x, mpp_y, source)

    def _inspect(
        self, path: Path
    ) -> tuple[list[tifffile.TiffPage], tuple[Level, ...], str, tuple[float, float] | None]:
        series = self._tif.series[0]
        pages = [level.keyframe for level in series.levels]
        first = pages[0]
        if first.photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE):
            extra = f" with {series.shape[0]} channels" if len(series.shape) > 2 else ""
            raise NotBrightfieldError(
                path,
                f"grayscale or fluorescence TIFF{extra}: a colour (RGB) brightfield scan is needed",
            )
        for page in pages:
            _check_rgb_samples(path, page)
        if first.planarconfig != tifffile.PLANARCONFIG.CONTIG:
            raise UnsupportedScanError(path, "planar (separate-channel) RGB TIFF is not supported")
        base_w, base_h = first.imagewidth, first.imagelength
        check_dimensions(path, base_w, base_h)
        size = path.stat().st_size
        for page in pages:
            end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)))
            if end > size:
                raise UnreadableScanError(
                    path,
                    f"truncated file: the image data needs {end} bytes but the file has {size} "
                    "(the copy may be incomplete)",
                )
            if page.compression not in tifffile.TIFF.DECOMPRESSORS:
                raise _compression_error(path, page.compression)
        levels = []
        for page in pages:
            if page.is_tiled:
                check_tile(path, page.tilewidth, page.tilelength)
                check_tile_count(path, page)
            if not page.is_tiled and page.imagewidth * page.imagelength > MAX_FIELD_PIXELS:
                raise ImageTooLargeError(
                    path,
                    f"untiled {page.imagewidth}x{page.imagelength} image cannot be read without "
                    "loading it whole: convert it to a tiled pyramidal TIFF",
                )
            levels.append(Level(page.imagewidth, page.imagelength, base_w / page.imagewidth))
        kind = "ome" if self._tif.is_ome else ("pyramid" if len(pages) > 1 else "tiff")
        metadata = _ome_um(self._tif.ome_metadata or "") if self._tif.is_ome else None
        return pages, tuple(levels), kind, metadata or _tag_um(first)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self._pages[level]
        if not page.is_tiled:
            if level not in self._whole:
                self._whole[level] = page.asarray()[..., :3]
            return self._whole[level][y : y + h, x : x + w]
        return self._read_tiles(page, x, y, w, h)

    def _read_tiles(self, page: tifffile.TiffPage, x: int, y: int, w: int, h: int) -> np.ndarray:
        tw, th = page.tilewidth, page.tilelength
        tiles_across = math.ceil(page.imagewidth / tw)
        out = np.full((h, w, 3), 255, np.uint8)
        handle = self._tif.filehandle
        for row in range(y // th, (y + h - 1) // th + 1):
            for col in range(x // tw, (x + w - 1) // tw + 1):
                index = row * tiles_across + col
                offset, count = page.dataoffsets[index], page.databytecounts[index]
                if count == 0:
                    continue  # a sparse tile: empty glass
                handle.seek(offset)
                data = handle.read(count)
                if len(data) != count:
                    raise UnreadableScanError(self.path, _TRUNCATED_TILE)
                segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
                tile = segment[0, :, :, :3]
                ty0, tx0 = row * th, col * tw
                sy0, sx0 = max(y, ty0), max(x, tx0)
                sy1, sx1 = min(y + h, ty0 + th), min(x + w, tx0 + tw)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[
                    sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0
                ]
        return out

    def close(self) -> None:
        self._tif.close()
