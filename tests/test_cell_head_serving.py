"""A bundle's cell head in service: every kept cell classified, the case's differential
with its intervals and unsure cells, the tables QuPath colours, the bag of a head that
reads only some classes, the visit's budget counted in those classes, and the paper's
plasma-cell inclusion rule (warn, abstain, off)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import jsonschema
import numpy as np
import onnxruntime as ort
import pytest

from appliance.pipeline.cases import score_case
from appliance.pipeline.differential import wilson_interval
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.slides import SlideResult, process_slide
from appliance.results import read_result
from appliance.review.sign_off import waiting_reasons
from runtime.bundle_format import Bundle, load_bundle
from tests.cell_head_bundle import with_cell_head

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
OPERATING_POINT = 0.55


def processed(bundle: Bundle, scans: list[Path], cache: Path) -> list[SlideResult]:
    with SlideNetworks(bundle) as networks:
        return [process_slide(scan, networks, cache_dir=cache) for scan in scans]


def head_probabilities(bundle: Bundle, embeddings: np.ndarray) -> np.ndarray:
    """The cell head run directly, outside the pipeline."""
    assert bundle.cell_head is not None
    session = ort.InferenceSession(str(bundle.file(bundle.cell_head.files[0])))
    return session.run(["probabilities"], {"features": embeddings.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def scans(small_scan_writer, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("scans")
    return [small_scan_writer(folder / f"s{seed}.tif", seed=seed, size=1600) for seed in (3, 4)]


@pytest.fixture(scope="module")
def reference(
    tiny_bundle: Path, scans: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> np.ndarray:
    """The embeddings of the scans' cells, which the test head learns to split."""
    base = load_bundle(tiny_bundle)
    slides = processed(base, scans, tmp_path_factory.mktemp("cache"))
    return np.concatenate([s.cells().embeddings for s in slides])


def test_every_kept_cell_gets_a_class_and_the_case_its_differential(
    tiny_bundle: Path, scans: list[Path], reference: np.ndarray, tmp_path: Path
) -> None:
    bundle = with_cell_head(
        tiny_bundle, tmp_path / "bundle", reference, operating_point=OPERATING_POINT
    )
    slides = processed(bundle, scans, tmp_path / "cache")
    classes, sure = [], []
    for slide in slides:
        cells = slide.cells()
        direct = head_probabilities(bundle, cells.embeddings)
        np.testing.assert_allclose(cells.class_probabilities, direct, atol=1e-5)
        classes.append(direct.argmax(1))
        sure.append(direct.max(1) >= OPERATING_POINT)
    classes_all, sure_all = np.concatenate(classes), np.concatenate(sure)
    assert len(classes_all) > 20 and 0 < sure_all.sum() < len(sure_all), "some cells unsure"

    case = score_case("C", slides, bundle, tmp_path / "out", write_pdf=False)
    result = case.result
    found = result.differential
    assert found is not None and found.taxonomy == "plasma-or-not"
    assert (found.cells, found.classified) == (len(classes_all), int(sure_all.sum()))
    assert found.unsure == found.cells - found.classified
    for index, row in enumerate(found.classes):
        count = int(((classes_all == index) & sure_all).sum())
        low, high = wilson_interval(count, found.classified)
        assert row.count == count
        assert row.percent == pytest.approx(100 * count / found.classified)
        assert (row.low, row.high) == pytest.approx((100 * low, 100 * high))
    assert result.burden is not None and result.burden.count == found.classes[0].count
    assert any("unsure" in reason for reason in waiting_reasons(result, bundle_verified=True))

    # The published schema holds the new parts of result.json.
    schema = json.loads((ROOT / "docs" / "result.schema.json").read_text())
    data = json.loads((case.folder.path / "result.json").read_text())
    jsonschema.validate(data, schema)
    assert read_result(case.folder.path) == result

    # Tables: every kept cell, its class; QuPath's classification with the class colour.
    scan = result.scans[0]
    assert scan.outputs is not None
    rows = list(
        csv.DictReader(io.StringIO((case.folder.path / scan.outputs.cells_csv).read_text()))
    )
    expected = ["plasma_cell" if c == 0 else "other_cell" for c in classes[0]]
    assert [r["cell_class"] for r in rows] == expected
    features = json.loads((case.folder.path / scan.outputs.cells_geojson).read_text())["features"]
    for feature, is_sure, cell_class in zip(features, sure[0], classes[0], strict=True):
        classification = feature["properties"]["classification"]
        if not is_sure:
            assert classification == {"name": "Unsure", "color": [128, 128, 128]}
        elif cell_class == 0:
            assert classification == {"name": "Plasma cell", "color": [0, 120, 60]}
        else:
            assert classification == {"name": "Other cell", "color": [150, 150, 150]}

    # The crops a person looks at: each class's surest cells and every unsure one, least sure first.
    gallery = result.cell_gallery
    assert gallery and all((case.folder.path / g.image).is_file() for g in gallery)
    unsure = [g.confidence for g in gallery if not g.sure]
    assert unsure == sorted(unsure) and all(c < OPERATING_POINT for c in unsure)
    assert all(g.confidence >= OPERATING_POINT for g in gallery if g.sure)


def test_a_head_that_reads_plasma_cells_sees_only_them_and_the_rest_is_counted(
    tiny_bundle: Path, scans: list[Path], reference: np.ndarray, tmp_path: Path
) -> None:
    bundle = with_cell_head(
        tiny_bundle, tmp_path / "bundle", reference, bag_classes=("plasma_cell",)
    )
    slides = processed(bundle, scans, tmp_path / "cache")
    plasma = {s.slide_id: int((s.cells().class_probabilities.argmax(1) == 0).sum()) for s in slides}
    case = score_case("C", slides, bundle, tmp_path / "out", write_pdf=False)
    with np.load(case.folder.path / "embeddings.npz") as saved:
        assert set(saved["cell_class"]) == {"plasma_cell"}
        assert len(saved["embeddings"]) == sum(plasma.values())
    for record, slide in zip(case.result.scans, slides, strict=True):
        assert record.cells == plasma[slide.slide_id]
        assert record.cells_other_classes == slide.n_cells - plasma[slide.slide_id]
        assert "classes the heads do not read" in (record.set_aside_sentence() or "")


def test_the_visit_counts_the_bag_s_classes_toward_the_slide_budget(
    tiny_bundle: Path, scans: list[Path], reference: np.ndarray, tmp_path: Path
) -> None:
    budget = 12
    every = with_cell_head(tiny_bundle, tmp_path / "every", reference, budget_per_slide=budget)
    plasma = with_cell_head(
        tiny_bundle,
        tmp_path / "plasma",
        reference,
        bag_classes=("plasma_cell",),
        budget_per_slide=budget,
    )
    (all_cells,) = processed(every, scans[:1], tmp_path / "cache")
    (bag_cells,) = processed(plasma, scans[:1], tmp_path / "cache")
    assert plasma.slide_sha256 != every.slide_sha256, "the visit differs: another cache entry"
    examined = bag_cells.scan.examined
    assert examined is not None and examined.budget_classes == ("plasma_cell",)
    kept = bag_cells.cells().class_probabilities.argmax(1)
    assert examined.counted == int((kept == 0).sum())
    if examined.stopped == "budget":
        assert examined.counted >= budget
    assert bag_cells.n_cells >= all_cells.n_cells, "going on for plasma cells keeps more cells"
    assert "plasma cells kept" in examined.sentence()


@pytest.fixture(scope="module")
def rule_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One slide cache for the rule's cases: bundles that differ only in
    ``qc.plasma_cell_rule`` share ``slide_sha256`` (the rule applies when a case is
    scored), so the first case processes the scans and the others read its entries."""
    return tmp_path_factory.mktemp("rule-cache")


@pytest.mark.parametrize(
    ("rule", "status", "warned"),
    [("warn", "scored", True), ("abstain", "abstained", False), ("off", "scored", False)],
)
def test_the_plasma_cell_inclusion_rule(
    tiny_bundle: Path,
    scans: list[Path],
    reference: np.ndarray,
    rule_cache: Path,
    tmp_path: Path,
    rule: str,
    status: str,
    warned: bool,
) -> None:
    # A minimum of 100 %: below it unless every classified cell is a plasma cell.
    bundle = with_cell_head(
        tiny_bundle, tmp_path / "bundle", reference, plasma_rule=rule, min_plasma_fraction=1.0
    )
    slides = processed(bundle, scans, rule_cache)
    result = score_case("C", slides, bundle, tmp_path / "out", write_pdf=False).result
    assert result.burden is not None and result.burden.below
    outside = "outside the burden the model was validated on"
    assert result.status == status
    assert bool(result.warnings) == warned
    if warned:
        assert outside in result.warnings[0]
        assert outside in " ".join(waiting_reasons(result, bundle_verified=True))
    if status == "abstained":
        assert outside in (result.abstain_reason or "") and result.heads == ()
    # Within the minimum: no warning, whatever the rule.
    within = with_cell_head(
        tiny_bundle, tmp_path / "within", reference, plasma_rule=rule, min_plasma_fraction=0.0
    )
    again = processed(within, scans, rule_cache)
    result = score_case("D", again, within, tmp_path / "out", write_pdf=False).result
    assert result.status == "scored" and result.warnings == ()
