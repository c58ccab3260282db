"""Where a scan's (or a field photo's) physical pixel size comes from, in order of trust.

1. A sidecar ``<file>.json`` beside the file, e.g. ``field.png.json`` holding
   ``{"pixel_size_um": 0.25}`` (optionally ``pixel_size_um_y``) or
   ``{"camera": "bench1-100x"}``: a person wrote it for this very file, so it wins.
2. For a photo in a folder of fields, the folder's ``manifest.json`` with the same
   keys: one statement for every field of the smear.
3. The file's own metadata (OpenSlide ``mpp``, OME ``PhysicalSizeX``, TIFF /
   PNG / JPEG resolution with a physical unit), if plausible for a microscope:
   a camera's "72 dpi" means 353 um/px and is ignored.
4. The configuration: ``scan.camera`` (a named calibration) or else
   ``scan.pixel_size_um`` (0 = not set).

A named camera is a ``[cameras.<name>]`` section of the configuration (one
microscope, objective and camera, measured once with a stage micrometer:
``pixel_size_um``). None of these: ``PixelSizeError``. We never guess.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import PixelSizeError, fails_as

# Anything outside this range is not a brightfield microscope scan (4x objective ~2.5 um/px).
PLAUSIBLE_UM = (0.02, 10.0)
UM_PER_UNIT = {"inch": 25_400.0, "centimeter": 10_000.0, "millimeter": 1_000.0}
SIDECAR_SUFFIX = ".json"
_EXAMPLE = 'e.g. {"pixel_size_um": 0.25} or {"camera": "bench1-100x"}'


@dataclass(frozen=True)
class Calibration:
    """What the site's configuration says about pixel sizes, and what a field folder's
    manifest adds: the fallbacks for files that carry no size of their own."""

    pixel_size_um: float = 0.0  # scan.pixel_size_um; 0: not set
    camera: str = ""  # scan.camera: the named calibration files without a size use
    cameras: Mapping[str, float] = field(default_factory=dict)  # [cameras.<name>] um/px
    folder: tuple[float, float, str] | None = None  # a field folder's manifest: (x, y, source)

    def camera_um(self, path: Path, name: str, where: str) -> float:
        """um/px of a named camera; an unknown name is the input's fault, said plainly."""
        if name not in self.cameras:
            known = ", ".join(sorted(self.cameras)) or "none is configured"
            raise PixelSizeError(
                path, f"{where} names camera {name!r}, which the configuration lacks ({known})"
            )
        return self.cameras[name]

    def for_folder(self, x: float, y: float, source: str) -> Calibration:
        """This calibration with a field folder's own statement of its pixel size."""
        return replace(self, folder=(x, y, source))


def calibration(value: Calibration | float) -> Calibration:
    """A bare number is the configuration's ``scan.pixel_size_um`` alone."""
    return value if isinstance(value, Calibration) else Calibration(pixel_size_um=float(value))


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


def stated_um(
    path: Path, data: Mapping[str, Any], where: str, cal: Calibration
) -> tuple[float, float, str] | None:
    """(x, y, source) a sidecar or manifest states: a size, or a named camera; None if neither."""
    if "camera" in data:
        with fails_as(PixelSizeError, path, f"{where}: camera must be a name ({_EXAMPLE})"):
            name = str(data["camera"])
        um = cal.camera_um(path, name, where)
        return um, um, "camera"
    if "pixel_size_um" not in data:
        return None
    with fails_as(PixelSizeError, path, f"{where} must give the size, {_EXAMPLE}"):
        x = float(data["pixel_size_um"])
        y = float(data.get("pixel_size_um_y", x))
    if not (plausible(x) and plausible(y)):
        raise PixelSizeError(path, f"{where}: pixel size {x} um is implausible")
    return x, y, "sidecar"


def read_json(path: Path, source: Path, what: str) -> dict[str, Any]:
    """A small JSON object a person wrote (a sidecar, a manifest); one-line reasons."""
    with fails_as(PixelSizeError, path, f"{what} cannot be read"):
        text = source.read_text(encoding="utf-8")
    with fails_as(PixelSizeError, path, f"{what} is not valid JSON ({_EXAMPLE})"):
        data = json.loads(text)
    if not isinstance(data, dict):
        raise PixelSizeError(path, f"{what} must hold a JSON object, {_EXAMPLE}")
    return data


def resolve(
    path: Path,
    metadata_um: tuple[float, float] | None,
    configured: Calibration | float,
) -> tuple[float, float, str]:
    """(mpp_x, mpp_y, source) for ``path`` by the rule in this module's docstring."""
    cal = calibration(configured)
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        where = f"sidecar {sidecar.name}"
        stated = stated_um(path, read_json(path, sidecar, where), where, cal)
        if stated is None:
            raise PixelSizeError(path, f"{where} must give the size, {_EXAMPLE}")
        return stated
    if cal.folder is not None:
        return cal.folder
    if metadata_um is not None and plausible(metadata_um[0]) and plausible(metadata_um[1]):
        return metadata_um[0], metadata_um[1], "metadata"
    if cal.camera:
        um = cal.camera_um(path, cal.camera, "scan.camera")
        return um, um, "camera"
    if cal.pixel_size_um > 0:
        if not plausible(cal.pixel_size_um):
            raise PixelSizeError(
                path, f"configured pixel size {cal.pixel_size_um} um is implausible"
            )
        return cal.pixel_size_um, cal.pixel_size_um, "config"
    found = "" if metadata_um is None else f" (metadata says {metadata_um[0]:.4g} um, implausible)"
    raise PixelSizeError(
        path,
        f"no physical pixel size{found}: add {sidecar.name} with "
        '{"pixel_size_um": ...} (a folder of fields: its manifest.json), or set '
        "scan.pixel_size_um or scan.camera in the configuration",
    )
