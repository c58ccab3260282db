"""Head kinds are plug-ins: a third kind in one file flows through the bundle, the runtime,
result.json, the report and the window without a change anywhere else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tests.toy_head_kind  # noqa: F401 - registers the toy kind
from appliance.pipeline.cases import score_case
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.slides import process_slide
from appliance.results import read_result
from cytoedge_demo.synthetic import write_cell_folders
from runtime.bundle_format import BundleError, CellsSpec, HeadSpec, load_bundle
from runtime.head_kinds import head_kind_names
from runtime.heads import HeadRunner
from tests.runtime_models import TinyBundle, head_model, head_reference


def toy_bundle(root: Path) -> tuple[TinyBundle, tuple[np.ndarray, np.ndarray]]:
    """The small test bundle with one head of the toy kind; and that head's weights."""
    made = TinyBundle(root)
    rng = np.random.default_rng(11)
    aw, ow = rng.normal(size=made.dim), rng.normal(size=(made.dim, 1))
    # The toy's network has the gated head's form with one output: a sigmoid score.
    made.sources["heads/toy.0.onnx"] = head_model(
        root / "parts" / "toy.onnx", aw, ow, "gated_attention_mil"
    )
    made.heads = [
        HeadSpec(
            name="toy",
            kind="toy_cut_off_score",
            files=("heads/toy.0.onnx",),
            labels={"blastness": "Blast-likeness"},
            thresholds={"blastness": 0.5},
            extra={"score": "blastness", "margin_label": "Above the cut-off by"},
        )
    ]
    return made, (aw, ow)


def test_the_toy_kind_is_registered_and_checks_its_own_keys(tmp_path: Path) -> None:
    assert "toy_cut_off_score" in head_kind_names()
    made, _ = toy_bundle(tmp_path)
    bundle = made.write()
    assert bundle.heads[0].outputs == ("blastness",)
    bad = HeadSpec(**{**made.heads[0].__dict__, "thresholds": {"other": 0.5}})
    with pytest.raises(BundleError, match="thresholds must hold the cut-off of 'blastness'"):
        made.write(heads=[bad], overwrite=True)
    stray = HeadSpec(**{**made.heads[0].__dict__, "extra": {"score": "b", "colour": "red"}})
    with pytest.raises(BundleError, match=r"unknown key\(s\) colour"):
        made.write(heads=[stray], overwrite=True)


def test_a_toy_kind_flows_to_result_json_the_report_and_the_window(
    tmp_path: Path, qtbot: object
) -> None:
    made, weights = toy_bundle(tmp_path)
    bundle = made.write(cells=CellsSpec(min_cells=5))
    write_cell_folders(tmp_path / "cells", n_patients=1, cells_per_patient=12, seed=4)
    with SlideNetworks(bundle) as networks:
        slide = process_slide(tmp_path / "cells" / "P0001", networks, cache_dir=tmp_path / "c")
    case = score_case("toy-case", [slide], bundle, tmp_path / "out", write_pdf=False)

    # The runtime: the kind called the ensemble's score against the bundle's cut-off.
    features = slide.cells().embeddings
    score = head_reference(features, *weights, "gated_attention_mil")[0][0]
    run = HeadRunner(load_bundle(bundle.path), "toy").predict(features)
    assert run.probabilities["blastness"] == pytest.approx(score, abs=1e-5)

    # result.json: the head, its call and its finding, read back through the schema.
    result = read_result(case.folder.path)
    (head,) = result.heads
    assert head.kind == "toy_cut_off_score"
    (prediction,) = head.predictions
    assert prediction.label == "Blast-likeness" and prediction.threshold == 0.5
    assert prediction.call == ("positive" if score >= 0.5 else "negative")
    (finding,) = head.findings
    assert finding.key == "margin" and finding.label == "Above the cut-off by"
    assert finding.value == pytest.approx(score - 0.5, abs=1e-5)

    # The report shows the same rows.
    html = (case.folder.path / "report.html").read_text(encoding="utf-8")
    assert "Blast-likeness" in html and "Above the cut-off by" in html
    assert finding.text in html

    # The window shows them too.
    pytest.importorskip("PySide6")
    from gui.result_view import ProbabilityBar, ResultPane, read_folder

    pane = ResultPane()
    qtbot.addWidget(pane)  # type: ignore[attr-defined]
    pane.show_result(read_folder(case.folder.path))
    bars = pane.predictions_box.findChildren(ProbabilityBar)
    assert [bar.accessibleName().split(":")[0] for bar in bars] == ["Blast-likeness"]
    labels = [w.text() for w in pane.predictions_box.findChildren(type(pane.title))]
    assert f"<b>Above the cut-off by</b>: {finding.text}" in labels
