"""Where a scan's physical pixel size comes from, in order of trust.

1. A sidecar ``<file>.json`` beside the scan, e.g. ``field.png.json`` holding
   ``{"pixel_size_um": 0.25}`` (optionally ``pixel_size_um_y``): a person wrote
   it for this very file, so it wins.
2. The file's own metadata (OpenSlide ``mpp``, OME ``PhysicalSizeX``, TIFF /
   PNG / JPEG resolution with a physical unit), if plausible for a microscope:
   a camera's "72 dpi" means 353 um/px and is ignored.
3. The configuration's ``scan.pixel_size_um`` (0 = not set).

None of these: ``PixelSizeError``. We never guess.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import PixelSizeError, fails_as

# Anything outside this range is not a brightfield microscope scan (4x objective ~2.5 um/px).
PLAUSIBLE_UM = (0.02, 10.0)
UM_PER_UNIT = {"inch": 25_400.0, "centimeter": 10_000.0, "millimeter": 1_000.0}


SIDECAR_SUFFIX = ".json"


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def plausible(um: float | None) -> bool:
    return um is not None and PLAUSIBLE_UM[0] <= um <= PLAUSIBLE_UM[1]


def from_resolution(pixels_per_unit: float, unit: str) -> float | None:
    """um/px from a resolution (pixels per ``unit``); None when the unit is not physical."""
    factor = UM_PER_UNIT.get(unit.lower())
    if factor is None or pixels_per_unit <= 0:
        return None
    return factor / pixels_per_unit


def _sidecar_um(path: Path, sidecar: Path) -> tuple[float, float]:
    example = 'e.g. {"pixel_size_um": 0.25}'
    with fails_as(PixelSizeError, path, f"sidecar {sidecar.name} cannot be read"):
        text = sidecar.read_text(encoding="utf-8")
    with fails_as(PixelSizeError, path, f"sidecar {sidecar.name} is not valid JSON ({example})"):
        data = json.loads(text)
    with fails_as(PixelSizeError, path, f"sidecar {sidecar.name} must give the size, {example}"):
        x = float(data["pixel_size_um"])
        return x, float(data.get("pixel_size_um_y", x))


def resolve(
    path: Path,
    metadata_um: tuple[float, float] | None,
    configured_um: float,
) -> tuple[float, float, str]:
    """(mpp_x, mpp_y, source) for ``path`` by the rule in this module's docstring."""
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        x, y = _sidecar_um(path, sidecar)
        if not (plausible(x) and plausible(y)):
            raise PixelSizeError(path, f"sidecar {sidecar.name}: pixel size {x} um is implausible")
        return x, y, "sidecar"
    if metadata_um is not None and plausible(metadata_um[0]) and plausible(metadata_um[1]):
        return metadata_um[0], metadata_um[1], "metadata"
    if configured_um > 0:
        if not plausible(configured_um):
            raise PixelSizeError(path, f"configured pixel size {configured_um} um is implausible")
        return configured_um, configured_um, "config"
    found = "" if metadata_um is None else f" (metadata says {metadata_um[0]:.4g} um, implausible)"
    raise PixelSizeError(
        path,
        f"no physical pixel size{found}: add {sidecar.name} with "
        '{"pixel_size_um": ...} or set scan.pixel_size_um in the configuration',
    )
