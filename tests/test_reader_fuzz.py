"""The readers under a fuzzer: mutated real files either read or are refused in one line.

The inputs are the real photos, OpenSlide's test slides and small TIFFs, mutated by
``cytoedge_demo.bench.fuzz_inputs`` (a hypothesis strategy: TIFF tags, the JPEG frame
header and JFIF density, PNG's IHDR, byte flips, inserts, deletions, truncations). The run is seeded
(``derandomize``) and of a fixed size; ``cytoedge bench fuzz`` is the long run, with
each input in a child process under a memory limit. The regression tests below hold
the smallest inputs of what the fuzzer found, written here byte by byte; those that
once took the whole process down run in a child process, so that a relapse fails
the test instead of the suite.
"""

from __future__ import annotations

import io
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from PIL import Image

from appliance.pipeline.fields import read_field
from appliance.readers import (
    Calibration,
    FieldFolder,
    FieldFolderError,
    NotBrightfieldError,
    UnreadableScanError,
    open_scan,
    probe,
    single_field,
)
from appliance.service.service import Service
from appliance.service.store import DONE, REJECTED, JobStore, StoreError
from appliance.service.worker import ProgressFn, SlideOutcome
from cytoedge_demo.bench.fuzz_inputs import (
    CALIBRATION,
    FuzzInput,
    Seed,
    exercise,
    fuzz_inputs,
    outcome,
    place,
    seed_files,
)
from tests.conftest import SHARED_DATA, assert_technician_reason
from tests.fixtures.openslide_files import FOLDER as OPENSLIDE_FILES
from tests.test_service_worker import BUNDLE, StandInEngine, make_config, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Seconds one input may take before it counts as a hang: most take well under 1 s, a
# photo whose header claims 60000 px a side (within the limits) up to 10 s when loaded.
HANG_SECONDS = 60
EXAMPLES = 1000


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no reader turns it into a reason."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang


@pytest.fixture(scope="module")
def seeds() -> list[Seed]:
    found = seed_files(SHARED_DATA, OPENSLIDE_FILES if OPENSLIDE_FILES.is_dir() else None)
    if not found:
        pytest.skip(f"no photos under {SHARED_DATA}")
    return found


@pytest.fixture()
def alarm() -> Iterator[None]:
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_mutated_files_read_or_are_refused_in_one_line(seeds: list[Seed], alarm: None) -> None:
    kinds: dict[str, int] = {}

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(fuzz_inputs(seeds))
    def check(item: FuzzInput) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = place(item, Path(folder))
            signal.alarm(HANG_SECONDS)
            try:
                result = outcome(path)
            except Hang:
                pytest.fail(f"{item.seed} {item.mutations}: no answer in {HANG_SECONDS} s")
            finally:
                signal.alarm(0)
        assert result.kind != "failure", f"{item.seed} {item.mutations}: {result.detail}"
        if result.kind == "rejected":
            assert_technician_reason(result.reason)
        kinds[result.kind] = kinds.get(result.kind, 0) + 1

    check()
    # The mutations reach both ends: some inputs still read, most are refused.
    assert kinds.get("read", 0) > 0 and kinds.get("rejected", 0) > kinds.get("read", 0)


# -- what the fuzzer found, smallest inputs -----------------------------------------------


def _pyramid_bytes() -> bytearray:
    """A two-level tiled RGB TIFF of 256 px, as OpenSlide's generic TIFF reader takes it."""
    rgb = np.full((256, 256, 3), (220, 180, 200), np.uint8)
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        for factor in (1, 2):
            tif.write(
                rgb[::factor, ::factor],
                tile=(128, 128),
                photometric="rgb",
                resolution=(40_000 / factor, 40_000 / factor),
                resolutionunit="CENTIMETER",
                subfiletype=0 if factor == 1 else 1,
            )
    return bytearray(buffer.getvalue())


def _set_tag(data: bytearray, tag: int, value: int, directory: int = 0) -> None:
    """Give ``tag`` of the ``directory``-th IFD one LONG value (its entry retyped)."""
    order = {b"II": "<", b"MM": ">"}[bytes(data[:2])]
    ifd = struct.unpack(order + "I", data[4:8])[0]
    for _ in range(directory):
        (n,) = struct.unpack(order + "H", data[ifd : ifd + 2])
        (ifd,) = struct.unpack(order + "I", data[ifd + 2 + 12 * n : ifd + 6 + 12 * n])
    (n,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    for at in range(ifd + 2, ifd + 2 + 12 * n, 12):
        if struct.unpack(order + "H", data[at : at + 2])[0] == tag:
            data[at + 2 : at + 12] = struct.pack(order + "HII", 4, 1, value)
            return
    raise AssertionError(f"no tag {tag} in directory {directory}")


def _refusal_in_child(path: Path, headroom_mb: int = 512) -> str:
    """``probe(path)`` in a child process whose address space may grow by ``headroom_mb``:
    the refusal's class and reason, or how the child failed (an abort, MemoryError)."""
    code = textwrap.dedent(
        f"""
        import resource
        from appliance.readers import ScanError, probe
        pages = int(open("/proc/self/statm").read().split()[0])
        limit = pages * resource.getpagesize() + {headroom_mb} * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            probe({str(path)!r}, 0.25)
            print("read")
        except ScanError as exc:
            print(type(exc).__name__, exc.reason)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-400:]}"
    return done.stdout.strip()


@pytest.mark.parametrize("level", [0, 1])
def test_openslide_tile_larger_than_any_scanner_is_refused_not_allocated(
    tmp_path: Path, level: int
) -> None:
    """OpenSlide decoded a tile of the claimed 1227934080 x 128 px whole: glib aborted
    the process allocating 628 GB (the service with it)."""
    data = _pyramid_bytes()
    _set_tag(data, 322, 1_227_934_080, directory=level)  # TileWidth
    path = tmp_path / "bigtile.tif"
    path.write_bytes(data)
    said = _refusal_in_child(path)
    assert said.startswith("ImageTooLargeError"), said
    assert "1227934080x128 px" in said
    assert_technician_reason(said.split(" ", 1)[1])


def _png_header_claiming(width: int, height: int) -> bytes:
    """A real small PNG whose IHDR (CRC kept valid) claims ``width`` x ``height``."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (230, 190, 200)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (230, 190, 200)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _tiff_claiming(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.full((64, 64, 3), 200, np.uint8), photometric="rgb")
    data = bytearray(buffer.getvalue())
    _set_tag(data, 256, width)
    _set_tag(data, 257, height)
    return bytes(data)


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("bomb.png", _png_header_claiming),
        ("bomb.jpg", _jpeg_claiming),
        ("bomb.tif", _tiff_claiming),
    ],
)
def test_60000_px_headers_are_refused_before_allocating(
    tmp_path: Path, name: str, make: object
) -> None:
    path = tmp_path / name
    path.write_bytes(make(60_000, 60_000))  # type: ignore[operator]
    said = _refusal_in_child(path)
    assert said.startswith("ImageTooLargeError"), said
    assert_technician_reason(said.split(" ", 1)[1])


def test_16_bit_tiff_is_refused_with_a_sentence(tmp_path: Path) -> None:
    """The reason began with the bit depth ("2057-bit TIFF ..."), not a word."""
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 40_000, np.uint16), photometric="rgb")
    with pytest.raises(NotBrightfieldError) as refused:
        open_scan(path, 0.25)
    assert "16 bits" in refused.value.reason
    assert_technician_reason(refused.value.reason)


class ReadingEngine(StandInEngine):
    """The stand-in engine, reading each scan as the pipeline does before its stand-in work."""

    def process_slide(
        self, path: Path, progress: ProgressFn, *, use_cache: bool, fingerprint: str | None = None
    ) -> SlideOutcome:
        exercise(path)
        return super().process_slide(path, progress, use_cache=use_cache, fingerprint=fingerprint)


def test_the_service_records_a_sentence_for_mutated_files_and_moves_on(tmp_path: Path) -> None:
    photo = (SHARED_DATA / "bccd-sample" / "BloodImage_00300.jpg").read_bytes()
    tiles = _pyramid_bytes()
    _set_tag(tiles, 322, 1_227_934_080)
    config = make_config(tmp_path)
    service = Service(
        config,
        ReadingEngine(),
        probe=lambda path: probe(path, CALIBRATION),
        bundle=BUNDLE,
        backend="stand-in",
    )
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    try:
        inbox = tmp_path / "inbox"
        (inbox / "tiles.tif").write_bytes(tiles)  # once took the service down
        (inbox / "cut.jpg").write_bytes(photo[: len(photo) // 3])
        (inbox / "bomb.png").write_bytes(_png_header_claiming(60_000, 60_000))
        (inbox / "good.jpg").write_bytes(photo)
        store = wait_for(lambda: _open_store(service), timeout=30)
        keys = ("tiles", "cut", "bomb", "good")
        wait_for(lambda: all(_state(store, k) in (REJECTED, DONE) for k in keys), timeout=60)
        reasons = {c.case_key: (c.state, c.reason) for c in store.cases()}
        store.close()
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert reasons["good"][0] == DONE
    for key in ("tiles", "cut", "bomb"):
        state, reason = reasons[key]
        assert state == REJECTED, (key, reason)
        assert_technician_reason(reason)
    assert "larger than any scanner writes" in reasons["tiles"][1]
    assert "60000x60000 px" in reasons["bomb"][1]


def _open_store(service: Service) -> JobStore | None:
    try:
        return JobStore(service.store_path, readonly=True)
    except StoreError:
        return None


def _state(store: JobStore, key: str) -> str | None:
    case = store.case_by_key(key)
    return case.state if case else None


def test_a_photo_whose_pixel_size_makes_it_too_large_to_read_whole_is_refused(
    tmp_path: Path,
) -> None:
    """A photo stating 10 um/px (JFIF 2540 dpi): read whole at 0.25 um/px, its 640 x 480 px
    would be 25600 x 19200, past what one read may return; the pipeline's field path
    raised ValueError (an internal error) instead of rejecting it."""
    path = tmp_path / "overview.jpg"
    with Image.open(SHARED_DATA / "bccd-sample" / "BloodImage_00300.jpg") as photo:
        photo.save(path, "JPEG", dpi=(2540, 2540))
    field = FieldFolder(path, (path,), Calibration())  # what it was before the check
    with pytest.raises(ValueError, match="read in tiles"):
        read_field(field, 0)
    with pytest.raises(FieldFolderError) as refused:
        single_field(path, CALIBRATION)
    assert "6.4 x 4.8 mm" in refused.value.reason and "10 um/px" in refused.value.reason
    assert_technician_reason(refused.value.reason)
    assert outcome(path).kind == "rejected"


def test_a_tiff_listing_fewer_tiles_than_its_size_needs_is_refused_at_once(
    tmp_path: Path,
) -> None:
    """One flipped bit of ImageLength made a 512 px pyramid level 262528 px tall with its
    4 tiles: OpenSlide read the missing 8200 as glass, and the thumbnail took half a minute
    before the scan was refused as grayscale."""
    data = _pyramid_bytes()
    _set_tag(data, 257, 262_528)  # ImageLength of level 0
    path = tmp_path / "tall.tif"
    path.write_bytes(data)
    with pytest.raises(UnreadableScanError) as refused:
        probe(path, 0.25)
    assert "lists 4 tiles" in refused.value.reason and "needs 4102" in refused.value.reason
    assert_technician_reason(refused.value.reason)


def test_a_photo_whose_pixel_size_inflates_it_past_a_field_is_refused(tmp_path: Path) -> None:
    """A Chula photo stating 7301 dpi (3.48 um/px) fits one read at the grid (8909 x 6680
    px), but reading it whole and measuring it took over 1 GB for a 640 x 480 JPEG."""
    path = tmp_path / "inflated.jpg"
    with Image.open(SHARED_DATA / "chula-sample" / "10.jpg") as photo:
        photo.save(path, "JPEG", dpi=(7301, 7301))
    with pytest.raises(FieldFolderError) as refused:
        single_field(path, CALIBRATION)
    assert "at most 1 mm2" in refused.value.reason
    assert_technician_reason(refused.value.reason)


def test_a_tiff_claiming_thousands_of_samples_per_pixel_is_refused_before_decoding(
    tmp_path: Path,
) -> None:
    """SamplesPerPixel 12073 on a 640 x 480 field: the whole decode allocated 3.7 GB."""
    buffer = io.BytesIO()
    rgb = np.full((480, 640, 3), (225, 190, 205), np.uint8)
    tifffile.imwrite(buffer, rgb, photometric="rgb", compression="zlib")
    data = bytearray(buffer.getvalue())
    _set_tag(data, 277, 12_073)  # SamplesPerPixel
    path = tmp_path / "samples.tif"
    path.write_bytes(data)
    said = _refusal_in_child(path)
    assert said.startswith("NotBrightfieldError"), said
    assert "12073 samples per pixel" in said
