"""Every bad input gets a typed ScanError with a one-line reason; nothing crashes."""

from __future__ import annotations

import errno
import logging
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from appliance.pipeline import tiles
from appliance.readers import (
    BlankScanError,
    CellFolderError,
    EmptyFileError,
    ImageTooLargeError,
    NotAnImageError,
    NotBrightfieldError,
    PixelSizeError,
    ScanError,
    ScanNotFoundError,
    UnreadableScanError,
    UnsupportedScanError,
    open_cell_folder,
    open_scan,
    probe,
    scan_fingerprint,
    scan_members,
)
from appliance.readers.errors import fails_as
from cytoedge_demo import synthetic
from tests.conftest import SHARED_DATA, assert_technician_reason


def stained(height: int = 300, width: int = 400) -> np.ndarray:
    return synthetic.render_field(synthetic.SmearSpec(width=width, height=height, seed=1)).image


def fake_svs(path: Path) -> None:
    """A small Aperio-style SVS (OpenSlide detects it as "aperio" from the description)."""
    data = stained(1024, 1024)
    with tifffile.TiffWriter(path) as tif:
        description = "Aperio Image Library v12.0.0\n1024x1024 [0,0 1024x1024] (256x256)|MPP = 0.25"
        tif.write(data, tile=(256, 256), photometric="rgb", description=description, metadata=None)
        tif.write(data[::4, ::4], tile=(256, 256), photometric="rgb", metadata=None)


def zero_byte(tmp: Path) -> Path:
    path = tmp / "empty.svs"
    path.touch()
    return path


def truncated_svs(tmp: Path) -> Path:
    path = tmp / "cut.svs"
    fake_svs(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def text_with_slide_extension(tmp: Path) -> Path:
    path = tmp / "notes.ndpi"
    path.write_text("patient 12, smear 3: re-scan tomorrow\n")
    return path


def corrupt_tiff(tmp: Path) -> Path:
    """A TIFF header whose first directory points past the end of the file."""
    path = tmp / "broken.tif"
    path.write_bytes(b"II*\x00" + struct.pack("<I", 10_000_000) + b"\x00" * 64)
    return path


def png_without_pixel_size(tmp: Path) -> Path:
    path = tmp / "field.png"
    Image.fromarray(stained()).save(path)
    return path


def grayscale_png(tmp: Path) -> Path:
    path = tmp / "grey.png"
    Image.fromarray(stained()).convert("L").save(path)
    (tmp / "grey.png.json").write_text('{"pixel_size_um": 0.25}')
    return path


def grey_as_rgb_jpeg(tmp: Path) -> Path:
    path = tmp / "grey-rgb.png"
    Image.fromarray(stained()).convert("L").convert("RGB").save(path)
    (tmp / "grey-rgb.png.json").write_text('{"pixel_size_um": 0.25}')
    return path


def fluorescence_ome(tmp: Path) -> Path:
    """Three 16-bit channels on black, as a fluorescence scanner writes them."""
    rng = np.random.default_rng(0)
    channels = (rng.random((3, 256, 256)) * 200).astype(np.uint16)
    path = tmp / "dapi.ome.tif"
    tifffile.imwrite(
        path, channels, ome=True, metadata={"axes": "CYX", "PhysicalSizeX": 0.25}, tile=(128, 128)
    )
    return path


def dark_field_rgb(tmp: Path) -> Path:
    """RGB, but bright spots on a black background: fluorescence / dark-field."""
    image = np.zeros((300, 400, 3), np.uint8)
    image[100:140, 100:140] = (40, 220, 60)
    image[200:230, 250:290] = (200, 40, 40)
    path = tmp / "dark.png"
    Image.fromarray(image).save(path)
    (tmp / "dark.png.json").write_text('{"pixel_size_um": 0.25}')
    return path


def png_bomb(tmp: Path) -> Path:
    """A tiny PNG whose header claims 200,000 x 200,000 pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", 200_000, 200_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    data += chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    path = tmp / "bomb.png"
    path.write_bytes(data)
    (tmp / "bomb.png.json").write_text('{"pixel_size_um": 0.25}')
    return path


def tiff_bomb(tmp: Path) -> Path:
    """A tiled TIFF whose ImageWidth tag is patched to 500,000 px."""
    path = tmp / "bomb.tif"
    tifffile.imwrite(
        path, np.full((16, 65_536, 3), 200, np.uint8), tile=(16, 256), photometric="rgb"
    )
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].tags["ImageWidth"].valueoffset
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack("<I", 500_000))
    return path


def missing(tmp: Path) -> Path:
    return tmp / "never written.svs"


CASES: list[tuple[Callable[[Path], Path], type[ScanError], str]] = [
    (zero_byte, EmptyFileError, "0 bytes"),
    (truncated_svs, UnreadableScanError, "truncated"),
    (text_with_slide_extension, NotAnImageError, "not an image"),
    (corrupt_tiff, UnreadableScanError, "TIFF"),
    (png_without_pixel_size, PixelSizeError, "pixel size"),
    (grayscale_png, NotBrightfieldError, ""),
    (grey_as_rgb_jpeg, NotBrightfieldError, "grayscale"),
    (fluorescence_ome, NotBrightfieldError, "fluorescence"),
    (dark_field_rgb, NotBrightfieldError, "dark background"),
    (png_bomb, ImageTooLargeError, "exceed"),
    (tiff_bomb, ImageTooLargeError, "exceed"),
    (missing, ScanNotFoundError, "not found"),
]


@pytest.mark.parametrize(("make", "error", "words"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_is_a_typed_error_with_a_one_line_reason(
    tmp_path: Path, make: Callable[[Path], Path], error: type[ScanError], words: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(error) as caught:
        probe(path)
    reason = caught.value.reason
    assert reason and "\n" not in reason and len(reason) < 240
    assert words.lower() in reason.lower()
    assert path.name in str(caught.value)


def test_the_untruncated_svs_opens_as_aperio(tmp_path: Path) -> None:
    """The control for the truncated case: the same file whole is fine."""
    path = tmp_path / "whole.svs"
    fake_svs(path)
    info = probe(path)
    assert info.format == "openslide:aperio" and info.pixel_size_um == pytest.approx(0.25)


def test_blank_slide_is_rejected_at_the_cellular_zone(tmp_path: Path) -> None:
    path = tmp_path / "blank.tif"
    synthetic.write_smear(path, synthetic.SmearSpec(width=1024, height=1024, variant="blank"))
    with open_scan(path) as scan, pytest.raises(BlankScanError, match="blank"):
        tiles.cellular_zone(scan)


def test_paths_with_spaces_and_non_ascii_characters(tmp_path: Path) -> None:
    folder = tmp_path / "Patientin Müller 12 – Ausstrich"
    folder.mkdir()
    path = folder / "frottis n° 3 ñ 血液.tif"
    synthetic.write_smear(path, synthetic.SmearSpec(width=512, height=512, seed=2))
    info = probe(path)
    assert info.width == 512 and info.format == "openslide:generic-tiff"
    png = folder / "champ é 1.png"
    Image.fromarray(stained()).save(png)
    (folder / "champ é 1.png.json").write_text('{"pixel_size_um": 0.25}', encoding="utf-8")
    assert probe(png).pixel_size_source == "sidecar"


def test_bad_sidecar_and_absurd_configured_pixel_size(tmp_path: Path) -> None:
    path = png_without_pixel_size(tmp_path)
    with pytest.raises(PixelSizeError, match="implausible"):
        probe(path, calibration=500.0)
    (tmp_path / "field.png.json").write_text("{not json")
    with pytest.raises(PixelSizeError, match="sidecar"):
        probe(path, calibration=0.25)


# --- Real files: openslide-python's test slides and damaged copies of real photos -------------


def copy_of(source: Path, tmp: Path, name: str | None = None) -> Path:
    path = tmp / (name or source.name)
    path.write_bytes(source.read_bytes())
    return path


def truncated(source: Path, tmp: Path, name: str, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    path = tmp / name
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def header_zeroed(source: Path, tmp: Path, name: str, n: int = 16) -> Path:
    data = bytearray(source.read_bytes())
    data[:n] = bytes(n)
    path = tmp / name
    path.write_bytes(bytes(data))
    return path


def garbled(source: Path, tmp: Path, name: str, start: float = 0.3, end: float = 0.8) -> Path:
    """The bytes from ``start`` to ``end`` (fractions of the file) replaced by noise."""
    data = bytearray(source.read_bytes())
    lo, hi = int(len(data) * start), int(len(data) * end)
    data[lo:hi] = np.random.default_rng(1).integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    path = tmp / name
    path.write_bytes(bytes(data))
    return path


def photo_pixels() -> np.ndarray:
    return np.asarray(Image.open(SHARED_DATA / "chula-sample" / "1.jpg").convert("RGB"))


Make = Callable[[Path, Path], Path]
# (id, make(openslide files folder, tmp) -> path, the error with a pixel size configured)
OPENSLIDE_CASES: list[tuple[str, Make, type[ScanError]]] = [
    ("unopenable.tiff", lambda f, t: copy_of(f / "unopenable.tiff", t), UnreadableScanError),
    ("unreadable.svs", lambda f, t: copy_of(f / "unreadable.svs", t), UnreadableScanError),
    (
        "svs cut in half",
        lambda f, t: truncated(f / "small.svs", t, "cut.svs"),
        UnsupportedScanError,  # OpenSlide no longer knows it; tifffile has no JPEG codec
    ),
    (
        "tiff with its header zeroed",
        lambda f, t: header_zeroed(f / "boxes.tiff", t, "zero.tiff", 8),
        NotAnImageError,
    ),
    (
        "tiff with noise in its directory",
        lambda f, t: garbled(f / "boxes.tiff", t, "noise.tiff", 0.3, 0.9),
        UnreadableScanError,
    ),
    (
        "dicom cut in half",
        lambda f, t: truncated(f / "boxes_0.dcm", t, "cut.dcm"),
        UnreadableScanError,
    ),
    (
        "dicom with noise",
        lambda f, t: garbled(f / "boxes_0.dcm", t, "noise.dcm", 0.3, 0.9),
        UnreadableScanError,
    ),
    (
        "dicom without its DICM marker",
        lambda f, t: header_zeroed(f / "boxes_0.dcm", t, "no-marker.dcm", 132),
        NotAnImageError,
    ),
    ("png cut in half", lambda f, t: truncated(f / "boxes.png", t, "cut.png"), UnreadableScanError),
    (
        "png renamed .docx",
        lambda f, t: copy_of(f / "boxes.png", t, "boxes.docx"),
        UnsupportedScanError,
    ),
]


def deflate_tiff(tmp: Path) -> Path:
    path = tmp / "strips.tif"
    tifffile.imwrite(path, photo_pixels(), photometric="rgb", compression="zlib")
    return path


def tiled_tiff(tmp: Path) -> Path:
    path = tmp / "tiled.tif"
    tifffile.imwrite(path, photo_pixels(), photometric="rgb", tile=(256, 256), compression="zlib")
    return path


def as_png(tmp: Path) -> Path:
    path = tmp / "photo.png"
    Image.fromarray(photo_pixels()).save(path)
    return path


def as_bmp(tmp: Path) -> Path:
    path = tmp / "photo.bmp"
    Image.fromarray(photo_pixels()).save(path)
    return path


JPEG = SHARED_DATA / "chula-sample" / "1.jpg"
# (id, make(tmp) -> path, the error with a pixel size configured): real photos damaged.
PHOTO_CASES: list[tuple[str, Callable[[Path], Path], type[ScanError]]] = [
    ("jpeg cut in half", lambda t: truncated(JPEG, t, "cut.jpg"), UnreadableScanError),
    ("jpeg with its header zeroed", lambda t: header_zeroed(JPEG, t, "zero.jpg"), NotAnImageError),
    ("jpeg with noise", lambda t: garbled(JPEG, t, "noise.jpg"), UnreadableScanError),
    ("jpeg renamed .dat", lambda t: copy_of(JPEG, t, "photo.dat"), UnsupportedScanError),
    (
        "text named .tif",
        lambda t: text_with_slide_extension(t).rename(t / "notes.tif"),
        NotAnImageError,
    ),
    (
        "strip tiff with noise",
        lambda t: garbled(deflate_tiff(t), t, "noise-strips.tif", 0.2, 0.8),
        UnreadableScanError,
    ),
    (
        "tiled tiff cut short",
        lambda t: truncated(tiled_tiff(t), t, "cut-tiled.tif", 0.7),
        UnreadableScanError,
    ),
    (
        "tiled tiff with noise",
        lambda t: garbled(tiled_tiff(t), t, "noise-tiled.tif", 0.1, 0.6),
        UnreadableScanError,
    ),
    ("png with noise", lambda t: garbled(as_png(t), t, "noise.png"), UnreadableScanError),
    ("bmp cut in half", lambda t: truncated(as_bmp(t), t, "cut.bmp"), UnreadableScanError),
    (
        "bmp with its header zeroed",
        lambda t: header_zeroed(as_bmp(t), t, "zero.bmp", 2),
        NotAnImageError,
    ),
]


def assert_rejected_everywhere(path: Path, error: type[ScanError], pixel_size_um: float) -> None:
    """open_scan and probe both raise a ScanError (nothing else) with a technician's reason;
    with a pixel size configured, ``error``; without one, that or the missing pixel size."""
    expected = error if pixel_size_um else (error, PixelSizeError)
    for read in (open_scan, probe):
        with pytest.raises(ScanError) as caught:
            read(path, pixel_size_um)
        assert isinstance(caught.value, expected), (read.__name__, caught.value)
        assert_technician_reason(caught.value.reason)


@pytest.mark.parametrize("pixel_size_um", [0.25, 0.0])
@pytest.mark.parametrize(
    ("make", "error"), [c[1:] for c in OPENSLIDE_CASES], ids=[c[0] for c in OPENSLIDE_CASES]
)
def test_real_broken_slides_are_rejected_with_a_sentence(
    openslide_files: Path, tmp_path: Path, make: Make, error: type[ScanError], pixel_size_um: float
) -> None:
    assert_rejected_everywhere(make(openslide_files, tmp_path), error, pixel_size_um)


@pytest.mark.skipif(not JPEG.is_file(), reason="shared data (chula-sample) not present")
@pytest.mark.parametrize("pixel_size_um", [0.25, 0.0])
@pytest.mark.parametrize(
    ("make", "error"), [c[1:] for c in PHOTO_CASES], ids=[c[0] for c in PHOTO_CASES]
)
def test_damaged_copies_of_real_photos_are_rejected_with_a_sentence(
    tmp_path: Path, make: Callable[[Path], Path], error: type[ScanError], pixel_size_um: float
) -> None:
    assert_rejected_everywhere(make(tmp_path), error, pixel_size_um)


def test_the_unopenable_tiff_says_its_compression_is_unknown(openslide_files: Path) -> None:
    """It crashed the TIFF reader's own message once ('int' object has no attribute 'name')."""
    with pytest.raises(UnreadableScanError) as caught:
        open_scan(openslide_files / "unopenable.tiff", calibration=0.25)
    assert "unknown compression (code 52479)" in caught.value.reason


def test_the_good_openslide_files_open(openslide_files: Path, tmp_path: Path) -> None:
    for name in ("small.svs", "\N{NEUTRAL FACE}.svs"):
        info = probe(openslide_files / name)  # Aperio's MPP: no configured size needed
        assert (info.format, info.pixel_size_source) == ("openslide:aperio", "metadata")
    with pytest.raises(PixelSizeError) as caught:  # 72 dpi is a screen's, not a microscope's
        probe(openslide_files / "boxes.tiff")
    assert "implausible" in caught.value.reason
    assert_technician_reason(caught.value.reason)
    assert probe(openslide_files / "boxes.tiff", 0.25).format == "openslide:generic-tiff"
    for name in ("boxes.png", "boxes-no-icc.png"):
        info = probe(openslide_files / name, 0.25)
        assert (info.format, info.width, info.height) == ("image:png", 300, 250)
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        copy_of(openslide_files / name, wsi)
    assert probe(wsi / "boxes_1.dcm").format == "openslide:dicom"
    members = scan_members(wsi / "boxes_1.dcm")
    assert members.path == wsi / "boxes_0.dcm" and len(members.files()) == 2
    assert scan_fingerprint(wsi) == scan_fingerprint(wsi / "boxes_1.dcm")


def cell_crop(size: int = 144) -> Image.Image:
    return Image.fromarray(photo_pixels()[100:244, 200:344]).resize((size, size))


def cells_with_a_text_file(folder: Path) -> None:
    cell_crop().save(folder / "c1.png")
    (folder / "c0.png").write_text("not a cell\n")
    (folder / ".ready").touch()


def cells_with_a_truncated_crop(folder: Path) -> None:
    cell_crop().save(folder / "c1.png")
    cell_crop().save(folder / "c0.png")
    truncated(folder / "c0.png", folder, "c0.png", 0.6)
    (folder / ".ready").touch()


def cells_with_bad_manifest_json(folder: Path) -> None:
    cell_crop().save(folder / "c0.png")
    (folder / "manifest.json").write_text('{"cells": ["c0.png"')


def cells_with_a_manifest_of_the_wrong_shape(folder: Path) -> None:
    cell_crop().save(folder / "c0.png")
    (folder / "manifest.json").write_text('{"cells": 5}')


def cells_with_a_manifest_listing_text(folder: Path) -> None:
    (folder / "notes.txt").write_text("hello\n")
    (folder / "manifest.json").write_text('{"cells": ["notes.txt"]}')


def cells_with_a_manifest_listing_a_missing_crop(folder: Path) -> None:
    cell_crop().save(folder / "c0.png")
    (folder / "manifest.json").write_text('{"cells": ["c0.png", "c1.png"]}')


def cells_with_a_field_image(folder: Path) -> None:
    cell_crop(513).save(folder / "c0.png")
    (folder / "manifest.json").write_text('{"cells": ["c0.png"]}')


CELL_CASES: list[Callable[[Path], None]] = [
    cells_with_a_text_file,
    cells_with_a_truncated_crop,
    cells_with_bad_manifest_json,
    cells_with_a_manifest_of_the_wrong_shape,
    cells_with_a_manifest_listing_text,
    cells_with_a_manifest_listing_a_missing_crop,
    cells_with_a_field_image,
]


@pytest.mark.skipif(not JPEG.is_file(), reason="shared data (chula-sample) not present")
@pytest.mark.parametrize("pixel_size_um", [0.25, 0.0])
@pytest.mark.parametrize("make", CELL_CASES, ids=[m.__name__ for m in CELL_CASES])
def test_broken_cell_folders_are_rejected_with_a_sentence(
    tmp_path: Path, make: Callable[[Path], None], pixel_size_um: float
) -> None:
    folder = tmp_path / "P1"
    folder.mkdir()
    make(folder)

    def read_every_cell(path: Path, pixel_size_um: float) -> None:
        for _ in open_cell_folder(path):
            pass

    for read in (probe, read_every_cell):
        with pytest.raises(CellFolderError) as caught:
            read(folder, pixel_size_um)
        assert_technician_reason(caught.value.reason)


def test_fails_as_keeps_library_text_out_of_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "a.svs"
    damaged = "the scan is damaged somewhere"
    with (
        caplog.at_level(logging.DEBUG, logger="appliance.readers.errors"),
        pytest.raises(UnreadableScanError) as caught,
        fails_as(UnreadableScanError, path, damaged),
    ):
        raise TypeError("unsupported operand type(s) for //: 'tuple' and 'int'")
    assert caught.value.reason == damaged
    assert "'tuple' and 'int'" in caplog.text  # the detail is in the debug log
    with pytest.raises(UnreadableScanError) as caught, fails_as(UnreadableScanError, path, damaged):
        raise OSError(errno.EIO, "Input/output error")
    assert caught.value.reason == "the file cannot be read from storage: input/output error"
    with pytest.raises(MemoryError), fails_as(UnreadableScanError, path, "damaged"):
        raise MemoryError  # the machine's limit, not the file's: the service retries it
    with pytest.raises(PixelSizeError), fails_as(UnreadableScanError, path, "damaged"):
        raise PixelSizeError(path, "no physical pixel size")  # already a reason: kept
