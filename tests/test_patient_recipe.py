"""``cytoedge train --recipe patient-linear --compare-recipes`` on a small labelled
synthetic cohort with the tiny bundle (which has a patient encoder): the written
version's myeloma head is a probe on the patient embedding tied to that encoder, every
marker recipe is cross-validated on the same cases and folds into one out-of-fold report,
``cytoedge validate`` scores held-out cases with it as the service would, and a bundle
that pairs it with another patient encoder, or a base without one, is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli.main import app
from appliance.pipeline.patients import patient_encoder_sha256
from runtime.bundle_format import BUNDLE_FILE, BundleError, load_bundle

pytestmark = pytest.mark.slow
RECIPES = ("myeloma", "myeloma.mil", "myeloma.patient-mlp")  # the written head first


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """12 + 4 myeloma smears, as the demo writes them."""
    from cytoedge_demo.cohort import CohortSizes, write_cohorts

    sizes = CohortSizes(
        mm_cases={"train": 12, "holdout": 4},
        pb_patients={"train": 0, "holdout": 0},
        pb_cells=10,
        slide_px=768,
        nucleated_per_mm2=2400.0,
        plasma_fraction=0.6,
        seed=11,
    )
    return write_cohorts(tmp_path_factory.mktemp("cohort"), sizes, lambda fraction: None)


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def test_patient_linear_is_trained_compared_on_the_same_folds_and_scored(
    tiny_bundle: Path, cohort: dict[str, Path], tmp_path: Path, isolated_data_dir: Path
) -> None:
    base = load_bundle(tiny_bundle)
    code, output = _invoke(
        "train",
        str(cohort["train"]),
        "--bundle",
        str(tiny_bundle),
        "--folds",
        "2",
        "--version",
        "5",
        "--recipe",
        "patient-linear",
        "--compare-recipes",
    )
    assert code == 0, output
    assert "recipe: patient-linear, every recipe compared on the same folds" in output
    made = load_bundle(isolated_data_dir / "bundles" / f"{base.name}-5")
    probe = made.head("myeloma")
    assert probe.kind == "patient_probe" and probe.bag_classes == ()
    assert probe.extra["patient_encoder_sha256"] == patient_encoder_sha256(made)
    assert len(probe.files) == 2 and probe.inputs == ("scans",)
    # the blood head is the base's: this table has no blood case
    assert made.head("peripheral-blood") == base.head("peripheral-blood")

    training = made.provenance["training"]
    assert training["heads"]["myeloma"]["recipe_name"] == "patient-linear"
    compared = training["recipes_compared"]
    assert {name: c["recipe_name"] for name, c in compared.items()} == {
        "myeloma.mil": "mil",
        "myeloma.patient-mlp": "patient-mlp",
    }
    folds = [training["heads"]["myeloma"]["out_of_fold"]["test_fold"]]
    folds += [compared[name]["out_of_fold"]["test_fold"] for name in RECIPES[1:]]
    assert len(folds[0]) == 12 and folds[1] == folds[0] and folds[2] == folds[0]

    report = isolated_data_dir / "validation" / f"{base.name}-5" / "training"
    oof = json.loads((report / "report.json").read_text())
    by_head: dict[str, list[dict]] = {}
    for task in oof["tasks"]:
        by_head.setdefault(task["head"], []).append(task)
    assert tuple(by_head) == RECIPES
    for tasks in by_head.values():
        assert [t["task"] for t in tasks] == list(probe.thresholds)
        assert [t["labelled"] for t in tasks] == [t["labelled"] for t in by_head["myeloma"]]
    html = (report / "report.html").read_text()
    assert "Recipes on the same folds" in html and "patient-mlp" in html

    code, output = _invoke(
        "validate",
        str(made.path),
        str(cohort["holdout"]),
        "--report",
        str(tmp_path / "held-out"),
        "--resamples",
        "100",
    )
    assert code == 0, output
    figures = json.loads((tmp_path / "held-out" / "report.json").read_text())
    scored = {t["task"]: t for t in figures["tasks"] if t["head"] == "myeloma"}
    assert set(scored) == set(probe.thresholds)
    assert all(t["scored"] == 4 for t in scored.values())
    (latest, *_) = sorted((tmp_path / "held-out" / "cases").glob("*/latest.json"))
    pointer = json.loads(latest.read_text())
    result = json.loads((latest.parent / pointer["path"] / "result.json").read_text())
    (head,) = result["heads"]
    assert head["name"] == "myeloma" and len(head["predictions"]) == len(probe.thresholds)
    # a probe reads the patient embedding: no cell drove it, so none is shown as if it had
    assert result["top_cells"] == [] and result["attention_top20_mass"] is None
    assert result["patient_embedding"]["encoder_sha256"] == patient_encoder_sha256(made)

    # Paired with another patient encoder, the probe is refused.
    other = tmp_path / "other"
    shutil.copytree(made.path, other)
    manifest = json.loads((other / BUNDLE_FILE).read_text())
    for section in manifest["heads"]:
        if section["name"] == "myeloma":
            section["patient_encoder_sha256"] = "0" * 64
    (other / BUNDLE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="learnt on patient encoder 000000000000"):
        load_bundle(other)


def test_a_patient_recipe_needs_a_patient_encoder_and_a_known_name(
    tiny_bundle: Path, cohort: dict[str, Path], tmp_path: Path, isolated_data_dir: Path
) -> None:
    code, output = _invoke("train", str(cohort["train"]), "--recipe", "patient-knn")
    assert code == 2 and "--recipe patient-knn: one of mil, patient-linear, patient-mlp" in output
    bare = tmp_path / "bare"
    shutil.copytree(tiny_bundle, bare)
    manifest = json.loads((bare / BUNDLE_FILE).read_text())
    del manifest["patient_encoder"]
    (bare / BUNDLE_FILE).write_text(json.dumps(manifest))
    code, output = _invoke(
        "train", str(cohort["train"]), "--bundle", str(bare), "--recipe", "patient-linear"
    )
    assert code == 1, output
    assert "--recipe patient-linear: " in output and "has no patient encoder" in output
