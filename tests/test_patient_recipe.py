"""``cytoedge train --recipe patient-linear --compare-recipes`` on a small labelled
synthetic cohort with the tiny bundle (which has a patient encoder): the written
version's myeloma head is a probe on the patient embedding tied to that encoder, every
marker recipe is cross-validated on the same cases and folds into one out-of-fold report,
``cytoedge validate`` scores held-out cases with it as the service would, and a bundle
that pairs it with another patient encoder, or a base without one, is refused. Then
``--align-patient-encoder`` (GenBloom's second stage) on the same cases, from that
version: one run of the scans serves both (the slide cache)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from appliance.cli.main import app
from appliance.pipeline.patients import patient_encoder_sha256
from runtime.bundle_format import BUNDLE_FILE, Bundle, BundleError, load_bundle
from runtime.files import sha256_file

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

    _align_from(made, base, cohort["train"], tmp_path, isolated_data_dir)


def _align_from(probed: Bundle, base: Bundle, cases: Path, tmp_path: Path, data_dir: Path) -> None:
    """``--align-patient-encoder`` from the probe's version, on one marker (two profiles
    of six cases each: enough to align on and to hold out from)."""
    from cytoedge_demo.genbloom import seeded_patient_encoder, write_genbloom_v
    from export.patient_align import PROVENANCE_KEY
    from export.patient_export import probe_bags
    from runtime.patient import PatientEncoder
    from tests.fixtures.tiny_bundle import tiny_recipe

    with cases.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    table = cases.with_name("del17p.csv")
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["case_id", "scans", "del(17p)"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    # The demo build's checkpoint, written again from its seed; another seed is refused.
    assert base.patient_encoder is not None and base.patient_encoder.kind == "genbloom-v"
    width = base.patient_encoder.cell_dim
    seed = tiny_recipe().seed + 7  # type: ignore[attr-defined]
    checkpoint = write_genbloom_v(
        seeded_patient_encoder(width, width, seed), tmp_path / "genbloom_v.pth"
    )
    wrong = write_genbloom_v(seeded_patient_encoder(width, width, seed + 1), tmp_path / "other.pth")
    code, output = _invoke(
        "train", str(table), "--bundle", str(probed.path), "--align-patient-encoder", str(wrong)
    )
    assert code == 2
    assert output.startswith(f"cytoedge: {wrong}: not the checkpoint the patient encoder of")
    assert "min cosine" in output
    assert not (data_dir / "bundles" / f"{base.name}-6").exists()

    code, output = _invoke(
        "train", str(table), "--bundle", str(probed.path), "--version", "6",
        "--align-patient-encoder", str(checkpoint),
    )  # fmt: skip
    assert code == 0, output
    assert "Held-out precision@" in output and "Dropped myeloma" in output
    made = load_bundle(data_dir / "bundles" / f"{base.name}-6")
    spec = made.patient_encoder
    assert spec is not None
    assert (spec.kind, spec.output, spec.embed_dim, spec.cell_dim) == (
        "genbloom-g",
        "projection",
        128,
        width,
    )
    assert spec.encoder == base.patient_encoder.encoder
    assert all(h.kind != "patient_probe" for h in made.heads)
    assert made.head_names == tuple(n for n in probed.head_names if n != "myeloma")
    assert (
        made.file(spec.variants["fp32"]).read_bytes()
        != base.file(base.patient_encoder.variants["fp32"]).read_bytes()
    )
    record = made.provenance[PROVENANCE_KEY]
    assert record["dropped_heads"] == ["myeloma"]
    assert "myeloma" not in made.provenance["training"]["heads"]
    assert record["checkpoint_kind"] == "genbloom-v" and record["markers"] == ["del(17p)"]
    assert record["derived_from"]["version"] == "5"
    assert record["checkpoint_sha256"] == sha256_file(checkpoint)
    retrieval = record["retrieval"]
    assert record["cases"] == len(rows) and retrieval["queries"] == len(record["held_out"]) >= 2
    assert 0.0 <= retrieval["after"] <= 1.0
    # The network itself returns unit-length 128-d embeddings, bag by bag.
    encoder = PatientEncoder(made)
    try:
        for bag in probe_bags(width):
            raw = encoder.model.run({"features": bag})["embedding"]
            assert raw.shape == (1, 128)
            assert float(np.linalg.norm(raw)) == pytest.approx(1.0, abs=1e-4)
    finally:
        encoder.close()


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
    code, output = _invoke(
        "train", str(cohort["train"]), "--bundle", str(bare), "--align-patient-encoder",
        str(tmp_path / "genbloom_v.pth"),
    )  # fmt: skip
    assert code == 2 and output.endswith(
        "has no patient encoder to align; add one with "
        "cytoedge export patient-encoder (docs/bundles.md)"
    )
