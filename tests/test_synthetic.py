"""The synthetic smear generator: OpenSlide reads it, labels shift morphology, seeds repeat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest

from appliance.pipeline import stain
from appliance.readers import open_cell_folder, open_scan
from cytoedge_demo import synthetic
from cytoedge_demo.synthetic import MARKERS, SmearSpec

NONE = dict.fromkeys(MARKERS, False)


def only(marker: str) -> dict[str, bool]:
    return {**NONE, marker: True}


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synthetic.SlideTruth]:
    path = tmp_path_factory.mktemp("synthetic") / "smear.tif"
    truth = synthetic.write_smear(path, SmearSpec(width=2304, height=1536, seed=4), masks=True)
    return path, truth


def test_openslide_opens_the_pyramid_with_its_pixel_size(slide) -> None:
    path, _ = slide
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert osr.level_dimensions[0] == (2304, 1536)
        assert osr.level_dimensions[1] == (576, 384)
        assert osr.level_downsamples[1] == pytest.approx(4.0)
        top = np.asarray(osr.read_region((0, 0), 0, (300, 200)).convert("RGB"))
    with open_scan(path) as scan:
        assert scan.format == "openslide:generic-tiff"
        assert (scan.width, scan.height) == (2304, 1536)
        np.testing.assert_array_equal(scan.read_region(0, 0, 300, 200), top)


def test_truth_and_masks_agree(slide) -> None:
    path, truth = slide
    cells, nuclei = synthetic.read_masks(path)
    assert cells.shape == (1536, 2304)
    ids = set(np.unique(cells)) - {0}
    assert ids == {c.id for c in truth.cells}
    assert set(np.unique(nuclei)) - {0} <= ids
    assert (nuclei[cells == 0] == 0).all()  # every nucleus lies inside its cell
    assert synthetic.read_truth(path).labels == truth.labels


def test_same_seed_same_pixels_other_seed_other_pixels() -> None:
    a = synthetic.render_field(SmearSpec(width=400, height=300, seed=9))
    b = synthetic.render_field(SmearSpec(width=400, height=300, seed=9))
    c = synthetic.render_field(SmearSpec(width=400, height=300, seed=10))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.cells, b.cells)
    assert np.abs(a.image.astype(int) - c.image).mean() > 5


def test_strip_writer_matches_the_in_memory_render(tmp_path: Path) -> None:
    spec = SmearSpec(width=700, height=600, seed=12)
    synthetic.write_smear(tmp_path / "s.tif", spec)
    with open_scan(tmp_path / "s.tif") as scan:
        written = scan.read_region(0, 0, 700, 600)
    rendered = synthetic.render_field(spec).image
    # Noise is drawn per strip, so pixels differ by noise only; structure is identical.
    assert np.abs(written.astype(int) - rendered).mean() < 2.5


def _plasma_measures(labels: dict[str, bool], seed: int) -> dict[str, float]:
    """Nucleus area, cell area, N:C and cytoplasm basophilia of affected plasma cells,
    measured on the rendered pixels and masks (not read back from the parameters)."""
    spec = SmearSpec(width=1600, height=1600, seed=seed, labels=labels, plasma_fraction=1.0)
    field = synthetic.render_field(spec)
    ids = [c.id for c in field.truth.cells if c.affected or not any(labels.values())]
    cell_area = np.bincount(field.cells.ravel(), minlength=max(ids) + 1)
    nuc_area = np.bincount(field.nuclei.ravel(), minlength=max(ids) + 1)
    estimate = stain.StainEstimate(
        np.array(field.truth.stain_matrix, np.float32),
        np.ones(2, np.float32),
        np.array(field.truth.background_rgb, np.float32),
    )
    conc = stain.concentrations(field.image, estimate)
    cytoplasm = (field.cells > 0) & (field.nuclei == 0)
    cyto_n = np.maximum(np.bincount(field.cells[cytoplasm], minlength=len(nuc_area)), 1)
    sel = np.array(ids)

    def cytoplasm_mean(channel: int) -> float:
        total = np.bincount(
            field.cells[cytoplasm], weights=conc[..., channel][cytoplasm], minlength=len(nuc_area)
        )
        return float(np.median(total[sel] / cyto_n[sel]))

    return {
        "nucleus": float(np.median(nuc_area[sel])),
        "cell": float(np.median(cell_area[sel])),
        "nc": float(np.median(nuc_area[sel] / cell_area[sel])),
        "cyto_baso": cytoplasm_mean(0),
        "cyto_eos": cytoplasm_mean(1),
    }


def test_each_marker_shifts_plasma_cell_morphology_measurably() -> None:
    base = _plasma_measures(NONE, seed=21)
    d17 = _plasma_measures(only("del(17p)"), seed=21)
    t414 = _plasma_measures(only("t(4;14)"), seed=21)
    t1114 = _plasma_measures(only("t(11;14)"), seed=21)
    g1q = _plasma_measures(only("gain(1q)"), seed=21)
    assert d17["nucleus"] > base["nucleus"] * 1.3  # larger nuclei
    assert t414["cyto_baso"] > base["cyto_baso"] * 1.4  # more basophilic cytoplasm
    assert t1114["cell"] < base["cell"] * 0.75  # small lymphoplasmacytoid cells
    assert g1q["cyto_eos"] > base["cyto_eos"] + 0.2  # flame-cell (eosinophilic) cytoplasm
    # Distinct signatures: each moves its own feature and leaves the others' alone.
    assert g1q["cell"] > base["cell"] * 0.9 and g1q["cyto_baso"] < base["cyto_baso"] * 1.2
    assert t1114["cyto_eos"] < base["cyto_eos"] + 0.02
    assert t414["cyto_eos"] < base["cyto_eos"] + 0.05


def test_qc_variants_change_the_pixels_as_named() -> None:
    spec = SmearSpec(width=600, height=600, seed=3)
    good = synthetic.render_field(spec).image.astype(float)
    faint = synthetic.render_field(synthetic.with_variant(spec, "faint")).image.astype(float)
    dark = synthetic.render_field(synthetic.with_variant(spec, "dark")).image.astype(float)
    blank = synthetic.render_field(synthetic.with_variant(spec, "blank"))
    assert faint.mean() > good.mean() + 5 > dark.mean() + 15
    assert blank.cells.max() == 0 and blank.image.std() < 3


def test_cell_folders_for_the_peripheral_blood_head(tmp_path: Path) -> None:
    labels = synthetic.write_cell_folders(tmp_path, n_patients=2, cells_per_patient=3, seed=1)
    assert set(labels) == {"P0001", "P0002"}
    assert set(labels.values()) <= set(synthetic.PB_CLASSES)
    folder = open_cell_folder(tmp_path / "P0001")
    assert len(folder) == 3
    for name, image in folder:
        assert name.endswith(".tif")
        assert image.shape == (144, 144, 3) and image.dtype == np.uint8
        centre = image[60:84, 60:84].astype(float).mean()
        assert centre < image.astype(float).mean()  # a stained cell in the middle
    assert (tmp_path / "labels.json").is_file()
