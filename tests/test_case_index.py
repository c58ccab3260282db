"""The patient embedding of a scored case and the site's case index: similar earlier
signed-off cases by cosine, the index rebuilt from result folders, sign-offs seen."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from appliance.pipeline.bags import head_bag
from appliance.pipeline.cases import score_case
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.patients import site_case_index
from appliance.pipeline.slides import process_slide
from appliance.results import read_result
from appliance.results.case_index import INDEX_DIR, VECTORS, CaseIndex
from appliance.review.sign_off import SignOff, sign_off
from appliance.service.audit import AuditLog
from cytoedge_demo.genbloom import seeded_patient_encoder
from cytoedge_demo.synthetic import write_cell_folders
from export.patient_export import export_fp32
from runtime.bundle_format import Bundle, PairedEncoder, PatientEncoderSpec
from runtime.parity import row_cosines
from tests.runtime_models import TinyBundle

CASES = ("A", "B", "C", "D", "E")


@pytest.fixture(scope="module")
def patient_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, torch.nn.Module]:
    """The tiny test bundle (16-d cells) with a GenBloom-shaped patient encoder."""
    root = tmp_path_factory.mktemp("patient-bundle")
    tiny = TinyBundle(root)
    model = seeded_patient_encoder(tiny.dim, 48, seed=12)
    onnx = root / "parts" / "patient_encoder.onnx"
    export_fp32(model, onnx, {})
    spec = PatientEncoderSpec(
        kind="genbloom-v",
        output="cls",
        cell_dim=tiny.dim,
        embed_dim=48,
        encoder=PairedEncoder(tiny.encoder.architecture, tiny.dim),
        variants={"fp32": "patient_encoder.onnx"},
    )
    bundle = tiny.write(
        sources={**tiny.sources, "patient_encoder.onnx": onnx}, patient_encoder=spec
    )
    return bundle, model


@pytest.fixture(scope="module")
def scored(
    patient_bundle: tuple[Bundle, torch.nn.Module], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    """Five cases of cell folders scored into one outbox; A, B and C signed off."""
    bundle, _ = patient_bundle
    root = tmp_path_factory.mktemp("site")
    write_cell_folders(root / "in", len(CASES), 40, seed=21)
    data, outbox = root / "data", root / "out"
    index = site_case_index(bundle, data, outbox)
    assert index is not None and not index.rows  # a new site: rebuilt, empty
    slides, folders = {}, {}
    with SlideNetworks(bundle) as networks:
        for number, case in enumerate(CASES, start=1):
            slide = process_slide(root / "in" / f"P{number:04d}", networks, cache_dir=root / "c")
            slides[case] = slide
            folders[case] = score_case(
                case, [slide], bundle, outbox, write_pdf=False, case_index=index
            ).folder.path
    audit = AuditLog(root / "state" / "audit.jsonl", software_version="test")
    for case, decision in zip("ABC", ("accepted", "sent_for_fish", "rejected"), strict=True):
        done = sign_off(
            folders[case],
            SignOff(
                decision, "Dr Test", "not a plasma cell case" if decision == "rejected" else ""
            ),
            data_dir=data,
            audit=audit,
            write_pdf=False,
        )
        folders[case] = done.folder.path
    return {"data": data, "outbox": outbox, "slides": slides, "folders": folders, "index": index}


def embedding(folder: object) -> np.ndarray:
    return np.load(Path(str(folder)) / "patient_embedding.npy")


def test_a_scored_case_keeps_the_patient_encoder_s_embedding_of_its_cells(
    patient_bundle: tuple[Bundle, torch.nn.Module], scored: dict
) -> None:
    bundle, model = patient_bundle
    folder = scored["folders"]["D"]
    result = read_result(folder)
    record = result.patient_embedding
    assert record is not None and result.outputs.patient_embedding == "patient_embedding.npy"
    assert (record.kind, record.dim, record.cells) == ("genbloom-v", 48, 40)
    stored = embedding(folder)
    assert stored.shape == (48,) and np.linalg.norm(stored) == pytest.approx(1.0, abs=1e-5)
    cells = head_bag(bundle, {"D": scored["slides"]["D"].cells()}, ())
    with torch.no_grad():
        reference = model(torch.from_numpy(cells)).numpy()
    assert row_cosines(reference, stored[None])[0] >= 0.99999


def test_similar_cases_are_the_nearest_signed_off_ones_by_cosine(scored: dict) -> None:
    folders = scored["folders"]
    index: CaseIndex = scored["index"]
    query = embedding(folders["E"])
    found = index.similar(query, exclude_case="E", k=5)
    assert {s.case_id for s in found} == {"A", "B", "C"}  # D and E were never signed off
    expected = {case: float(embedding(folders[case]) @ query) for case in "ABC"}
    assert [s.case_id for s in found] == sorted(expected, key=expected.__getitem__, reverse=True)
    for similar in found:
        assert similar.similarity == pytest.approx(expected[similar.case_id], abs=1e-4)
    decisions = {s.case_id: s.decision for s in found}
    assert decisions == {"A": "accepted", "B": "sent_for_fish", "C": "rejected"}
    assert all(s.version == 2 for s in found)  # the signed-off versions
    assert [s.case_id for s in index.similar(query, exclude_case="E", k=1)] == [found[0].case_id]
    assert "A" not in {s.case_id for s in index.similar(embedding(folders["A"]), exclude_case="A")}


def test_a_later_case_lists_the_similar_cases_in_its_result_and_report(
    patient_bundle: tuple[Bundle, torch.nn.Module], scored: dict
) -> None:
    bundle, _ = patient_bundle
    index = site_case_index(bundle, scored["data"], scored["outbox"])
    case = score_case(
        "E", [scored["slides"]["E"]], bundle, scored["outbox"], write_pdf=False, case_index=index
    )
    listed = case.result.similar_cases
    assert [s.case_id for s in listed] == [
        s.case_id for s in index.similar(embedding(case.folder.path), exclude_case="E")
    ]
    assert len(listed) == 3
    html = (case.folder.path / "report.html").read_text(encoding="utf-8")
    assert "Similar earlier cases" in html
    for similar in listed:
        assert similar.case_id in html and f"{similar.similarity:.2f}" in html


def test_the_index_is_rebuilt_from_the_result_folders_when_missing_or_damaged(
    patient_bundle: tuple[Bundle, torch.nn.Module], scored: dict
) -> None:
    bundle, _ = patient_bundle
    query = embedding(scored["folders"]["E"])
    before = scored["index"].similar(query, exclude_case="E")
    shutil.rmtree(scored["data"] / INDEX_DIR)
    rebuilt = site_case_index(bundle, scored["data"], scored["outbox"])
    assert rebuilt is not None and rebuilt.similar(query, exclude_case="E") == before
    vectors = next((scored["data"] / INDEX_DIR).iterdir()) / VECTORS
    with open(vectors, "ab") as damaged:  # a vector without its row
        damaged.write(np.zeros(48, np.float32).tobytes())
    again = site_case_index(bundle, scored["data"], scored["outbox"])
    assert again is not None and again.similar(query, exclude_case="E") == before
    assert again.add(scored["folders"]["E"])  # the next append sees it and rebuilds first
    assert vectors.stat().st_size == len(again.rows) * 48 * 4
    assert again.similar(query, exclude_case="E") == before


def test_confirmed_findings_are_read_tolerantly_from_the_raw_result(
    patient_bundle: tuple[Bundle, torch.nn.Module], scored: dict, tmp_path: Path
) -> None:
    """review.confirmed as a sign-off with findings writes it; older results lack it."""
    bundle, _ = patient_bundle
    outbox = tmp_path / "out"
    shutil.copytree(scored["outbox"], outbox)
    signed = outbox / "A" / "v2" / "result.json"
    raw = json.loads(signed.read_text())
    raw["review"]["confirmed"] = {
        "diagnosis": "multiple myeloma",
        "fish": ["del(17p)", "t(4;14)"],
        "karyotype": "",
        "mutations": ["TP53"],
    }
    signed.write_text(json.dumps(raw))
    index = site_case_index(bundle, tmp_path / "data", outbox)
    found = {s.case_id: s for s in index.similar(embedding(outbox / "E" / "v1"), exclude_case="E")}
    a, b = found["A"], found["B"]
    assert (a.diagnosis, a.fish, a.karyotype, a.mutations) == (
        "multiple myeloma",
        ("del(17p)", "t(4;14)"),
        "",
        ("TP53",),
    )
    assert (b.diagnosis, b.fish, b.mutations) == ("", (), ())


def test_a_sign_off_elsewhere_is_seen_by_an_open_index(
    patient_bundle: tuple[Bundle, torch.nn.Module], scored: dict
) -> None:
    """The service holds the index while the window signs a case off."""
    bundle, _ = patient_bundle
    held = site_case_index(bundle, scored["data"], scored["outbox"])
    assert held is not None
    query = embedding(scored["folders"]["A"])
    assert "D" not in {s.case_id for s in held.similar(query, exclude_case="A")}
    audit = AuditLog(scored["data"] / "audit.jsonl", software_version="test")
    sign_off(
        scored["folders"]["D"],
        SignOff("accepted", "Dr Test"),
        data_dir=scored["data"],
        audit=audit,
        write_pdf=False,
    )
    assert "D" in {s.case_id for s in held.similar(query, exclude_case="A")}
