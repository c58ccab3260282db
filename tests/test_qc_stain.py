"""Macenko recovers known stains; QC flags blurred / faint / dark / blank and passes good
slides, and gives one smear the same verdicts at every resolution it accepts."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from appliance.pipeline import fields, qc, stain, tiles
from appliance.readers import BlankScanError, open_field_folder, open_scan
from cytoedge_demo import synthetic
from cytoedge_demo.synthetic import SmearSpec
from runtime.bundle_format import QcSpec, StainReference
from tests.conftest import SHARED_DATA

BCCD = SHARED_DATA / "bccd-sample"


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_macenko_recovers_a_known_stain_matrix_from_mixtures() -> None:
    truth = np.array([[0.65, 0.70, 0.29], [0.28, 0.80, 0.53]])
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    n = 60_000
    conc = np.zeros((n, 2))
    kind = rng.integers(0, 4, n)  # glass, basophilic only, eosinophilic only, both
    conc[kind == 1, 0] = rng.uniform(0.1, 1.0, (kind == 1).sum())
    conc[kind == 2, 1] = rng.uniform(0.1, 0.6, (kind == 2).sum())
    both = kind == 3
    conc[both] = rng.uniform(0.1, 0.8, (both.sum(), 2))
    glass = np.array([235.0, 232.0, 236.0])
    rgb = np.clip(glass * 10 ** -(conc @ truth) + rng.normal(0, 1, (n, 3)), 0, 255)
    estimate = stain.estimate_stains([rgb.astype(np.uint8).reshape(200, 300, 3)])
    assert cosines(estimate.stain_matrix, truth).min() > 0.995
    np.testing.assert_allclose(estimate.background, glass, atol=3)
    assert estimate.max_concentrations[0] == pytest.approx(0.98, abs=0.08)


def test_estimation_on_a_synthetic_smear_and_normalisation_to_a_reference() -> None:
    source = synthetic.render_field(SmearSpec(width=1200, height=1200, seed=31, stain_jitter=0.1))
    target = synthetic.render_field(SmearSpec(width=1200, height=1200, seed=32, stain_jitter=0.1))
    estimate = stain.estimate_stains([source.image])
    assert cosines(estimate.stain_matrix, np.array(source.truth.stain_matrix)).min() > 0.99
    reference = stain.derive_reference([target.image])
    before = cosines(estimate.stain_matrix, reference.stain_matrix).min()
    normalised = stain.normalize(source.image, estimate, reference)
    after = cosines(stain.estimate_stains([normalised]).stain_matrix, reference.stain_matrix)
    assert after.min() > 0.995 and after.min() > before
    nuclei = source.nuclei > 0
    baso = stain.basophilic(source.image, estimate)
    assert baso[nuclei].mean() > 4 * baso[source.cells == 0].mean()


def test_stains_are_not_estimated_from_grey_artefacts() -> None:
    # Pale pink red cells and a dark grey hair across the glass: the darkest direction is
    # grey, which no dye is; the estimate says so instead of calling the hair basophilic.
    field = np.full((400, 400, 3), (232, 230, 231), np.float32)
    rr, cc = np.mgrid[:400, :400]
    for y, x in [(60, 60), (60, 200), (200, 90), (300, 300), (150, 320), (330, 120)]:
        field[(rr - y) ** 2 + (cc - x) ** 2 < 30**2] = (215, 160, 180)
    field[np.abs(rr - cc) < 4] = (70, 72, 71)
    with pytest.raises(stain.StainError, match="grey") as caught:
        stain.estimate_stains([field.astype(np.uint8)])
    assert "hair" in caught.value.reason


@pytest.fixture(scope="module")
def reference() -> StainReference:
    images = [
        synthetic.render_field(SmearSpec(width=1600, height=1600, seed=s)).image
        for s in range(40, 44)
    ]
    return stain.derive_reference(images)


def slide_qc(path: Path, reference: StainReference) -> qc.SlideQC:
    params = qc.QCParams.of(QcSpec(), reference)
    with open_scan(path) as scan:
        zone = tiles.cellular_zone(scan)
        specs = tiles.tile_grid(scan, zone)
        cores = [t.core for t in tiles.iter_tiles(scan, tiles.sample_specs(specs, 8))]
        estimate = stain.estimate_stains(cores)
        results = [
            qc.assess_tile(t.spec.tile_id, t.core, estimate, params)
            for t in tiles.iter_tiles(scan, specs)
        ]
    return qc.slide_verdict(results, params)


@pytest.mark.parametrize(
    ("variant", "verdict", "words"),
    [
        ("good", "pass", None),
        ("blurred", "fail", "blurred"),
        ("faint", "fail", "too faint"),
        ("dark", "fail", "too dark"),
    ],
)
def test_qc_verdicts_on_generated_variants(
    tmp_path: Path, reference: StainReference, variant: str, verdict: str, words: str | None
) -> None:
    path = tmp_path / f"{variant}.tif"
    synthetic.write_smear(path, SmearSpec(width=2400, height=1600, seed=7, variant=variant))
    result = slide_qc(path, reference)
    assert result.verdict == verdict, result.reasons
    assert result.n_tiles == 6
    if words:
        assert any(words in reason for reason in result.reasons), result.reasons
        assert any("%" in reason for reason in result.reasons)
    else:
        assert result.reasons == []
    record = result.record()  # what result.json keeps
    assert (record.verdict, record.n_tiles) == (verdict, 6)
    assert record.reasons == tuple(result.reasons)


def test_blank_slide_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "blank.tif"
    synthetic.write_smear(path, SmearSpec(width=1600, height=1600, variant="blank"))
    with open_scan(path) as scan, pytest.raises(BlankScanError):
        tiles.cellular_zone(scan)
    params = qc.QCParams()
    assert qc.slide_verdict([], params).verdict == "fail"


def test_cellular_zone_excludes_thick_body_and_bare_edge(tmp_path: Path) -> None:
    path = tmp_path / "smear.tif"
    synthetic.write_smear(path, SmearSpec(width=8000, height=800, seed=8, layout="smear"))
    with open_scan(path) as scan:
        zone = tiles.cellular_zone(scan)
    row = zone.in_zone[0]
    assert not row[0], (zone.cover, zone.thick)  # thick body (x < 960)
    assert not row[-1]  # bare feathered edge (x > 7040)
    assert row[2:8].all()  # the monolayer between them


def test_slide_verdict_wording_and_thresholds() -> None:
    def tile(i: int, blurred: bool = False, low: bool = False) -> qc.TileQC:
        return qc.TileQC(
            i, 50.0 if blurred else 300.0, 200.0, 2 if low else 12, blurred, False, False, low
        )

    params = qc.QCParams()
    failing = qc.slide_verdict([tile(i, blurred=i < 71) for i in range(100)], params)
    assert failing.verdict == "fail" and failing.reasons == ["71 % of tiles blurred"]
    assert failing.fractions["blurred"] == pytest.approx(0.71)
    warning = qc.slide_verdict([tile(i, blurred=i < 15) for i in range(100)], params)
    assert warning.verdict == "warn"
    sparse = qc.slide_verdict([tile(i, low=i < 60) for i in range(100)], params)
    assert sparse.verdict == "warn" and "low cellularity" in sparse.reasons[0]
    assert qc.slide_verdict([tile(i) for i in range(10)], params).verdict == "pass"


def wbc_boxes(xml_path: Path) -> list[tuple[float, ...]]:
    root = ET.parse(xml_path).getroot()
    found = []
    for obj in root.iter("object"):
        if obj.findtext("name") == "WBC":
            box = obj.find("bndbox")
            found.append(tuple(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
    return found


@pytest.mark.skipif(not BCCD.is_dir(), reason="shared data (bccd-sample) not present")
def test_real_bccd_photos_through_stain_estimation_and_tile_qc() -> None:
    photos = [p for p in sorted(BCCD.glob("*.jpg")) if p.stat().st_size > 0]
    images = []
    for photo in photos:
        with open_scan(photo, calibration=0.07) as scan:
            images.append(scan.read_region(0, 0, scan.width, scan.height))
    estimate = stain.estimate_stains(images)
    baso, eos = estimate.stain_matrix
    assert baso[0] / baso.sum() > eos[0] / eos.sum()  # basophilic absorbs more red
    assert 180 < estimate.background.mean() < 240
    params = qc.QCParams(min_nuclei_per_tile=1)
    hits = 0
    for photo, image in zip(photos, images, strict=True):
        result = qc.assess_tile(0, image, estimate, params)
        assert result.laplacian_var > 0 and 100 < result.mean_intensity < 230
        boxes = wbc_boxes(photo.with_suffix(".xml"))
        if not boxes:
            continue
        # The strongest basophilic blob is the white cell's nucleus, inside its annotated box.
        channel = stain.basophilic(image, estimate)
        labels, n = ndimage.label(channel > qc.otsu_threshold(channel))
        sizes = ndimage.sum(np.ones_like(channel), labels, range(1, n + 1))
        cy, cx = ndimage.center_of_mass(labels == int(np.argmax(sizes)) + 1)
        scale = 640 / image.shape[1]
        if any(x0 <= cx * scale <= x1 and y0 <= cy * scale <= y1 for x0, y0, x1, y1 in boxes):
            hits += 1
    assert hits >= 5


# --- the same smear at every resolution the appliance accepts --------------------------------
FAIR = SmearSpec(width=1600, height=1600, seed=23, nucleated_per_mm2=1200)  # 2 x 2 tiles


def current_params(reference: StainReference) -> qc.QCParams:
    """What a bundle written now judges with (runtime.bundle_format.QcSpec.current)."""
    return qc.QCParams.of(QcSpec.current(), reference)


def write_scan(path: Path, image: np.ndarray, um_per_px: float) -> Path:
    """A one-level tiled TIFF with its resolution: a scan, as a scanner at that pixel size."""
    per_cm = 10_000.0 / um_per_px
    tifffile.imwrite(
        path,
        image,
        tile=(256, 256),
        photometric="rgb",
        compression="zlib",
        resolution=(per_cm, per_cm),
        resolutionunit="CENTIMETER",
    )
    return path


def write_fields(folder: Path, image: np.ndarray, um_per_px: float) -> Path:
    """Four camera photos of the smear at ``um_per_px`` (oversampled: a 100x camera resolves
    no finer than its optics, so enlarging the 0.25 um/px rendering is what it records)."""
    folder.mkdir()
    scale = 0.25 / um_per_px
    side = round(image.shape[0] * scale)
    fine = Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC)
    w, h = round(140 / um_per_px), round(105 / um_per_px)  # 140 x 105 um per photo
    for index, (x, y) in enumerate([(0, 0), (side - w, 0), (0, side - h), (side - w, side - h)]):
        fine.crop((x, y, x + w, y + h)).save(folder / f"field-{index:02d}.jpg", quality=92)
    (folder / "manifest.json").write_text(json.dumps({"pixel_size_um": um_per_px}))
    return folder


@pytest.fixture(scope="module")
def fair_smears(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """One smear, in focus and defocused, as 0.25 and 0.5 um/px scans and 0.1 um/px fields."""
    root = tmp_path_factory.mktemp("fair")
    made: dict[str, dict[str, Path]] = {}
    for variant in ("good", "blurred"):  # blurred: defocus of 1 um (sigma), not the optics'
        image = synthetic.render_field(synthetic.with_variant(FAIR, variant)).image
        half = np.asarray(Image.fromarray(image).reduce(2))  # a 20x scanner's pixels
        made[variant] = {
            "scan 0.25": write_scan(root / f"{variant}-025.tif", image, 0.25),
            "scan 0.5": write_scan(root / f"{variant}-05.tif", half, 0.5),
            "fields 0.1": write_fields(root / f"{variant}-fields", image, 0.1),
        }
    return made


def verdict_of(path: Path, params: qc.QCParams, reference: StainReference) -> qc.SlideQC:
    if path.is_dir():
        return fields.judge(open_field_folder(path), params, reference)
    with open_scan(path) as scan:
        specs = tiles.tile_grid(scan, tiles.cellular_zone(scan))
        cores = [t.core for t in tiles.iter_tiles(scan, tiles.sample_specs(specs, 8))]
        estimate = stain.estimate_stains(cores)
        results = [
            qc.assess_tile(t.spec.tile_id, t.core, estimate, params)
            for t in tiles.iter_tiles(scan, specs)
        ]
    return qc.slide_verdict(results, params)


@pytest.mark.slow
def test_every_qc_rule_gives_one_verdict_for_one_smear_at_every_resolution(
    fair_smears: dict[str, dict[str, Path]], current_reference: StainReference
) -> None:
    reference = current_reference
    params = current_params(reference)
    for name, path in fair_smears["good"].items():
        result = verdict_of(path, params, reference)
        assert result.verdict == "pass", (name, result.reasons)
        assert result.fractions["blurred"] == 0.0, name
        # Cellularity per area agrees with the tiles (the smear has 1200 nucleated cells/mm2).
        assert result.nuclei_per_mm2 is not None and result.nuclei_per_mm2 > 200, name
    for name, path in fair_smears["blurred"].items():
        result = verdict_of(path, params, reference)
        assert result.verdict == "fail", name
        assert result.fractions["blurred"] == 1.0 and "blurred" in result.reasons[0], name


@pytest.mark.slow
def test_the_old_rule_kept_for_old_bundles_failed_a_20x_scan_for_its_resolution(
    fair_smears: dict[str, dict[str, Path]], current_reference: StainReference
) -> None:
    # A bundle without blur_um_per_px keeps its meaning: Laplacian at 0.25 um/px >= 100.
    old = qc.QCParams.of(QcSpec(), current_reference)
    assert (old.blur_um_per_px, old.laplacian_min, old.reference_glass) == (0.25, 100, 0.0)
    good = fair_smears["good"]
    assert verdict_of(good["scan 0.25"], old, current_reference).fractions["blurred"] == 0.0
    # ... and judged the same smear scanned at 20x blurred throughout: what the scale fixes.
    assert verdict_of(good["scan 0.5"], old, current_reference).fractions["blurred"] == 1.0


def test_optical_density_of_uint8_pixels_is_the_per_pixel_log_bit_for_bit() -> None:
    images = [synthetic.render_field(SmearSpec(width=600, height=600, seed=12)).image]
    chula = sorted((SHARED_DATA / "chula-sample").glob("*.jpg"))[:2]
    images += [np.asarray(Image.open(path).convert("RGB")) for path in chula]
    background = np.array([236.0, 231.0, 244.0], np.float32)
    for image in images:
        assert image.dtype == np.uint8
        per_pixel = stain.optical_density(image.astype(np.float32), background)
        assert np.array_equal(stain.optical_density(image, background), per_pixel)
