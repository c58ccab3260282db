"""The audit trail's hash chain: an edited, deleted, moved or copied record is found
and named, so is a result file changed, missing or added; an intact trail passes,
across rotated files and after records from before the chain; two processes writing
at once keep one chain; and ``cytoedge audit verify`` passes after a real scored case
and its sign-off."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli.main import app
from appliance.review.sign_off import SignOff, sign_off
from appliance.service.audit import GENESIS, AuditLog, line_hash, read_audit
from appliance.service.audit_verify import verify_trail
from appliance.service.store import DONE, REJECTED
from tests.service_harness import ROOT, ServiceProcess, copy_unit, write_config

REVIEWER = "Dr Ana Reviewer"


def trail(tmp_path: Path, records: int, **settings: int) -> Path:
    path = tmp_path / "state" / "audit.jsonl"
    audit = AuditLog(path, source="test", **settings)
    for number in range(records):
        audit.record("received", path=f"/inbox/scan-{number}.svs", size=1000 + number)
    return path


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def signed_off_sample(tmp_path: Path) -> tuple[Path, Path]:
    """A sample result signed off: (the audit trail, the signed-off version folder)."""
    from cytoedge_demo.samples import write_sample_result

    written = write_sample_result(tmp_path / "outbox", "MM-7", "mm_positive")
    path = trail(tmp_path, 2)
    done = sign_off(
        written.path, SignOff("accepted", REVIEWER), data_dir=tmp_path,
        audit=AuditLog(path), write_pdf=False,
    )  # fmt: skip
    return path, done.folder.path


def test_each_record_holds_its_number_and_the_hash_of_the_line_before(tmp_path: Path) -> None:
    path = trail(tmp_path, 3)
    raw = lines_of(path)
    records = [json.loads(line) for line in raw]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev_sha256"] == GENESIS
    assert records[1]["prev_sha256"] == line_hash(raw[0])
    assert records[2]["prev_sha256"] == line_hash(raw[1])
    report = verify_trail(path)
    assert report.intact and report.records == 3 and report.last_seq == 3
    assert report.head == line_hash(raw[2])


def test_an_edited_record_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = trail(tmp_path, 5)
    raw = lines_of(path)
    raw[2] = raw[2].replace(b"scan-2.svs", b"scan-9.svs")
    path.write_bytes(b"".join(raw))
    report = verify_trail(path)
    assert report.problems == [
        "audit.jsonl line 3: edited: its bytes no longer match the hash "
        "audit.jsonl line 4 holds of it"
    ]


def test_a_deleted_record_is_named_as_missing_before_the_line_after_it(tmp_path: Path) -> None:
    path = trail(tmp_path, 5)
    raw = lines_of(path)
    path.write_bytes(b"".join(raw[:1] + raw[3:]))  # records 2 and 3 deleted
    assert verify_trail(path).problems == [
        "audit.jsonl line 2: records 2-3 are missing before it (deleted)"
    ]


def test_reordered_and_copied_records_are_named(tmp_path: Path) -> None:
    path = trail(tmp_path, 5)
    raw = lines_of(path)
    path.write_bytes(b"".join([raw[0], raw[2], raw[1], *raw[3:]]))
    assert verify_trail(path).problems == [
        "audit.jsonl line 2: out of order: record 3 comes before record 2 (audit.jsonl line 3)"
    ]
    path.write_bytes(b"".join([*raw, raw[1]]))
    assert verify_trail(path).problems == ["audit.jsonl line 6: a copy of audit.jsonl line 2"]


def test_a_record_without_a_hash_is_accepted_only_before_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit.jsonl"
    path.parent.mkdir()
    old = [{"time": "2025-01-01T00:00:00.000+00:00", "event": "service_started", "pid": n}
           for n in (1, 2)]  # fmt: skip
    path.write_text("".join(json.dumps(record) + "\n" for record in old), encoding="utf-8")
    AuditLog(path).record("service_started", pid=3)
    first = json.loads(lines_of(path)[2])
    assert first["seq"] == 1 and first["prev_sha256"] == line_hash(lines_of(path)[1])
    report = verify_trail(path)
    assert report.intact and report.before_chain == 2 and report.records == 3
    assert "3 records in 1 file(s), 2 from before the chain" in report.summary

    with path.open("a", encoding="utf-8") as handle:  # an old-style line after the chain
        handle.write(json.dumps(old[0]) + "\n")
    AuditLog(path).record("service_stopped")
    assert verify_trail(path).problems == [
        "audit.jsonl line 4: no chain hash after the chain began: added or edited"
    ]


def test_a_line_cut_short_by_a_crash_is_reported_and_the_chain_goes_on(tmp_path: Path) -> None:
    path = trail(tmp_path, 2)
    with path.open("ab") as handle:
        handle.write(b'{"event": "finished", "ca')  # a crash mid-write
    for event in ("service_started", "service_stopped"):
        AuditLog(path).record(event)
    raw = lines_of(path)
    assert raw[2] == b'{"event": "finished", "ca\n'  # ended by the next writer
    assert [r["seq"] for r in read_audit(path)] == [1, 2, 3, 4]
    assert verify_trail(path).problems == [
        "audit.jsonl line 3: not a whole JSON record (cut short or edited)"
    ]
    raw[3] = raw[3].replace(b"service_started", b"service_stopped")  # the chain still holds
    path.write_bytes(b"".join(raw))
    assert verify_trail(path).problems[1:] == [
        "audit.jsonl line 4: edited: its bytes no longer match the hash "
        "audit.jsonl line 5 holds of it"
    ]


def test_rotated_files_keep_one_chain_and_a_missing_file_is_named(tmp_path: Path) -> None:
    path = trail(tmp_path, 40, max_bytes=1500)
    files = sorted(p.name for p in path.parent.iterdir())
    assert len(files) >= 4 and files[-1] == "audit.jsonl"
    assert files[:3] == ["audit-000001.jsonl", "audit-000002.jsonl", "audit-000003.jsonl"]
    assert all((path.parent / name).stat().st_size < 1500 + 400 for name in files)
    # The first record of a file chains to the last line of the one before it.
    last = lines_of(path.parent / "audit-000001.jsonl")[-1]
    assert json.loads(lines_of(path.parent / "audit-000002.jsonl")[0])["prev_sha256"] == (
        line_hash(last)
    )
    report = verify_trail(path)
    assert report.intact and report.records == 40 and report.files == len(files)
    assert [r["seq"] for r in read_audit(path)] == list(range(1, 41))

    second = path.parent / "audit-000002.jsonl"
    gone = [json.loads(line)["seq"] for line in lines_of(second)]
    second.unlink()
    assert verify_trail(path).problems == [
        f"audit-000002.jsonl: missing (the trail's files are numbered 1 to {len(files) - 1})",
        f"audit-000003.jsonl line 1: records {gone[0]}-{gone[-1]} are missing before it "
        "(deleted, or a file)",
    ]


def test_a_sign_off_hashes_every_file_of_its_version_and_verify_checks_them(
    tmp_path: Path,
) -> None:
    path, version = signed_off_sample(tmp_path)
    (record,) = [r for r in read_audit(path) if r["event"] == "signed_off"]
    files = sorted(p.relative_to(version).as_posix() for p in version.rglob("*") if p.is_file())
    assert sorted(record["result_files"]) == files and "result.json" in files
    report = verify_trail(path)
    assert report.intact and report.versions == 1 and report.result_files == len(files)

    changed, removed = version / "report.html", version / files[-1]
    changed.write_bytes(changed.read_bytes() + b"<!-- edited -->")
    removed.unlink()
    (version / "extra.png").write_bytes(b"not written by cytoedge")
    assert verify_trail(path).problems == [
        f"{changed}: changed since audit.jsonl line 3 recorded it",
        f"{removed}: missing (recorded in audit.jsonl line 3)",
        f"{version / 'extra.png'}: added after audit.jsonl line 3 recorded the folder",
    ]


def test_cytoedge_audit_verify_exits_0_only_when_intact(tmp_path: Path) -> None:
    env = {"CYTOEDGE_DATA": str(tmp_path)}
    path = trail(tmp_path, 3)
    done = CliRunner().invoke(app, ["audit", "verify"], env=env)
    assert done.exit_code == 0, done.output
    assert done.stdout.splitlines() == [verify_trail(path).summary]
    assert done.stdout.startswith(f"audit trail {path}: intact: 3 records")

    raw = lines_of(path)
    path.write_bytes(raw[0] + raw[2])
    done = CliRunner().invoke(app, ["audit", "verify"], env=env)
    assert done.exit_code == 1
    assert done.stdout.splitlines() == [
        "audit.jsonl line 2: record 2 is missing before it (deleted)",
        f"audit trail {path}: 1 problem(s): 2 records in 1 file(s); 0 result files in "
        f"0 versions checked; last record 3, sha256 {line_hash(raw[2])}",
    ]


def append_records(path: str, writer: str, count: int, start: object) -> None:
    audit = AuditLog(Path(path), max_bytes=20_000, source=writer)
    start.wait(60)  # type: ignore[attr-defined]  # both write from the same moment
    for number in range(count):
        audit.record("received", writer=writer, number=number)


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit.jsonl"
    path.parent.mkdir()
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    writers = [
        context.Process(target=append_records, args=(str(path), name, 300, start))
        for name in ("service", "window")
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0
    records = read_audit(path)
    assert [r["seq"] for r in records] == list(range(1, 601))
    for name in ("service", "window"):
        assert [r["number"] for r in records if r["writer"] == name] == list(range(300))
    report = verify_trail(path)
    assert report.intact and report.records == 600 and report.files > 2, report.problems


@pytest.mark.slow
def test_audit_verify_passes_after_a_scored_case_and_its_sign_off(
    tiny_bundle: Path, small_scan_writer, tmp_path: Path
) -> None:
    config = write_config(tmp_path, tiny_bundle)
    service = ServiceProcess(config, tmp_path / "data" / "state").start()
    try:
        small_scan_writer(tmp_path / "smear.tif", seed=4, size=768)
        copy_unit(tmp_path / "smear.tif", tmp_path / "inbox" / "smear.tif")
        service.wait_for(lambda: service.case_state("smear") in (DONE, REJECTED), 240, "scored")
        case = service.case("smear")
        assert case is not None and case.result_dir
        done = sign_off(
            Path(case.result_dir), SignOff("sent_for_fish", REVIEWER),
            data_dir=tmp_path / "data",
            audit=AuditLog(tmp_path / "data" / "state" / "audit.jsonl", source="window"),
        )  # fmt: skip
        assert service.terminate() == 0
    finally:
        service.ensure_stopped()
    events = read_audit(tmp_path / "data" / "state" / "audit.jsonl")
    (finished,) = [e for e in events if e["event"] == "finished" and e["kind"] == "case"]
    (signed,) = [e for e in events if e["event"] == "signed_off"]
    assert finished["result_dir"] == case.result_dir and "result.json" in finished["result_files"]
    assert signed["result_dir"] == str(done.folder.path) and "result.json" in signed["result_files"]

    verify = [sys.executable, "-m", "appliance", "audit", "verify"]
    env = {**os.environ, "CYTOEDGE_CONFIG": str(config)}
    ran = subprocess.run(verify, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    (summary,) = ran.stdout.splitlines()
    assert f": intact: {len(events)} records in 1 file(s); " in summary
    assert " in 2 versions checked" in summary

    thumbnail = next(Path(case.result_dir).rglob("thumbnail.png"))
    thumbnail.write_bytes(thumbnail.read_bytes()[:-10])  # v2 shares it: a hard link
    ran = subprocess.run(verify, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 1
    assert ran.stdout.splitlines()[0] == (
        f"{thumbnail}: changed since audit.jsonl line {events.index(finished) + 1} recorded it"
    )
