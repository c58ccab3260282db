"""``cytoedge train`` and ``cytoedge validate`` on a small labelled synthetic cohort, with
the tiny bundle's encoder and segmenter: a new version, its out-of-fold report, a
second run that embeds only the new scans, the validation report, recalibration as
another version, the site's verification record, and bad input in one line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli.main import app
from appliance.site.signing_keys import generate_key_pair
from appliance.site.verification import read_verification
from runtime.bundle_format import load_bundle
from runtime.bundle_signer import read_record

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """8 + 4 myeloma smears and 16 + 8 blood patients, as the demo writes them."""
    from cytoedge_demo.cohort import CohortSizes, write_cohorts

    root = tmp_path_factory.mktemp("cohort")
    sizes = CohortSizes(
        mm_cases={"train": 8, "holdout": 4},
        pb_patients={"train": 16, "holdout": 8},
        pb_cells=10,
        slide_px=768,
        nucleated_per_mm2=2400.0,
        plasma_fraction=0.6,
        seed=5,
    )
    return write_cohorts(root, sizes, lambda fraction: None)


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _rows(table: Path) -> list[dict[str, str]]:
    with open(table, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write_rows(table: Path, rows: list[dict[str, str]]) -> Path:
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table


def test_the_tiny_bundle_was_trained_by_the_training_path(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    assert bundle.version == "1"
    by_name = {h.name: h for h in bundle.heads}
    myeloma, blood = by_name["myeloma"], by_name["peripheral-blood"]
    # Each head scores what it learnt from; the blood head also the white cells of fields.
    assert (myeloma.inputs, blood.inputs) == (("scans",), ("fields", "cells"))
    assert len(myeloma.files) == len(blood.files) == 2  # one member per fold
    assert myeloma.calibration["kind"] == "platt"
    assert blood.calibration["kind"] == "temperature"
    # Three runs as a site trains: the cell head on labelled cells, the myeloma head on
    # the plasma cells of its 8 smears, the blood head on every cell of its 16 folders.
    assert bundle.cell_classes == ("blast", "segmented_neutrophil", "lymphocyte", "plasma_cell")
    assert bundle.provenance["cell_training"]["derived_from"]["version"] == "0"
    assert (myeloma.bag_classes, blood.bag_classes) == (("plasma_cell",), ())
    training = bundle.provenance["training"]
    assert len(training["cases_table_sha256"]) == 64 and training["cases"] == 16
    assert training["derived_from"]["version"] == "0.2"
    heads = training["heads"]
    assert heads["myeloma"]["bag_classes"] == ["plasma_cell"] and heads["myeloma"]["cases"] == 8
    assert heads["myeloma"]["positives"] == dict.fromkeys(myeloma.thresholds, 4)
    assert heads["peripheral-blood"]["classes"]["MDS"] == 2
    assert set(heads["myeloma"]["out_of_fold"]["tasks"]) == set(myeloma.thresholds)
    assert "macro_recall" in heads["peripheral-blood"]["out_of_fold"]["classes"]
    assert {"embedding", "heads", "export"} <= set(training["seconds"])


def test_train_then_validate_recalibrate_and_verify(
    tiny_bundle: Path, cohort: dict[str, Path], tmp_path: Path, isolated_data_dir: Path
) -> None:
    base = load_bundle(tiny_bundle)
    # The site has its own key, and trusts it: the versions it writes are signed with it.
    generate_key_pair(tmp_path / "keys", "site")
    (isolated_data_dir / "trusted-keys").mkdir()
    shutil.copy(tmp_path / "keys" / "site.pub", isolated_data_dir / "trusted-keys")
    key = tmp_path / "keys" / "site.key"
    (isolated_data_dir / "cytoedge.toml").write_text(f'[bundles]\nsigning_key = "{key}"\n')
    # A first run on all but two training cases.
    rows = _rows(cohort["train"])
    first = _write_rows(cohort["train"].with_name("first.csv"), rows[2:])
    code, output = _invoke(
        "train", str(first), "--bundle", str(tiny_bundle), "--folds", "2", "--version", "7"
    )
    assert code == 0, output
    made = load_bundle(isolated_data_dir / "bundles" / f"{base.name}-7")
    assert made.version == "7" and set(made.head_names) == {"myeloma", "peripheral-blood"}
    assert made.provenance["training"]["cases"] == len(rows) - 2
    # The same networks and cell head, but its heads read every cell where the base's
    # myeloma head read plasma cells: a scan's visit counts other cells, so its own cache.
    assert made.cell_head == base.cell_head and not any(h.bag_classes for h in made.heads)
    assert made.slide_sha256 != base.slide_sha256
    training_report = isolated_data_dir / "validation" / f"{base.name}-7" / "training"
    oof = json.loads((training_report / "report.json").read_text())
    assert oof["kind"] == "out-of-fold" and oof["bundle_sha256"] == made.sha256
    # The table by name and hash, its copy beside the report: its own folder may not last.
    assert oof["cases_table"] == "first.csv" == made.provenance["training"]["cases_table"]
    assert (training_report / "cases-table.csv").read_bytes() == first.read_bytes()
    assert "Training report (out-of-fold)" in (training_report / "report.html").read_text()
    signer = read_record(made.path).signer
    assert signer is not None and signer.name == "site" and f"site's key {signer}" in output

    # Two cases added: only their scans are embedded, the rest come from the cache.
    code, output = _invoke(
        "train", str(cohort["train"]), "--bundle", str(tiny_bundle), "--folds", "2"
    )
    assert code == 0, output
    assert f"(2 scans embedded, {len(rows) - 2} from the cache)" in " ".join(output.split())
    second = load_bundle(isolated_data_dir / "bundles" / f"{base.name}-2")
    assert load_bundle(tiny_bundle).sha256 == base.sha256  # the base is untouched

    report = tmp_path / "report"
    code, output = _invoke(
        "validate",
        str(second.path),
        str(cohort["holdout"]),
        "--report",
        str(report),
        "--recalibrate",
        "--target-sensitivity",
        "malignancy=1.0",
        "--verified-by",
        "lab lead",
        "--resamples",
        "200",
    )
    assert code == 0, output
    figures = json.loads((report / "report.json").read_text())
    assert figures["kind"] == "validation" and figures["cases"] == 12
    tasks = {(t["head"], t["task"]): t for t in figures["tasks"]}
    assert set(tasks) == {("myeloma", m) for m in second.head("myeloma").thresholds} | {
        ("peripheral-blood", "malignancy")
    }
    for task in tasks.values():
        assert task["labelled"] == task["scored"] + task["not_scored"]
        assert task["indeterminate"] <= task["scored"]
        if task["auc"] is not None:
            assert task["auc_low"] <= task["auc"] <= task["auc_high"]
    (classes,) = figures["classes"]
    assert classes["labelled"] == 8 and len(classes["confusion"]) == 8
    for n in range(1, len(figures["tasks"]) + 1):
        assert (report / f"roc-{n}.png").is_file() and (report / f"reliability-{n}.png").is_file()
    assert (report / "classes-1.png").is_file() and (report / "report.html").is_file()
    # every held-out case was scored as the service scores it, into the report's folder
    assert len(list((report / "cases").glob("*/latest.json"))) == 12

    recalibrated = load_bundle(isolated_data_dir / "bundles" / f"{base.name}-3")
    assert recalibrated.provenance["recalibration"]["derived_from"]["sha256"] == second.sha256
    assert load_bundle(second.path).sha256 == second.sha256  # the validated version stays
    malignancy = recalibrated.head("peripheral-blood").thresholds["malignancy"]
    scores = tasks[("peripheral-blood", "malignancy")]
    positives = [s for s, t in zip(scores["scores"], scores["truth"], strict=True) if t]
    assert malignancy <= min(positives)  # sensitivity 1.0 on these cases
    assert [h.files for h in recalibrated.heads] == [h.files for h in second.heads]
    assert read_record(recalibrated.path).signer == signer
    record = read_verification(isolated_data_dir, second.sha256)
    assert record is not None and record.verified_by == "lab lead"
    assert record.bundle_version == "2" and "12 cases" in record.summary


def test_a_case_whose_scans_are_all_rejected_is_listed_with_the_reason(
    tiny_bundle: Path, cohort: dict[str, Path], tmp_path: Path
) -> None:
    rows = _rows(cohort["holdout"])[:1]
    (tmp_path / "broken.svs").write_bytes(b"")
    rows.append({**rows[0], "case_id": "MM-broken", "scans": str(tmp_path / "broken.svs")})
    for row in rows:
        row["scans"] = str((cohort["holdout"].parent / row["scans"]).resolve())
    table = _write_rows(tmp_path / "with-broken.csv", rows)
    report = tmp_path / "report"
    code, output = _invoke(
        "validate", str(tiny_bundle), str(table), "--report", str(report), "--resamples", "100"
    )
    assert code == 0, output
    figures = json.loads((report / "report.json").read_text())
    (line,) = figures["not_scored"]
    assert line["case_id"] == "MM-broken" and line["status"] == "rejected"
    assert "broken.svs" in line["reason"] and "empty file" in line["reason"]
    assert "MM-broken" in (report / "report.html").read_text()


def test_bad_tables_and_bundles_are_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    table = tmp_path / "cases.csv"
    table.write_text("case_id,scans,del(17p)\nA,nowhere.tif,1\n", encoding="utf-8")
    for command in (["validate", str(tiny_bundle)], ["train", "--bundle", str(tiny_bundle)]):
        code, output = _invoke(*command, str(table))
        assert code == 2
        lines = [line for line in output.splitlines() if line.startswith("cytoedge:")]
        assert len(lines) == 1 and "row 2, column scans: nowhere.tif does not exist" in lines[0]
    code, output = _invoke("validate", str(tmp_path / "no-bundle"), str(table))
    assert code == 2 and "no bundle.json" in output
