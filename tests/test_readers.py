"""Readers on files from our generator and from other writers, real photos, and memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from appliance.readers import (
    CellFolderError,
    EmptyFileError,
    open_cell_folder,
    open_scan,
    probe,
)
from appliance.readers.tiff_scan import TiffScan
from cytoedge_demo import synthetic
from export.probe_cells import render_cell_patches
from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
BCCD = SHARED_DATA / "bccd-sample"


def smooth_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colour pattern (so resampling errors stay small and measurable)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6, 3)
    rgb = [150 + 60 * np.sin(xx / 37 + yy / 53 + p) for p in phase]
    return np.stack(rgb, axis=-1).astype(np.uint8)


def test_region_equals_level0_pixels_and_tifffile_path_agrees(tmp_path: Path) -> None:
    path = tmp_path / "smear.tif"
    synthetic.write_smear(path, synthetic.SmearSpec(width=1200, height=900, seed=2))
    level0 = tifffile.imread(path, key=0)
    with open_scan(path) as scan:
        np.testing.assert_array_equal(scan.read_region(100, 50, 700, 600), level0[50:650, 100:800])
        # Beyond the scan reads as white glass.
        edge = scan.read_region(1100, 800, 200, 200)
        assert (edge[100:, :] == 255).all() and (edge[:, 100:] == 255).all()
        np.testing.assert_array_equal(edge[:100, :100], level0[800:900, 1100:1200])
        thumb = scan.thumbnail(4.0)
        assert thumb.shape == (57, 75, 3)
    tiff = TiffScan(path, 0.0)  # the fallback reader on the same file
    assert tiff.format == "tifffile:pyramid" and tiff.mpp_x == pytest.approx(0.25)
    np.testing.assert_array_equal(tiff.read_region(100, 50, 700, 600), level0[50:650, 100:800])
    tiff.close()


def test_finer_scan_is_resampled_to_quarter_micron(tmp_path: Path) -> None:
    """A plain tifffile pyramid at 0.125 um/px (not written by our generator)."""
    full = smooth_rgb(1024, 1536)
    path = tmp_path / "fine.tif"
    with tifffile.TiffWriter(path) as tif:
        for factor in (1, 2, 4):
            tif.write(
                full[::factor, ::factor],
                tile=(256, 256),
                photometric="rgb",
                resolution=(80_000 / factor, 80_000 / factor),
                resolutionunit="CENTIMETER",
                subfiletype=0 if factor == 1 else 1,
            )
    with open_scan(path) as scan:
        assert scan.mpp_x == pytest.approx(0.125)
        assert (scan.width, scan.height) == (768, 512)
        region = scan.read_region(100, 100, 300, 200).astype(float)
    # Level 1 (downsample 2) is exactly 0.25 um/px: the region is that level's pixels.
    expected = full[::2, ::2][100:300, 100:400].astype(float)
    assert np.abs(region - expected).mean() < 1.0


def test_ome_tiff_from_tifffile_uses_physical_size_and_subifd_pyramid(tmp_path: Path) -> None:
    data = smooth_rgb(1024, 1024, seed=3)
    path = tmp_path / "other writer.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(
            data,
            subifds=1,
            tile=(256, 256),
            photometric="rgb",
            metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
        )
        tif.write(data[::2, ::2], subfiletype=1, tile=(256, 256), photometric="rgb")
    info = probe(path)
    assert info.format == "tifffile:ome"
    assert info.pixel_size_um == pytest.approx(0.5)
    assert (info.width, info.height, info.level_count) == (2048, 2048, 2)
    with open_scan(path) as scan:
        enlarged = scan.read_region(0, 0, 400, 400).astype(float)
    assert np.abs(enlarged[::2, ::2] - data[:200, :200]).mean() < 3.0


def test_untiled_tiff_field_with_resolution_tags(tmp_path: Path) -> None:
    path = tmp_path / "field.tif"
    tifffile.imwrite(
        path, smooth_rgb(400, 500), resolution=(40_000, 40_000), resolutionunit="CENTIMETER"
    )
    with open_scan(path) as scan:
        assert scan.format == "tifffile:tiff" and scan.mpp_x == pytest.approx(0.25)
        assert scan.size == (500, 400)


def test_png_pixel_size_from_sidecar_metadata_or_config(tmp_path: Path) -> None:
    rgb = smooth_rgb(200, 300)
    with_dpi = tmp_path / "dpi.png"
    Image.fromarray(rgb).save(with_dpi, dpi=(101_600, 101_600))  # 0.25 um/px
    assert probe(with_dpi).pixel_size_source == "metadata"
    plain = tmp_path / "plain.png"
    Image.fromarray(rgb).save(plain)
    assert probe(plain, calibration=0.5).pixel_size_source == "config"
    (tmp_path / "plain.png.json").write_text(json.dumps({"pixel_size_um": 0.125}))
    info = probe(plain, calibration=0.5)
    assert (info.pixel_size_source, info.pixel_size_um) == ("sidecar", 0.125)
    assert (info.width, info.height) == (150, 100)
    camera = tmp_path / "camera.png"  # 72 dpi: a camera's default, not a microscope's
    Image.fromarray(rgb).save(camera, dpi=(72, 72))
    assert probe(camera, calibration=0.3).pixel_size_source == "config"


def boxes(xml_path: Path, name: str) -> list[tuple[int, int, int, int]]:
    root = ET.parse(xml_path).getroot()
    return [
        tuple(int(float(obj.find("bndbox").find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax"))
        for obj in root.iter("object")
        if obj.find("name").text == name
    ]


@pytest.mark.skipif(not BCCD.is_dir(), reason="shared data (bccd-sample) not present")
def test_real_bccd_photos_open_at_the_configured_pixel_size() -> None:
    photos = sorted(BCCD.glob("*.jpg"))
    assert len(photos) == 8
    opened = 0
    for photo in photos:
        if photo.stat().st_size == 0:  # one of the eight is a real zero-byte file
            with pytest.raises(EmptyFileError):
                probe(photo, calibration=0.07)
            continue
        with open_scan(photo, calibration=0.07) as scan:
            assert scan.format == "image:jpeg"
            assert (scan.width, scan.height) == (179, 134)  # 640x480 at 0.07 -> 0.25 um/px
            region = scan.read_region(0, 0, scan.width, scan.height)
            assert 120 < region.mean() < 230
        opened += 1
    assert opened == 7


def test_a_cell_folder_is_read_as_it_is_and_its_manifest_checked(tmp_path: Path) -> None:
    folder = tmp_path / "P1"
    folder.mkdir()
    for index, patch in enumerate(render_cell_patches(3, seed=1)):
        Image.fromarray(patch[40:184, 40:184]).save(folder / f"c{index}.tif")
    # No .ready: whether a folder is copied in full is the inbox's question, not the reader's.
    cells = open_cell_folder(folder)
    assert cells.patient_id == "P1" and len(cells) == 3
    assert probe(folder).format == "cells"
    (folder / "manifest.json").write_text(json.dumps({"cells": ["c0.tif", "c9.tif"]}))
    with pytest.raises(CellFolderError, match="missing"):
        open_cell_folder(folder)


PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from appliance.readers import open_scan
    from appliance.pipeline import tiles
    scan = open_scan(sys.argv[1])
    zone = tiles.cellular_zone(scan)
    everything = tiles.CellularZone(
        zone.in_zone | True, zone.cover, zone.thick, 4.0, zone.glass_rgb, 1.0
    )
    specs = tiles.tile_grid(scan, everything)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = 0
    for tile in tiles.iter_tiles(scan, specs):
        total += int(tile.image[0, 0, 0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(len(specs), before, peak)
    """
)


def flat_pyramid(path: Path, side: int) -> None:
    """A large tiled pyramid written cheaply: repeated tiles of a stained-looking pattern."""
    tile = synthetic.render_field(synthetic.SmearSpec(width=256, height=256, seed=1)).image

    def tiles_of(n: int):
        for _ in range(n * n):
            yield tile

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        n, um = side // 256, 0.25
        while n >= 1:
            tif.write(
                tiles_of(n),
                shape=(n * 256, n * 256, 3),
                dtype=np.uint8,
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                compressionargs={"level": 1},
                resolution=(10_000 / um, 10_000 / um),
                resolutionunit="CENTIMETER",
                subfiletype=0 if um == 0.25 else 1,
            )
            if n <= 4:
                break
            n, um = n // 4, um * 4


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_slide_size(tmp_path: Path) -> None:
    peaks = {}
    for side in (2048, 8192):  # 12 MB and 201 MB of pixels
        path = tmp_path / f"flat{side}.tif"
        flat_pyramid(path, side)
        out = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
            check=True,
        ).stdout.split()
        n_tiles, before, peak = (int(v) for v in out)
        assert n_tiles > 0
        peaks[side] = (n_tiles, before, peak)
    small, large = peaks[2048], peaks[8192]
    assert (small[0], large[0]) == (9, 121)  # every tile of both slides was read
    # ru_maxrss is in KiB: reading all tiles of a 201 MB slide costs < 40 MB more than 12 MB.
    assert large[2] - small[2] < 40_000, peaks
