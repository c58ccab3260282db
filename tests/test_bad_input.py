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

from appliance import synthetic, tiles
from appliance.readers import (
    BlankScanError,
    EmptyFileError,
    ImageTooLargeError,
    NotAnImageError,
    NotBrightfieldError,
    PixelSizeError,
    ScanError,
    ScanNotFoundError,
    UnreadableScanError,
    open_scan,
    probe,
)
from appliance.readers.errors import fails_as


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
        probe(path, pixel_size_um=500.0)
    (tmp_path / "field.png.json").write_text("{not json")
    with pytest.raises(PixelSizeError, match="sidecar"):
        probe(path, pixel_size_um=0.25)


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
