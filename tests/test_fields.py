"""Microscope-camera fields: what a folder of photos is, their pixel size, their QC, and the
real BCCD and Chula fields through it (skipped only where ../shared is absent)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from appliance.pipeline import fields, qc
from appliance.pipeline.cases import score_case
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.slides import SlideResult, process_slide
from appliance.readers import (
    Calibration,
    FieldFolderError,
    PixelSizeError,
    folder_layout,
    is_field_file,
    open_field_folder,
    probe,
    scan_members,
)
from appliance.readers.formats import Layout
from appliance.service.audit import AuditLog
from appliance.service.store import QUEUED, WAITING, JobStore
from appliance.service.watcher import InboxWatcher, WatchSettings
from cytoedge_demo import synthetic
from cytoedge_demo.bench.fields import Annotations, score_cells
from cytoedge_demo.synthetic import SmearSpec
from runtime.bundle_format import Bundle, QcSpec, StainReference, load_bundle
from tests.conftest import SHARED_DATA, assert_technician_reason
from tests.runtime_models import TinyBundle

BCCD = SHARED_DATA / "bccd-sample"
CHULA = SHARED_DATA / "chula-sample"
BCCD_UM = 0.07  # estimated from the red cells' size: test_bccd_pixel_size_estimate
CHULA_UM = 0.2  # the sample's README: red cells about 35-40 px across, 7.5 um


def smear(width: int = 800, height: int = 600, seed: int = 5) -> np.ndarray:
    """A synthetic field photographed at 0.25 um/px (the renderer's own grid)."""
    spec = SmearSpec(width=width, height=height, seed=seed, nucleated_per_mm2=1200)
    return synthetic.render_field(spec).image


def photos(folder: Path, images: list[np.ndarray], manifest: dict[str, object] | None) -> Path:
    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"field-{index:02d}.png")
    if manifest is None:
        (folder / ".ready").touch()
    else:
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def bccd_folder(root: Path, transform: object = None) -> Path:
    """The BCCD photos (the zero-byte one left out) as one smear's folder."""
    folder = root / "bccd-smear"
    folder.mkdir(parents=True)
    for photo in sorted(BCCD.glob("*.jpg")):
        if photo.stat().st_size == 0:
            continue
        image = Image.open(photo).convert("RGB")
        if callable(transform):
            image = Image.fromarray(transform(np.asarray(image)))
        image.save(folder / photo.name, quality=95)
    (folder / "manifest.json").write_text(json.dumps({"pixel_size_um": BCCD_UM}))
    return folder


def boxes(xml_path: Path, name: str) -> list[tuple[float, float, float, float]]:
    if not xml_path.is_file():
        return []
    found = []
    for obj in ET.parse(xml_path).getroot().iter("object"):
        if obj.findtext("name") == name:
            box = obj.find("bndbox")
            assert box is not None
            x0, y0, x1, y1 = (float(box.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
            found.append((x0, y0, x1, y1))
    return found


# --- what a folder is --------------------------------------------------------------------------


def test_a_folder_is_told_apart_by_what_its_images_are(tmp_path: Path) -> None:
    crops = photos(tmp_path / "cells", [smear(144, 144)] * 2, None)
    assert folder_layout(crops) is Layout.CELL_FOLDER
    fields_folder = photos(tmp_path / "fields", [smear(640, 480)] * 2, None)
    assert folder_layout(fields_folder) is Layout.FIELD_FOLDER
    assert scan_members(fields_folder).layout is Layout.FIELD_FOLDER
    assert fields_folder / ".ready" in scan_members(fields_folder).files()
    # A manifest that lists them says so, whatever the images.
    listed = photos(tmp_path / "listed", [smear(640, 480)], {"cells": ["field-00.png"]})
    assert folder_layout(listed) is Layout.CELL_FOLDER
    listed = photos(tmp_path / "listed-fields", [smear(640, 480)], {"fields": ["field-00.png"]})
    assert folder_layout(listed) is Layout.FIELD_FOLDER
    # Slide scans (a tiled pyramidal TIFF), or subfolders: a case folder.
    case = tmp_path / "case"
    case.mkdir()
    synthetic.write_smear(case / "a.tif", SmearSpec(width=600, height=600, seed=1))
    assert not is_field_file(case / "a.tif")
    assert folder_layout(case) is None
    assert folder_layout(tmp_path) is None


def test_a_photo_is_a_field_file_and_a_tiled_scan_is_not(tmp_path: Path) -> None:
    image = smear(640, 480)
    for name in ("f.jpg", "f.png", "f.bmp", "f.tif"):
        Image.fromarray(image).save(tmp_path / name)  # Pillow writes an untiled TIFF
        assert is_field_file(tmp_path / name), name
    synthetic.write_smear(tmp_path / "scan.tif", SmearSpec(width=1024, height=1024, seed=2))
    assert not is_field_file(tmp_path / "scan.tif")
    (tmp_path / "notes.png").write_bytes(b"not an image")
    assert not is_field_file(tmp_path / "notes.png")


# --- pixel size ---------------------------------------------------------------------------------


def test_a_field_s_pixel_size_comes_from_its_sidecar_the_manifest_a_camera_or_the_config(
    tmp_path: Path,
) -> None:
    image = smear(640, 480)
    folder = photos(tmp_path / "smear", [image, image], {"pixel_size_um": 0.1})
    (folder / "field-01.png.json").write_text('{"pixel_size_um": 0.125}')
    opened = open_field_folder(folder)
    assert len(opened) == 2 and opened.name(0) == "field-00.png"
    info = probe(opened.fields[0], opened.calibration)
    assert (info.pixel_size_um, info.pixel_size_source) == (0.1, "manifest")
    info = probe(opened.fields[1], opened.calibration)
    assert (info.pixel_size_um, info.pixel_size_source) == (0.125, "sidecar")
    assert probe(folder).format == "fields" and probe(folder).width == 2

    cameras = Calibration(cameras={"bench1-100x": 0.075})
    (folder / "manifest.json").write_text('{"camera": "bench1-100x"}')
    named = open_field_folder(folder, cameras)
    info = probe(named.fields[0], named.calibration)
    assert (info.pixel_size_um, info.pixel_size_source) == (0.075, "camera")
    with pytest.raises(PixelSizeError, match="names camera 'bench1-100x'") as caught:
        open_field_folder(folder, 0.25)
    assert_technician_reason(caught.value.reason)

    # No statement in the folder: the configuration's camera, then the plain size.
    (folder / "manifest.json").unlink()
    (folder / ".ready").touch()
    default = Calibration(pixel_size_um=0.5, camera="bench1-100x", cameras={"bench1-100x": 0.075})
    assert probe(open_field_folder(folder, default).fields[0], default).pixel_size_um == 0.075
    with pytest.raises(PixelSizeError, match="no physical pixel size") as caught:
        probe(folder)
    assert_technician_reason(caught.value.reason)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda f: (f / "field-00.png").unlink(), "no field photos"),
        (lambda f: (f / "manifest.json").write_text('{"fields": ["gone.jpg"]}'), "missing"),
        (lambda f: (f / "manifest.json").write_text('{"fields": 3}'), "must list the fields"),
        (lambda f: (f / "manifest.json").write_text("{nope"), "not valid JSON"),
    ],
)
def test_a_bad_field_folder_is_refused_with_a_sentence(
    tmp_path: Path, make: object, words: str
) -> None:
    folder = tmp_path / "smear"
    folder.mkdir()
    Image.fromarray(smear(640, 480)).save(folder / "field-00.png")
    assert callable(make)
    make(folder)
    with pytest.raises((FieldFolderError, PixelSizeError), match=words) as caught:
        open_field_folder(folder, 0.1)
    assert_technician_reason(caught.value.reason)


def test_a_scan_inside_a_field_folder_is_refused_for_what_it_is(tmp_path: Path) -> None:
    folder = photos(tmp_path / "smear", [smear(640, 480)], {"pixel_size_um": 0.1})
    synthetic.write_smear(folder / "z-scan.tif", SmearSpec(width=1024, height=1024, seed=2))
    with pytest.raises(FieldFolderError, match="tiled slide scan, not a field photo") as caught:
        open_field_folder(folder)
    assert_technician_reason(caught.value.reason)


def test_the_watcher_waits_for_a_field_folder_to_say_it_is_complete(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    smear_dir = inbox / "PB-7" / "smear-1"
    smear_dir.mkdir(parents=True)
    for index in range(2):
        Image.fromarray(smear(640, 480, seed=index)).save(smear_dir / f"f{index}.jpg")
    calibration = Calibration(pixel_size_um=0.1)
    settings = WatchSettings(inbox, 0.0, 0.0, False, None, lambda: "b" * 64)
    store_file = tmp_path / "jobs.sqlite"
    watcher = InboxWatcher(
        settings,
        store_file,
        lambda path: probe(path, calibration),
        AuditLog(tmp_path / "audit.jsonl"),
        lambda: None,
    )
    watcher.tick(0.0)
    watcher.tick(1.0)
    [slide] = JobStore(store_file, readonly=True).slides()
    assert (Path(slide.path), slide.state) == (smear_dir, WAITING)
    (smear_dir / ".ready").touch()
    watcher.tick(2.0)
    watcher.tick(3.0)
    [slide] = JobStore(store_file, readonly=True).slides()
    assert slide.state == QUEUED, slide.reason


# --- QC of camera fields ----------------------------------------------------------------------


def current_params(reference: StainReference) -> qc.QCParams:
    return qc.QCParams.of(QcSpec.current(), reference)


def judge(folder: Path, reference: StainReference) -> qc.SlideQC:
    return fields.judge(open_field_folder(folder), current_params(reference), reference)


@pytest.mark.parametrize(
    ("gain", "verdict", "words"),
    [
        ((0.75, 0.9, 1.0), "pass", None),  # a camera's bluish cast: white balance removes it
        ((0.3, 0.8, 1.0), "fail", "colour cast"),
        ((0.42, 0.42, 0.42), "fail", "underexposed"),  # darker still reads as dark-field
        ((2.0, 2.0, 2.0), "fail", "overexposed"),
    ],
)
def test_a_field_s_exposure_and_colour_are_judged_as_taken(
    tmp_path: Path,
    current_reference: StainReference,
    gain: tuple[float, float, float],
    verdict: str,
    words: str | None,
) -> None:
    images = [
        np.clip(smear(seed=s).astype(np.float32) * gain, 0, 255).astype(np.uint8) for s in range(3)
    ]
    folder = photos(tmp_path / "smear", images, {"pixel_size_um": 0.25})
    result = judge(folder, current_reference)
    assert result.verdict == verdict, result.reasons
    if words:
        assert any(words in r and "100 % of fields" in r for r in result.reasons), result.reasons


def test_cellularity_is_judged_per_area_never_per_field(
    current_reference: StainReference,
) -> None:
    params = current_params(current_reference)

    def field(nuclei: int) -> qc.TileQC:
        return qc.TileQC(0, 300.0, 200.0, nuclei, False, False, False, False, area_mm2=0.0019)

    # Blood fields: most hold no white cell; one in four holds one: 132 per mm2.
    sparse = qc.slide_verdict([field(int(i % 4 == 0)) for i in range(40)], params, "fields")
    assert sparse.verdict == "pass" and sparse.nuclei_per_mm2 == pytest.approx(131.6, abs=0.1)
    fewer = qc.slide_verdict([field(int(i % 8 == 0)) for i in range(40)], params, "fields")
    assert fewer.verdict == "warn" and "low cellularity" in fewer.reasons[0]
    blank = qc.slide_verdict([field(0) for _ in range(40)], params, "fields")
    assert blank.verdict == "fail" and blank.reasons[0].startswith("blank slide: 0 nuclei per mm2")


# --- real fields ----------------------------------------------------------------------------


@pytest.mark.skipif(not BCCD.is_dir(), reason="shared data (bccd-sample) not present")
def test_bccd_pixel_size_estimate() -> None:
    """How the BCCD scale is estimated: a red cell is 7-8 um across; its boxes' median side
    in these photos, times the pixel size, must land there."""
    sides = [
        (x1 - x0 + y1 - y0) / 2
        for xml in sorted(BCCD.glob("*.xml"))
        for x0, y0, x1, y1 in boxes(xml, "RBC")
    ]
    assert len(sides) > 50
    diameter_um = float(np.median(sides)) * BCCD_UM
    assert 6.5 < diameter_um < 8.5, diameter_um


@pytest.mark.skipif(not BCCD.is_dir(), reason="shared data (bccd-sample) not present")
def test_real_bccd_fields_pass_qc_and_their_defocused_copies_fail(
    tmp_path: Path, current_reference: StainReference
) -> None:
    result = judge(bccd_folder(tmp_path / "sharp"), current_reference)
    assert result.verdict == "pass", result.reasons
    sigma = 1.0 / BCCD_UM  # 1 um of defocus, in the photos' pixels

    def defocus(rgb: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(rgb, (sigma, sigma, 0))

    result = judge(bccd_folder(tmp_path / "soft", defocus), current_reference)
    assert result.verdict == "fail" and result.reasons[0] == "100 % of fields blurred"


@pytest.mark.skipif(not CHULA.is_dir(), reason="shared data (chula-sample) not present")
def test_real_chula_fields_without_white_cells_are_refused_for_that_not_for_their_cast(
    tmp_path: Path, current_reference: StainReference
) -> None:
    folder = tmp_path / "chula"
    folder.mkdir()
    for photo in sorted(CHULA.glob("*.jpg")):
        (folder / photo.name).write_bytes(photo.read_bytes())
    (folder / "manifest.json").write_text(json.dumps({"pixel_size_um": CHULA_UM}))
    opened = open_field_folder(folder)
    for path in opened.fields:
        taken = qc.exposure(np.asarray(Image.open(path).convert("RGB")))
        # A real bluish cast, dim glass: both within what the white balance corrects.
        assert qc.MIN_CAST_RATIO < taken.cast_ratio < 0.8, path.name
        assert taken.luminance > qc.MIN_GLASS_LUMINANCE, path.name
    # Red cells, a hair and no white cell: Macenko finds no basophilic dye to separate
    # (its darkest direction is the hair's grey), so the smear is refused with that reason
    # rather than its red cells being read as nucleated cells.
    result = judge(folder, current_reference)
    assert result.verdict == "fail"
    assert result.reasons[0].startswith("no stained nuclei to estimate the stains from")
    assert_technician_reason(result.reasons[0])


# --- through the pipeline, with the suite's small but real bundle ----------------------------


def process(folder: Path, bundle: Bundle, cache: Path) -> SlideResult:
    with SlideNetworks(bundle) as networks:
        return process_slide(folder, networks, cache_dir=cache)


@pytest.mark.slow
@pytest.mark.skipif(not BCCD.is_dir(), reason="shared data (bccd-sample) not present")
def test_bccd_fields_as_one_folder_keep_the_white_cells_and_not_the_red_ones(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(tiny_bundle)
    folder = bccd_folder(tmp_path)
    photos = sorted(p.name for p in folder.glob("*.jpg"))
    slide = process(folder, bundle, tmp_path / "cache")
    assert slide.qc_passed and slide.scan.qc.verdict == "pass", slide.scan.qc.reasons
    assert (slide.scan.fields, slide.scan.format, slide.scan.pixel_size_um) == (
        7,
        "fields:jpeg",
        BCCD_UM,
    )
    cells = slide.cells()
    score = score_cells(cells.table_csv, Annotations.read(BCCD), photos)
    # Measured with this bundle (docs/BENCHMARKS.md): 7 of 7 white cells found, and the 7
    # kept cells are those. Before a nucleus had to be mostly basophilic
    # (cells.NUCLEUS_MIN_SHARE), 4 red cells were kept besides (2 of them unboxed), whose
    # darker rim passed for a nucleus. The small test segmenter was trained on synthetic
    # smears only; the bounds leave it a white cell, and something in no box, of slack.
    assert score.wbc == 7 and score.wbc_found >= 6, score
    assert score.on_rbc == 0 and score.elsewhere <= 1, score

    # The tables: each cell in its own photo's pixels, named by the photo.
    rows = list(csv.DictReader(io.StringIO(cells.table_csv)))
    assert len(rows) == slide.n_cells == len(cells.geojson["features"])
    for row, feature in zip(rows, cells.geojson["features"], strict=True):
        assert row["field"] in photos and feature["properties"]["field"] == row["field"]
        assert 0 <= float(row["x"]) <= 640 and 0 <= float(row["y"]) <= 480
        assert feature["properties"]["measurements"]["centroid_x"] == pytest.approx(
            float(row["x"]), abs=0.1
        )
    # The pixel size checked by the cells it gives: white cells of 10-15 um across.
    on_white = [float(r["area_um2"]) for r in rows if r["field"] != "BloodImage_00302.jpg"]
    assert 60 < float(np.median(on_white)) < 250, on_white
    # The contact sheet: the heatmap's frame, cells inside their field on it.
    assert (slide.scan.width, slide.scan.height) == (3 * 179 + 2 * 16, 3 * 134 + 2 * 16)
    assert cells.thumbnail.shape[:2] == (434, 569)
    assert (cells.xy >= 0).all() and (cells.xy[:, 0] < 569).all() and (cells.xy[:, 1] < 434).all()


@pytest.mark.slow
@pytest.mark.skipif(not BCCD.is_dir(), reason="shared data (bccd-sample) not present")
def test_one_real_photo_with_its_pixel_size_is_a_slide_of_one_field(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    photo = tmp_path / "BloodImage_00300.jpg"
    photo.write_bytes((BCCD / photo.name).read_bytes())
    (tmp_path / "BloodImage_00300.jpg.json").write_text(json.dumps({"pixel_size_um": BCCD_UM}))
    slide = process(photo, load_bundle(tiny_bundle), tmp_path / "cache")
    # Before the field path, this abstained: "no cellular zone: no monolayer tile with cells".
    assert slide.qc_passed, slide.scan.qc.reasons
    assert (slide.scan.fields, slide.scan.width, slide.scan.height) == (1, 179, 134)
    assert slide.n_cells >= 1
    score = score_cells(slide.cells().table_csv, Annotations.read(BCCD), [photo.name])
    assert (score.wbc, score.wbc_found) == (1, 1), score


def pb_bundle(tiny_bundle: Path, root: Path) -> Bundle:
    """The runtime's tiny PB head (transformer_mil) and encoder, with the suite bundle's
    StarDist, stain reference and QC: a bundle that reads camera fields into a PB bag."""
    segmenting = load_bundle(tiny_bundle)
    assert segmenting.segmenter is not None
    made = TinyBundle(root)
    pb_head = next(h for h in made.heads if h.kind == "transformer_mil")
    return made.write(
        sources={**made.sources, "segmenter.onnx": segmenting.file(segmenting.segmenter.file)},
        heads=[pb_head],
        segmenter=dataclasses.replace(segmenting.segmenter, file="segmenter.onnx"),
        stain_reference=segmenting.stain_reference,
        qc=segmenting.qc,
        cells=dataclasses.replace(segmenting.cells, min_cells=5),
    )


@pytest.mark.slow
def test_blood_fields_feed_the_pb_head_their_white_cells_as_its_bag(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    bundle = pb_bundle(tiny_bundle, tmp_path / "pb-bundle")
    image = smear(1200, 900, seed=9)
    scale = 0.25 / 0.1  # photographed at 0.1 um/px
    fine = Image.fromarray(image).resize((round(1200 * scale), round(900 * scale)))
    images = [np.asarray(fine.crop((x, 0, x + 1400, 1050))) for x in (0, 1500)]
    folder = photos(tmp_path / "PB-1" / "smear-1", images, {"pixel_size_um": 0.1})
    slide = process(folder, bundle, tmp_path / "cache")
    assert slide.qc_passed and slide.n_cells >= bundle.cells.min_cells, slide.scan.qc
    case = score_case("PB-1", [slide], bundle, tmp_path / "out", write_pdf=False)
    [head] = case.result.heads
    assert head.kind == "transformer_mil" and head.name == "pb_screen"
    assert case.result.status in ("scored", "abstained") and case.result.cells == slide.n_cells
    assert {p.task for p in head.predictions} == {"malignancy"}
    with np.load(case.folder.path / "embeddings.npz") as bag:
        assert bag["embeddings"].shape == (slide.n_cells, bundle.encoder.embed_dim)
        assert set(bag["slide"]) == {"smear-1"}
    [scan] = case.result.scans
    assert scan.fields == 2 and scan.outputs is not None
    assert scan.width is not None and scan.height is not None
    with Image.open(case.folder.path / scan.outputs.thumbnail) as sheet:
        # The sheet (1136 x 420 at 0.25 um/px) at most 1024 px on its long side.
        assert max(sheet.size) == 1024
        assert sheet.size[0] / sheet.size[1] == pytest.approx(scan.width / scan.height, rel=0.01)
    assert (case.folder.path / scan.outputs.heatmap).is_file()
    table = (case.folder.path / scan.outputs.cells_csv).read_text()
    assert table.splitlines()[0].endswith(",field,attention")
