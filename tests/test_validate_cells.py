"""``cytoedge validate BUNDLE CELLS`` end to end: real white and red cells cut from the
BCCD photos (../shared/data/bccd-sample), labelled in class folders, a bundle whose cell
head (tests/cell_head_bundle.py) was fitted on their embeddings, the report against
figures worked out here with numpy, a new operating point as a new version, the site's
verification record; and the refusals, one line each. Skipped where ../shared is absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from appliance.cli.main import app
from appliance.config import load_config
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.slides import process_slide
from appliance.site.verification import read_verification
from appliance.validation.cell_section import CONFUSION_PICTURE, COVERAGE_PICTURE
from appliance.validation.cohort import PipelineSettings
from appliance.validation.labelled_cells import read_labelled_cells
from runtime.bundle_format import Bundle, load_bundle
from tests.cell_head_bundle import TWO_CLASSES, with_cell_head, without_cell_head
from tests.conftest import INTERNAL_TEXT, SHARED_DATA

BCCD = SHARED_DATA / "bccd-sample"
OPERATING_POINT = 0.55
FLIPPED = 4  # the least sure cells are labelled against the head's call

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not BCCD.is_dir(), reason="shared data (bccd-sample) not present"),
]


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("cytoedge: ")]
    assert len(lines) == 1, output
    reason = lines[0].removeprefix("cytoedge: ")
    assert not INTERNAL_TEXT.search(reason), reason
    return reason


def head_probabilities(bundle: Bundle, embeddings: np.ndarray) -> np.ndarray:
    """The cell head run directly (its temperature is 1: these are calibrated)."""
    assert bundle.cell_head is not None
    session = ort.InferenceSession(str(bundle.file(bundle.cell_head.files[0])))
    return session.run(["probabilities"], {"features": embeddings.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every white and red cell box of the BCCD photos, cropped, in one folder."""
    from cytoedge_demo.bench.fields import Annotations

    folder = tmp_path_factory.mktemp("crops") / "all"
    folder.mkdir()
    boxes = Annotations.read(BCCD)
    for name in sorted(set(boxes.wbc) | set(boxes.rbc)):
        with Image.open(BCCD / name) as photo:
            for index, box in enumerate(boxes.wbc.get(name, []) + boxes.rbc.get(name, [])):
                crop = photo.convert("RGB").crop(tuple(round(v) for v in box))
                crop.save(folder / f"{Path(name).stem}-{index:02d}.png")
    return folder


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path, crops: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The tiny bundle with a cell head fitted on the crops' own embeddings."""
    base = load_bundle(tiny_bundle)
    with SlideNetworks(base) as networks:
        slide = process_slide(crops, networks, cache_dir=tmp_path_factory.mktemp("cache"))
    reference = slide.cells().embeddings
    destination = tmp_path_factory.mktemp("bundles") / "with-cells"
    return with_cell_head(tiny_bundle, destination, reference, operating_point=OPERATING_POINT)


@pytest.fixture(scope="module")
def labelled(bundle: Bundle, crops: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders: each crop under the head's call, but the least sure few under the
    other class, so that the figures have errors whose count is known."""
    with SlideNetworks(bundle) as networks:
        slide = process_slide(crops, networks, cache_dir=tmp_path_factory.mktemp("cache"))
    files = [line.split(",")[1] for line in slide.cells().table_csv.splitlines()[1:]]
    p = head_probabilities(bundle, slide.cells().embeddings)
    called = p.argmax(1)
    called[np.argsort(p.max(1))[:FLIPPED]] ^= 1
    root = tmp_path_factory.mktemp("labelled") / "site-cells"
    for name, index in zip(files, called, strict=True):
        folder = root / TWO_CLASSES.names[index]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(crops / name, folder / name)
    assert all((root / name).is_dir() for name in TWO_CLASSES.names)
    return root


def expected_figures(truth: list[str], p: np.ndarray) -> dict[str, object]:
    """The figures worked out here, apart from appliance.validation.cell_measures."""
    names = TWO_CLASSES.names
    actual = np.array([names.index(t) for t in truth])
    called = p.argmax(1)
    confusion = [[int(((actual == a) & (called == c)).sum()) for c in range(2)] for a in range(2)]
    f1s, supports = [], []
    for k in range(2):
        tp = confusion[k][k]
        precision = tp / sum(confusion[a][k] for a in range(2))
        recall = tp / sum(confusion[k])
        f1s.append(2 * precision * recall / (precision + recall))
        supports.append(sum(confusion[k]))
    sure = p.max(1) >= OPERATING_POINT
    # The lowest confidence whose cells at or above it are right at least 99 % of the time.
    confidence, right = p.max(1), called == actual
    chosen = float(min(c for c in np.unique(confidence) if right[confidence >= c].mean() >= 0.99))
    return {
        "confusion": confusion,
        "macro_f1": float(np.mean(f1s)),
        "weighted_f1": float(np.dot(f1s, supports) / sum(supports)),
        "coverage": float(sure.mean()),
        "accuracy": float(right[sure].mean()),
        "recalibrated": chosen,
        "recalibrated_coverage": float((confidence >= chosen).mean()),
    }


def test_validate_on_labelled_cells_end_to_end(
    bundle: Bundle, labelled: Path, tmp_path: Path, isolated_data_dir: Path
) -> None:
    report = tmp_path / "report"
    code, output = _invoke(
        "validate",
        str(bundle.path),
        str(labelled),
        "--report",
        str(report),
        "--recalibrate",
        "--verified-by",
        "lab lead",
    )
    assert code == 0, output

    # What the command measured, worked out again from the cells it read (the slide cache
    # gives back the very embeddings the command classified).
    with SlideNetworks(bundle) as networks:
        cells = read_labelled_cells(
            labelled,
            TWO_CLASSES,
            networks,
            PipelineSettings.from_config(load_config(None)),
            Console(quiet=True),
        )
    truth = [source.split("/")[0] for source in cells.sources]  # the class folder it lay in
    assert list(cells.labels) == truth
    expected = expected_figures(truth, head_probabilities(bundle, cells.embeddings))
    assert expected["confusion"][0][1] + expected["confusion"][1][0] >= 1  # some errors

    figures = json.loads((report / "report.json").read_text())["cells"]["figures"]
    assert figures["cells"] == len(truth)
    assert [c["support"] for c in figures["classes"]] == [truth.count(n) for n in TWO_CLASSES.names]
    assert figures["confusion"] == expected["confusion"]
    assert figures["macro_f1"] == pytest.approx(expected["macro_f1"])
    assert figures["weighted_f1"] == pytest.approx(expected["weighted_f1"])
    point = figures["operating_point"]
    assert point["confidence"] == OPERATING_POINT
    assert point["coverage"] == pytest.approx(expected["coverage"])
    assert point["accuracy"] == pytest.approx(expected["accuracy"])
    assert figures["critical_errors"] == 0  # the two classes name no dangerous confusion
    page = (report / "report.html").read_text()
    assert "site-cells" in page and f"{expected['macro_f1']:.3f}" in page
    assert (report / CONFUSION_PICTURE).is_file() and (report / COVERAGE_PICTURE).is_file()
    assert (report / "report.pdf").is_file()

    # The console's summary.
    assert f"macro F1 {expected['macro_f1']:.3f}" in output
    assert f"weighted F1 {expected['weighted_f1']:.3f}" in output
    assert f"coverage {expected['coverage']:.3f}, accuracy {expected['accuracy']:.3f}" in output

    # A new operating point on these cells, as a new version beside the old one.
    new = load_bundle(isolated_data_dir / "bundles" / f"{bundle.name}-{bundle.version}.1")
    assert new.cell_head is not None and bundle.cell_head is not None
    assert new.cell_head.thresholds["confidence"] == pytest.approx(expected["recalibrated"])
    assert new.cell_head.params.coverage == pytest.approx(expected["recalibrated_coverage"])
    assert new.cell_head.files == bundle.cell_head.files
    assert (
        new.file(new.cell_head.files[0]).read_bytes()
        == bundle.file(bundle.cell_head.files[0]).read_bytes()
    )
    recalibration = new.provenance["recalibration"]
    assert recalibration["labelled_cells"] == "site-cells"
    assert recalibration["operating_point_before"] == OPERATING_POINT
    assert load_bundle(bundle.path).cell_head == bundle.cell_head  # the old one untouched

    record = read_verification(isolated_data_dir, bundle.sha256)
    assert record is not None and record.verified_by == "lab lead"
    assert f"{len(truth)} labelled cells of site-cells" in record.summary


def test_what_labelled_cells_cannot_validate_is_one_line(
    tiny_bundle: Path, bundle: Bundle, labelled: Path, tmp_path: Path
) -> None:
    no_cells = without_cell_head(tiny_bundle, tmp_path / "no-cells")
    code, output = _invoke("validate", str(no_cells.path), str(labelled))
    assert code == 2 and "has no cell head" in _one_line(output)

    unknown = tmp_path / "marrow-cells"
    for name in ("Blast", "plasma_cell"):
        (unknown / name).mkdir(parents=True)
        shutil.copy(next((labelled / "plasma_cell").iterdir()), unknown / name / "1.png")
    code, output = _invoke("validate", str(bundle.path), str(unknown))
    reason = _one_line(output)
    assert code == 2 and "'Blast' is not a class" in reason and "plasma-or-not" in reason

    code, output = _invoke(
        "validate", str(bundle.path), str(labelled), "--target-sensitivity", "x=0.9"
    )
    assert code == 2 and "--target-sensitivity is for cases" in _one_line(output)
