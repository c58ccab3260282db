"""A signed-off result as FHIR R4, for the laboratory system to pick up.

One JSON file per signed-off version, ``<fhir_outbox>/<case>-v<N>.json``: a
transaction ``Bundle`` holding the model bundle as a ``Device``, one
``Observation`` per task (probability, call, threshold) and per finding, one per
finding the laboratory confirmed at sign-off (the diagnosis, each FISH marker, the
karyotype, each mutation; LOINC-coded where LOINC has a code), and the
``DiagnosticReport`` that lists them, with the reviewer as its interpreter and the
report PDF attached. The appliance only writes the file (atomically,
so an interface engine never reads half of one); it sends nothing over a
network. docs/fhir.md has the mapping, element by element. Plain JSON is
written here; the tests validate it with a FHIR library against R4's
published structure definitions.
"""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from appliance.results import (
    DECISION_WORDS,
    CaseResult,
    FindingRecord,
    HeadRecord,
    PredictionRecord,
    ResultError,
    ReviewRecord,
    WrongCaseError,
    check_case,
    find_version,
    read_result,
    unique_name,
)
from runtime.files import write_json_atomic

SYSTEM = "urn:cytoedge"  # the appliance's own identifier and code systems live under it
UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
CALL_CODES = {
    "positive": ("POS", "Positive"),
    "negative": ("NEG", "Negative"),
    "indeterminate": ("IND", "Indeterminate"),
}
# The sign-off decides what the laboratory system is told.
REPORT_STATUS = {"accepted": "final", "sent_for_fish": "preliminary", "rejected": "cancelled"}
# What the laboratory confirmed: (key, words, LOINC code and name, or None where LOINC has
# no code for a finding named in free text: a FISH marker).
CONFIRMED_CODES: dict[str, tuple[str, tuple[str, str] | None]] = {
    "diagnosis": ("Diagnosis", ("29308-4", "Diagnosis")),
    "fish": ("FISH", None),
    "karyotype": ("Karyotype", ("62356-1", "Chromosome analysis result in ISCN expression")),
    "mutation": ("Mutation", ("69548-6", "Genetic variant assessment")),
}
PRESENT = {"system": LOINC, "code": "LA9633-4", "display": "Present"}


class FhirError(ValueError):
    """A result that cannot be sent on (not signed off); one line."""


def fhir_file(fhir_outbox: Path, result: CaseResult) -> Path:
    return fhir_outbox / f"{unique_name(result.case_id)}-v{result.version}.json"


def write_fhir_report(result: CaseResult, folder: Path, fhir_outbox: Path) -> Path:
    """Write the signed-off result in ``folder`` to the FHIR outbox; returns the file."""
    target = fhir_file(fhir_outbox, result)
    write_json_atomic(target, fhir_bundle(result, folder))
    return target


def export_signed_off(target: str, outbox: Path, fhir_outbox: Path) -> Path:
    """``cytoedge fhir TARGET``: a case id, a case folder (its latest version) or a version
    folder, written to the FHIR outbox; FhirError with one line when it cannot be."""
    found = find_version(target, outbox)
    if found is None:
        raise FhirError(f"{target}: no result found (a case id, a case folder or a version)")
    folder, case_id = found
    try:
        result = read_result(folder)
        if case_id is not None:
            check_case(result.case_id, case_id, folder)
    except (ResultError, WrongCaseError) as exc:
        raise FhirError(str(exc)) from None
    return write_fhir_report(result, folder, fhir_outbox)


def fhir_bundle(result: CaseResult, folder: Path) -> dict[str, Any]:
    """The transaction Bundle for one signed-off version (``folder`` holds its report)."""
    review = result.review
    if review is None:
        raise FhirError(
            f"case {result.case_id} version {result.version} is not signed off: "
            "only a reviewed result goes to the laboratory system"
        )
    status = REPORT_STATUS[review.decision]
    observation_status = "cancelled" if status == "cancelled" else status
    device_url = _urn(result, "device")
    entries = [
        _entry(
            device_url,
            _device(result),
            "Device",
            _identifier_query(f"{SYSTEM}:bundle-sha256", result.bundle.sha256),
        )
    ]
    for head in result.heads:
        rows: list[PredictionRecord | FindingRecord] = [*head.predictions, *head.findings]
        for row in rows:
            key = row.task if isinstance(row, PredictionRecord) else row.key
            identifier = f"{result.case_id}/v{result.version}/{head.name}/{key}"
            resource = _observation(result, head, row, identifier, observation_status)
            resource["issued"] = review.signed_at
            resource["device"] = {"reference": device_url}
            entries.append(
                _entry(
                    _urn(result, f"{head.name}/{key}"),
                    resource,
                    "Observation",
                    _identifier_query(f"{SYSTEM}:observation", identifier),
                )
            )
    for key, number, text in _confirmed_rows(review):
        # Three parts where a head's are two: no head's task shares its id.
        part = f"confirmed/{key}/{number}"
        identifier = f"{_result_id(result)}/{part}"
        entries.append(
            _entry(
                _urn(result, part),
                _confirmed_observation(key, text, identifier, review),
                "Observation",
                _identifier_query(f"{SYSTEM}:observation", identifier),
            )
        )
    report = _diagnostic_report(result, review, status, [e["fullUrl"] for e in entries[1:]])
    form = _presented_form(result, folder, review.signed_at)
    if form is not None:
        report["presentedForm"] = [form]
    entries.append(
        _entry(
            _urn(result, "report"),
            report,
            "DiagnosticReport",
            _identifier_query(f"{SYSTEM}:result", _result_id(result)),
        )
    )
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "timestamp": review.signed_at,
        "entry": entries,
    }


def _result_id(result: CaseResult) -> str:
    return f"{result.case_id}/v{result.version}"


def _urn(result: CaseResult, part: str) -> str:
    # The same version always gives the same ids, so a file sent twice is one report.
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{SYSTEM}:{_result_id(result)}:{part}')}"


def _identifier_query(system: str, value: str) -> str:
    """A FHIR search for one identifier, its special characters escaped, URL-encoded."""
    escaped = "".join(f"\\{c}" if c in "\\,$|" else c for c in value)
    return "identifier=" + quote(f"{system}|{escaped}", safe="")


def _entry(url: str, resource: dict[str, Any], kind: str, if_none_exist: str) -> dict[str, Any]:
    return {
        "fullUrl": url,
        "resource": resource,
        "request": {"method": "POST", "url": kind, "ifNoneExist": if_none_exist},
    }


def _probability(value: float) -> dict[str, Any]:
    return {"value": round(float(value), 4), "unit": "probability", "system": UCUM, "code": "1"}


def _interpretation(call: str) -> list[dict[str, Any]]:
    code, display = CALL_CODES[call]
    return [{"coding": [{"system": INTERPRETATION, "code": code, "display": display}]}]


def _device(result: CaseResult) -> dict[str, Any]:
    """The bundle, with the key that signed it (its fingerprint as an identifier)."""
    bundle = result.bundle
    identifiers = [{"system": f"{SYSTEM}:bundle-sha256", "value": bundle.sha256}]
    if bundle.signer is not None:
        identifiers.append(
            {"system": f"{SYSTEM}:bundle-signer-key", "value": bundle.signer.fingerprint}
        )
    note = f"intended use: {bundle.intended_use}; backend: {result.backend}"
    if bundle.signed_words:
        note += f"; {bundle.signed_words}"
    return {
        "resourceType": "Device",
        "identifier": identifiers,
        "deviceName": [{"name": bundle.name, "type": "model-name"}],
        "type": {"text": "cytoedge model bundle"},
        "version": [{"value": bundle.version}],
        "note": [{"text": note}],
    }


def _observation(
    result: CaseResult,
    head: HeadRecord,
    row: PredictionRecord | FindingRecord,
    identifier: str,
    status: str,
) -> dict[str, Any]:
    key = row.task if isinstance(row, PredictionRecord) else row.key
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": f"{SYSTEM}:observation", "value": identifier}],
        "status": status,
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {
            "coding": [{"system": f"{SYSTEM}:task", "code": f"{head.name}/{key}"}],
            "text": row.label,
        },
        "effectiveDateTime": result.created,
    }
    if isinstance(row, PredictionRecord):
        resource["valueQuantity"] = _probability(row.probability)
        resource["interpretation"] = _interpretation(row.call)
        resource["referenceRange"] = [
            {
                "high": _probability(row.threshold),
                "text": f"positive at a probability of {row.threshold:.3f} or more",
            }
        ]
    elif row.call is not None:
        resource["valueCodeableConcept"] = {"text": row.call}
        resource["interpretation"] = _interpretation(row.call)
    elif row.value is not None:
        resource["valueQuantity"] = {"value": round(float(row.value), 4)}
        if row.text:
            resource["note"] = [{"text": row.text}]
    else:
        resource["valueString"] = row.text
    return resource


def _confirmed_rows(review: ReviewRecord) -> list[tuple[str, int, str]]:
    """(key, its number among its kind from 1, the text) of each finding confirmed at
    sign-off, in the record's order."""
    found = review.confirmed
    if found is None:
        return []
    rows = [("diagnosis", 1, found.diagnosis)] if found.diagnosis else []
    rows += [("fish", n, marker) for n, marker in enumerate(found.fish, 1)]
    rows += [("karyotype", 1, found.karyotype)] if found.karyotype else []
    rows += [("mutation", n, mutation) for n, mutation in enumerate(found.mutations, 1)]
    return rows


def _confirmed_observation(
    key: str, text: str, identifier: str, review: ReviewRecord
) -> dict[str, Any]:
    """One finding the laboratory confirmed: the reviewer entered it, so it is final
    whatever was decided about the screen's result, and no Device made it."""
    words, loinc = CONFIRMED_CODES[key]
    coding = [{"system": f"{SYSTEM}:confirmed", "code": key, "display": words}]
    if loinc is not None:
        coding.insert(0, {"system": LOINC, "code": loinc[0], "display": loinc[1]})
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": f"{SYSTEM}:observation", "value": identifier}],
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": coding, "text": f"{words}: {text}"},
        "issued": review.signed_at,
        "performer": [{"display": review.reviewer}],
    }
    if key == "mutation":  # LOINC's answer is whether the variant is there; it is named apart
        resource["valueCodeableConcept"] = {"coding": [PRESENT], "text": "Present"}
        resource["component"] = [
            {
                "code": {
                    "coding": [{"system": f"{SYSTEM}:confirmed", "code": "variant"}],
                    "text": "Variant, as entered",
                },
                "valueString": text,
            }
        ]
    else:
        resource["valueString"] = text
    if key == "fish":
        resource["method"] = {"text": "Fluorescence in situ hybridization (FISH)"}
    return resource


def _diagnostic_report(
    result: CaseResult, review: ReviewRecord, status: str, observations: list[str]
) -> dict[str, Any]:
    conclusion = f"{DECISION_WORDS[review.decision]} by {review.reviewer}"
    if review.reason:
        conclusion += f": {review.reason}"
    if result.abstain_reason:
        conclusion += f". No call was made: {result.abstain_reason}"
    if result.is_demo:
        conclusion += ". DEMO MODEL, NOT FOR DIAGNOSIS"
    if result.bundle.signature_warning:
        conclusion += f". {result.bundle.signature_warning.upper()}"
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [
            {"system": f"{SYSTEM}:result", "value": _result_id(result)},
            {"system": f"{SYSTEM}:case", "value": result.case_id},
        ],
        "status": status,
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "HM",
                        "display": "Hematology",
                    }
                ]
            }
        ],
        "code": {
            "coding": [{"system": f"{SYSTEM}:test", "code": result.bundle.name}],
            "text": f"cytoedge slide screen ({result.bundle.name} {result.bundle.version})",
        },
        "effectiveDateTime": result.created,
        "issued": review.signed_at,
        "performer": [{"display": "cytoedge appliance"}],
        "resultsInterpreter": [{"display": review.reviewer}],
        "conclusion": conclusion,
        "conclusionCode": [{"text": DECISION_WORDS[review.decision]}],
    }
    if observations:  # FHIR has no empty lists: a case without a call lists none
        report["result"] = [{"reference": url} for url in observations]
    return report


def _presented_form(result: CaseResult, folder: Path, signed_at: str) -> dict[str, Any] | None:
    """The report PDF (or, where no PDF was printed, its HTML) as an attachment."""
    outputs = result.outputs
    for name, kind in ((outputs.report_pdf, "application/pdf"), (outputs.report_html, "text/html")):
        path = folder / name if name else None
        if path is not None and path.is_file():
            return {
                "contentType": kind,
                "language": "en",
                "data": base64.b64encode(path.read_bytes()).decode("ascii"),
                "title": f"cytoedge report, case {result.case_id}, version {result.version}",
                "creation": signed_at,
            }
    return None
