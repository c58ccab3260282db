"""Review and sign-off: what waits for a person, the sign-off as a new version with its
audit line, the site's verification record, and the FHIR document for the LIS."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import pytest

from appliance.results import (
    ConfirmedFindings,
    FindingsError,
    QcRecord,
    ResultError,
    latest_version,
    read_result,
    write_case_result,
)
from appliance.review.fhir import REPORT_STATUS, FhirError, export_signed_off, fhir_bundle
from appliance.review.sign_off import ReviewError, SignOff, needs_review, sign_off, waiting_reasons
from appliance.service.audit import AuditLog, read_audit
from appliance.site.verification import (
    VerificationRecord,
    is_verified,
    verification_path,
    write_verification,
)
from cytoedge_demo.samples import sample_content, write_sample_result

fhir_models = pytest.importorskip("fhirclient.models.bundle")

SHA = "ab" * 32
REVIEWER = "Dr Ana Reviewer"


def result_of(kind: str, slides: int = 2):
    names = tuple(f"s{n}.svs" for n in range(1, slides + 1))
    return sample_content("c-1", kind, names, seed=1).result


def test_what_waits_for_a_person() -> None:
    assert waiting_reasons(result_of("mm_negative"), bundle_verified=True) == ()
    assert waiting_reasons(result_of("mm_positive"), bundle_verified=True) == (
        "indeterminate: t(11;14)",
    )
    assert waiting_reasons(result_of("abstained"), bundle_verified=True) == (
        "no call: too few cells: 9 (the bundle needs at least 50)",
    )
    assert waiting_reasons(result_of("qc_failed", 1), bundle_verified=True) == (
        "rejected: slide QC failed: 71 % of tiles blurred",
        "QC failed on s1.svs",
    )
    clean = result_of("mm_negative")
    warn = QcRecord("warn", ("12 % of tiles blurred",))
    warned = dataclasses.replace(
        clean, scans=(dataclasses.replace(clean.scans[0], qc=warn), *clean.scans[1:])
    )
    assert waiting_reasons(warned, bundle_verified=True) == ("QC warning on s1.svs",)
    assert waiting_reasons(clean, bundle_verified=False) == (
        "bundle cytoedge-demo-mm 0.1.0 not verified on this site",
    )
    assert needs_review(clean, bundle_verified=False)
    assert not needs_review(clean, bundle_verified=True)


def test_a_bundle_is_verified_only_by_its_own_record(tmp_path: Path) -> None:
    assert not is_verified(tmp_path, SHA)  # no record: not verified
    record = VerificationRecord(SHA, "mm-heads", "2.1", "2026-11-20T10:00:00+00:00", "lab lead")
    path = write_verification(tmp_path, record)
    assert path == verification_path(tmp_path, SHA) == tmp_path / "verification" / f"{SHA}.json"
    assert is_verified(tmp_path, SHA)
    assert not is_verified(tmp_path, "cd" * 32)
    other = tmp_path / "verification" / f"{'cd' * 32}.json"
    other.write_text(path.read_text())  # a copy under another bundle's name
    assert not is_verified(tmp_path, "cd" * 32)
    path.write_text("{not json")
    assert not is_verified(tmp_path, SHA)


def signed(tmp_path: Path, kind: str, decision: SignOff, **kwargs):
    folder = write_sample_result(tmp_path / "outbox", "c-1", kind, ("s1.svs", "s2.svs"))
    audit = AuditLog(tmp_path / "state" / "audit.jsonl", software_version="test")
    done = sign_off(
        folder.path,
        decision,
        data_dir=tmp_path,
        audit=audit,
        fhir_outbox=tmp_path / "fhir",
        write_pdf=False,
        **kwargs,
    )
    return folder, done


def test_a_sign_off_is_a_new_version_and_an_audit_line(tmp_path: Path) -> None:
    before, done = signed(tmp_path, "mm_positive", SignOff("sent_for_fish", f" {REVIEWER} "))
    v1 = read_result(before.path)
    assert before.path.name == "v1" and done.folder.path.name == "v2"
    assert latest_version(tmp_path / "outbox", "c-1") == done.folder
    assert v1.review is None  # the version reviewed is never edited
    review = read_result(done.folder.path).review
    assert review is not None and done.result.review == review
    assert (review.decision, review.reviewer, review.reviewed_version) == (
        "sent_for_fish",
        REVIEWER,
        1,
    )
    assert review.waited_for == (
        "indeterminate: t(11;14)",
        "bundle cytoedge-demo-mm 0.1.0 not verified on this site",
    )
    # Everything but the result and its report is carried over unchanged.
    assert dataclasses.replace(done.result, version=1, review=None) == v1
    for path in before.path.rglob("*"):
        twin = done.folder.path / path.relative_to(before.path)
        if path.is_file() and path.name not in ("result.json", "report.html"):
            assert twin.read_bytes() == path.read_bytes(), path
    report = (done.folder.path / "report.html").read_text()
    assert "Sent for FISH" in report and REVIEWER in report
    assert "not signed off" in (before.path / "report.html").read_text()
    (line,) = read_audit(tmp_path / "state" / "audit.jsonl")
    assert line["event"] == "signed_off" and line["case"] == "c-1"
    assert (line["reviewed_version"], line["version"], line["decision"]) == (1, 2, "sent_for_fish")
    assert line["reviewer"] == REVIEWER and line["waited_for"] == list(review.waited_for)
    assert not needs_review(done.result, bundle_verified=False)


def test_sign_offs_that_are_refused(tmp_path: Path) -> None:
    folder = write_sample_result(tmp_path / "outbox", "c-1", "mm_positive")
    audit = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(ReviewError, match="needs a reason"):
        sign_off(folder.path, SignOff("rejected", REVIEWER, " "), data_dir=tmp_path, audit=audit)
    with pytest.raises(ReviewError, match="reviewer's name"):
        sign_off(folder.path, SignOff("accepted", " "), data_dir=tmp_path, audit=audit)
    # A re-score arrived after the reviewer opened version 1: version 1 is not signed.
    write_case_result(tmp_path / "outbox", sample_content("c-1", "mm_negative", ("a.svs",)))
    with pytest.raises(ReviewError, match=r"newer result \(version 2\)"):
        sign_off(folder.path, SignOff("accepted", REVIEWER), data_dir=tmp_path, audit=audit)
    assert sorted(p.name for p in folder.case_dir.iterdir()) == ["latest.json", "v1", "v2"]
    assert read_audit(tmp_path / "audit.jsonl") == []


def test_a_review_record_is_checked_on_reading(tmp_path: Path) -> None:
    _, done = signed(tmp_path, "mm_negative", SignOff("rejected", REVIEWER, "smear too thick"))
    data = done.result.to_json()
    data["review"]["reason"] = ""
    with pytest.raises(ResultError, match=r"review.reason must say why"):
        type(done.result).from_json(data)
    data["review"] = {**done.result.to_json()["review"], "decision": "maybe"}
    with pytest.raises(ResultError, match=r"review\.decision must be one of"):
        type(done.result).from_json(data)


# --- FHIR ---------------------------------------------------------------------------------

R4_REPORT_STATUS = {"registered", "partial", "preliminary", "final", "amended", "corrected",
                    "appended", "cancelled", "entered-in-error", "unknown"}  # fmt: skip
R4_OBSERVATION_STATUS = R4_REPORT_STATUS - {"partial", "appended"}


def validated(document: dict) -> object:
    """The document read by FHIR R4's own models (fhirclient, from the published structure
    definitions): unknown elements, wrong types, lists where single values belong and
    missing required elements are refused."""
    return fhir_models.Bundle(document, strict=True)


@pytest.mark.parametrize(
    ("decision", "kind"),
    [
        (SignOff("accepted", REVIEWER), "mm_negative"),
        (SignOff("sent_for_fish", REVIEWER, "t(11;14) indeterminate"), "mm_positive"),
        (SignOff("rejected", REVIEWER, "smear too thick"), "abstained"),
        (SignOff("accepted", REVIEWER), "pb"),
    ],
    ids=["accepted", "fish", "rejected", "pb"],
)
def test_a_signed_off_result_is_valid_fhir_r4(tmp_path: Path, decision: SignOff, kind: str) -> None:
    _, done = signed(tmp_path, kind, decision)
    assert done.fhir == tmp_path / "fhir" / "c-1-v2.json"
    document = json.loads(done.fhir.read_text())
    bundle = validated(document)
    assert bundle.type == "transaction"
    resources = [entry.resource for entry in bundle.entry]
    kinds = [r.resource_type for r in resources]
    assert kinds[0] == "Device" and kinds[-1] == "DiagnosticReport"
    device, *observations, report = resources
    assert device.identifier[0].value == done.result.bundle.sha256
    assert report.status == REPORT_STATUS[decision.decision] and report.status in R4_REPORT_STATUS
    assert report.resultsInterpreter[0].display == REVIEWER
    assert report.identifier[0].value == "c-1/v2"
    rows = [row for head in done.result.heads for row in (*head.predictions, *head.findings)]
    assert len(observations) == len(rows)  # one per task and per finding
    urls = [entry.fullUrl for entry in bundle.entry]
    assert [r.reference for r in report.result or []] == urls[1:-1]
    for observation, row in zip(observations, rows, strict=True):
        assert observation.status in R4_OBSERVATION_STATUS
        assert observation.device.reference == urls[0]
        if hasattr(row, "threshold"):
            assert observation.valueQuantity.value == pytest.approx(row.probability, abs=1e-4)
            assert observation.referenceRange[0].high.value == pytest.approx(row.threshold)
            code = observation.interpretation[0].coding[0].code
            assert code == {"positive": "POS", "negative": "NEG", "indeterminate": "IND"}[row.call]
    form = report.presentedForm[0]
    assert form.contentType == "text/html"  # no PDF was printed here
    assert base64.b64decode(form.data) == (done.folder.path / "report.html").read_bytes()
    if decision.reason:
        assert decision.reason in report.conclusion
    # Written twice, the same version is the same document: the LIS sees one report.
    assert fhir_bundle(done.result, done.folder.path) == document


def test_the_fhir_models_refuse_what_r4_does_not_allow(tmp_path: Path) -> None:
    from fhirclient.models.fhirabstractbase import FHIRValidationError

    _, done = signed(tmp_path, "mm_negative", SignOff("accepted", REVIEWER))
    document = json.loads(done.fhir.read_text())
    report = document["entry"][-1]["resource"]
    for broken in (
        {**report, "reviewer": REVIEWER},  # not an R4 element
        {**report, "conclusion": ["a list"]},  # one string in R4
        {key: value for key, value in report.items() if key != "code"},  # required
        {**report, "issued": "29 Nov 2026"},  # not an instant
    ):
        entries = [*document["entry"][:-1], {**document["entry"][-1], "resource": broken}]
        with pytest.raises(FHIRValidationError):
            validated({**document, "entry": entries})


def test_the_pdf_report_is_attached_when_there_is_one(tmp_path: Path) -> None:
    pytest.importorskip("PySide6.QtGui")
    folder = write_sample_result(tmp_path / "outbox", "c-2", "mm_negative", write_pdf=True)
    done = sign_off(
        folder.path,
        SignOff("accepted", REVIEWER),
        data_dir=tmp_path,
        audit=AuditLog(tmp_path / "audit.jsonl"),
        fhir_outbox=tmp_path / "fhir",
    )
    report = validated(json.loads(done.fhir.read_text())).entry[-1].resource
    form = report.presentedForm[0]
    assert form.contentType == "application/pdf"
    assert base64.b64decode(form.data)[:4] == b"%PDF"


def test_only_signed_off_results_are_written_and_ids_are_escaped(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    folder = write_sample_result(outbox, "MM,17|a", "mm_negative")
    with pytest.raises(FhirError, match="not signed off"):
        export_signed_off("MM,17|a", outbox, tmp_path / "fhir")
    with pytest.raises(FhirError, match="no result found"):
        export_signed_off("nobody", outbox, tmp_path / "fhir")
    sign_off(
        folder.path, SignOff("accepted", REVIEWER), data_dir=tmp_path,
        audit=AuditLog(tmp_path / "audit.jsonl"), write_pdf=False,
    )  # fmt: skip
    written = export_signed_off("MM,17|a", outbox, tmp_path / "fhir")  # the latest version
    document = json.loads(written.read_text())
    validated(document)
    query = document["entry"][-1]["request"]["ifNoneExist"]
    assert query == "identifier=urn%3Acytoedge%3Aresult%7CMM%5C%2C17%5C%7Ca%2Fv2"


# --- Confirmed findings -------------------------------------------------------------------

FINDINGS = ConfirmedFindings(
    diagnosis="Plasma cell myeloma",
    fish=("t(11;14)", "del(17p)"),
    karyotype="46,XY,t(11;14)(q13;q32)[20]",
    mutations=("KRAS G12D",),
)


def test_confirmed_findings_are_normalised_as_entered_and_refused_with_one_line() -> None:
    entered = ConfirmedFindings.entered(
        diagnosis="  Plasma   cell\nmyeloma ",
        fish=[" t(11;14) ", "del(17p)"],
        karyotype=" 46,XY, t(11;14)(q13;q32) [20] ",
        mutations=["KRAS  G12D"],
    )
    assert entered == FINDINGS
    assert ConfirmedFindings.entered(diagnosis=" ", karyotype="\t") is None  # nothing entered
    for kwargs, message in (
        ({"fish": ["t(11;14)", "  "]}, "FISH entry 2 is empty"),
        ({"mutations": ["TP53", "tp53 "]}, "mutations lists tp53 twice"),
        ({"karyotype": "46XY"}, "karyotype 46XY does not read as ISCN"),
        ({"karyotype": "46,XY,t(11;14"}, "does not read as ISCN"),
        ({"karyotype": "not done"}, r"e\.g\. 46,XY,t\(11;14\)\(q13;q32\)\[20\]"),
    ):
        with pytest.raises(FindingsError, match=message) as caught:
            ConfirmedFindings.entered(**kwargs)
        assert "\n" not in str(caught.value)
    # Clones, a composite, idem and a donor's cells read as ISCN.
    for karyotype in ("45,X,-Y[3]/46,XY[17]", "46,XX,t(9;22)(q34;q11.2)[10]/47,idem,+8[10]",
                      "44~47,XY,+1,del(17)(p13)[cp10]", "46,XX[10]//46,XY[10]"):  # fmt: skip
        assert ConfirmedFindings.entered(karyotype=karyotype) is not None, karyotype


def test_confirmed_findings_land_in_the_result_the_report_and_the_audit_line(
    tmp_path: Path,
) -> None:
    _, done = signed(tmp_path, "mm_positive", SignOff("accepted", REVIEWER, "", FINDINGS))
    raw = json.loads((done.folder.path / "result.json").read_text())
    assert raw["review"]["confirmed"] == {
        "diagnosis": "Plasma cell myeloma",
        "fish": ["t(11;14)", "del(17p)"],
        "karyotype": "46,XY,t(11;14)(q13;q32)[20]",
        "mutations": ["KRAS G12D"],
    }
    assert read_result(done.folder.path).review.confirmed == FINDINGS
    report = (done.folder.path / "report.html").read_text()
    for text in ("Plasma cell myeloma", "t(11;14), del(17p)", "46,XY,t(11;14)(q13;q32)[20]",
                 "KRAS G12D"):  # fmt: skip
        assert text in report
    (line,) = read_audit(tmp_path / "state" / "audit.jsonl")
    assert line["confirmed"] == raw["review"]["confirmed"]


def test_a_sign_off_without_findings_writes_no_confirmed_key_and_older_results_read(
    tmp_path: Path,
) -> None:
    _, done = signed(tmp_path, "mm_negative", SignOff("accepted", REVIEWER))
    raw = json.loads((done.folder.path / "result.json").read_text())
    assert "confirmed" not in raw["review"]  # absent, not null
    assert read_result(done.folder.path).review.confirmed is None
    (line,) = read_audit(tmp_path / "state" / "audit.jsonl")
    assert "confirmed" not in line


def test_confirmed_findings_are_checked_on_reading_and_on_signing(tmp_path: Path) -> None:
    _, done = signed(tmp_path, "mm_negative", SignOff("accepted", REVIEWER, "", FINDINGS))
    data = done.result.to_json()
    for broken, message in (
        ({"karyotype": "XY46"}, r"review\.confirmed: karyotype XY46 does not read as ISCN"),
        ({"fish": ["t(11;14)", "T(11;14)"]}, r"review\.confirmed: FISH lists T\(11;14\) twice"),
        ({"fish": [""]}, r"review\.confirmed: FISH entry 1 is empty"),
        ({"diagnosis": "", "fish": [], "karyotype": "", "mutations": []}, "holds no finding"),
        ({"extra": 1}, r"review\.confirmed: unknown key\(s\) extra"),
    ):
        changed = {**data, "review": {**data["review"], "confirmed": {
            **data["review"]["confirmed"], **broken}}}  # fmt: skip
        with pytest.raises(ResultError, match=message):
            type(done.result).from_json(changed)
    # Built by code rather than typed, findings are still checked before anything is written.
    folder = write_sample_result(tmp_path / "outbox", "c-9", "mm_negative")
    audit = AuditLog(tmp_path / "audit.jsonl")
    bad = SignOff("accepted", REVIEWER, "", ConfirmedFindings(fish=("t(4;14)", "t(4;14)")))
    with pytest.raises(ReviewError, match=r"confirmed findings: FISH lists t\(4;14\) twice"):
        sign_off(folder.path, bad, data_dir=tmp_path, audit=audit, write_pdf=False)
    assert sorted(p.name for p in folder.case_dir.iterdir()) == ["latest.json", "v1"]
    assert read_audit(tmp_path / "audit.jsonl") == []


def test_confirmed_findings_are_fhir_observations(tmp_path: Path) -> None:
    _, done = signed(tmp_path, "mm_positive", SignOff("sent_for_fish", REVIEWER, "", FINDINGS))
    bundle = validated(json.loads(done.fhir.read_text()))
    urls = [entry.fullUrl for entry in bundle.entry]
    report = bundle.entry[-1].resource
    assert report.status == "preliminary"
    assert [r.reference for r in report.result] == urls[1:-1]  # the report lists them too
    head_rows = sum(len(h.predictions) + len(h.findings) for h in done.result.heads)
    confirmed = [entry.resource for entry in bundle.entry[1 + head_rows : -1]]
    local = "urn:cytoedge:confirmed"
    seen = [
        (r.identifier[0].value, {c.system: c.code for c in r.code.coding}, r.valueString)
        for r in confirmed
    ]
    assert seen == [
        ("c-1/v2/confirmed/diagnosis/1", {"http://loinc.org": "29308-4", local: "diagnosis"},
         "Plasma cell myeloma"),
        ("c-1/v2/confirmed/fish/1", {local: "fish"}, "t(11;14)"),
        ("c-1/v2/confirmed/fish/2", {local: "fish"}, "del(17p)"),
        ("c-1/v2/confirmed/karyotype/1", {"http://loinc.org": "62356-1", local: "karyotype"},
         "46,XY,t(11;14)(q13;q32)[20]"),
        ("c-1/v2/confirmed/mutation/1", {"http://loinc.org": "69548-6", local: "mutation"},
         None),
    ]  # fmt: skip
    for observation in confirmed:
        # The laboratory's own results: final, entered by the reviewer, made by no Device.
        assert observation.status == "final" and observation.device is None
        assert observation.performer[0].display == REVIEWER
        assert observation.issued.isostring == done.result.review.signed_at
    assert confirmed[1].method.text.startswith("Fluorescence in situ hybridization")
    mutation = confirmed[-1]
    assert mutation.valueCodeableConcept.coding[0].code == "LA9633-4"  # Present
    assert mutation.component[0].valueString == "KRAS G12D"
    # Without findings, the document holds the screen's Observations only.
    _, plain = signed(tmp_path / "plain", "mm_positive", SignOff("sent_for_fish", REVIEWER))
    plain_bundle = validated(json.loads(plain.fhir.read_text()))
    assert len(plain_bundle.entry) == len(bundle.entry) - len(confirmed)
