"""The job store moves forward across releases without losing or repeating a job.

``fixtures/jobs-schema1.sqlite`` was written by cytoedge 0.1.0's own JobStore
(schema 1, before any migration existed) through its public methods: a case
scored (DONE-1), a slide and case rejected (BLUR), a copy of a scan already held
(COPY, its case queued), a case job running with its pending version noted
(CASE-RUN), a slide job running (SLIDE-RUN), a case of two queued slides
(QUEUED-2) and a queued loose scan (QUEUED-1), then a clean service stop: what a
site's store holds when the software is upgraded with scans in the queue.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.service import migrations
from appliance.service.audit import read_audit
from appliance.service.migrations import SCHEMA_VERSION, backup_path
from appliance.service.service import Service
from appliance.service.store import (
    DONE,
    QUEUED,
    REJECTED,
    RUNNING,
    TERMINAL,
    BundleIdentity,
    JobStore,
    StoreError,
)
from appliance.service.worker import CaseOutcome, ProgressFn, SlideOutcome
from tests.test_service_worker import StandInEngine, make_config, probe, wait_for

FIXTURE = Path(__file__).parent / "fixtures" / "jobs-schema1.sqlite"
BUNDLE = BundleIdentity("site-model", "2.0", "e" * 64)


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "state" / "jobs.sqlite"
    path.parent.mkdir(parents=True)
    shutil.copyfile(FIXTURE, path)
    return path


def connect(path: Path) -> sqlite3.Connection:
    """The fixture is read as an immutable file: reading it must not leave WAL files."""
    if path == FIXTURE:
        return sqlite3.connect(f"{path.as_uri()}?immutable=1", uri=True)
    return sqlite3.connect(path)


def rows(path: Path, table: str) -> list[tuple[object, ...]]:
    conn = connect(path)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
    finally:
        conn.close()


def schema(path: Path) -> dict[str, list[str]]:
    """Each table's and index's columns, as SQLite reports them."""
    conn = connect(path)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master ORDER BY name")]
        return {
            name: [str(c[1:]) for c in conn.execute(f"PRAGMA table_xinfo({name!r})")]
            + [str(i[1:]) for i in conn.execute(f"PRAGMA index_xinfo({name!r})")]
            for name in names
        }
    finally:
        conn.close()


def test_the_fixture_is_a_schema_1_store_with_every_kind_of_row() -> None:
    states = {r[1]: r[2] for r in rows(FIXTURE, "cases")}
    assert states == {
        "DONE-1": DONE,
        "BLUR": REJECTED,
        "COPY": QUEUED,
        "CASE-RUN": RUNNING,
        "SLIDE-RUN": "waiting",
        "QUEUED-2": "waiting",
        "QUEUED-1": "waiting",
    }
    assert [r[6] for r in rows(FIXTURE, "slides")].count(RUNNING) == 1
    assert rows(FIXTURE, "meta") == [("schema_version", "1")]


def test_opening_a_schema_1_store_migrates_it_and_keeps_every_row(old_store: Path) -> None:
    cases_before, slides_before = rows(old_store, "cases"), rows(old_store, "slides")
    store = JobStore(old_store)
    try:
        assert store.migrated_from == 1
        assert store.results(1) == []  # nothing recorded before schema 2
    finally:
        store.close()
    assert rows(old_store, "meta") == [("schema_version", str(SCHEMA_VERSION))]
    assert rows(old_store, "cases") == cases_before
    assert rows(old_store, "slides") == slides_before
    # The store as it was is kept beside it, whole.
    copy = backup_path(old_store, 1)
    assert rows(copy, "meta") == [("schema_version", "1")]
    assert rows(copy, "slides") == slides_before
    # Opening again changes nothing more.
    again = JobStore(old_store)
    assert again.migrated_from is None
    again.close()


def test_an_upgraded_store_has_the_shape_of_a_new_one(old_store: Path, tmp_path: Path) -> None:
    JobStore(old_store).close()
    fresh = tmp_path / "fresh.sqlite"
    JobStore(fresh).close()
    assert schema(old_store) == schema(fresh)


def test_migrations_only_add_so_the_previous_release_still_reads_cases_and_slides(
    old_store: Path,
) -> None:
    before = schema(FIXTURE)
    JobStore(old_store).close()
    after = schema(old_store)
    for table in ("cases", "slides", "service", "meta"):
        assert after[table] == before[table], table


def test_a_reader_reads_a_store_not_yet_migrated_and_one_with_columns_it_does_not_know(
    old_store: Path,
) -> None:
    reader = JobStore(old_store, readonly=True)
    try:
        assert reader.schema_version == 1
        assert {c.case_key for c in reader.cases()} >= {"DONE-1", "CASE-RUN"}
        assert reader.results(1) == []
    finally:
        reader.close()
    assert rows(old_store, "meta") == [("schema_version", "1")]  # a reader never migrates
    JobStore(old_store).close()
    conn = sqlite3.connect(old_store)
    conn.execute("ALTER TABLE cases ADD COLUMN added_later TEXT NOT NULL DEFAULT ''")
    conn.commit()
    conn.close()
    reader = JobStore(old_store, readonly=True)
    try:
        assert reader.case_by_key("DONE-1").result_version == 1  # type: ignore[union-attr]
    finally:
        reader.close()


def test_a_store_from_a_newer_release_is_refused_in_one_line_and_left_alone(
    old_store: Path,
) -> None:
    JobStore(old_store).close()
    conn = sqlite3.connect(old_store)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    before = old_store.read_bytes()
    for readonly in (False, True):
        with pytest.raises(StoreError) as refused:
            JobStore(old_store, readonly=readonly)
        message = str(refused.value)
        assert "newer cytoedge (schema 99" in message and "\n" not in message
    assert old_store.read_bytes() == before


def test_a_migration_that_fails_leaves_the_store_as_it_was(
    old_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = (*migrations.MIGRATIONS, (SCHEMA_VERSION + 1, ("CREATE TABLE results (x)",)))
    monkeypatch.setattr(migrations, "MIGRATIONS", broken)
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="cannot open the job store"):
        JobStore(old_store)
    assert rows(old_store, "meta") == [("schema_version", "1")]
    assert schema(old_store) == schema(FIXTURE)


class RecordingEngine(StandInEngine):
    """Scores without reading the inbox (the fixture's scans are on another machine);
    records each slide it processes and names the bundle in each result."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.processed: list[str] = []

    def process_slide(
        self, path: Path, progress: ProgressFn, *, use_cache: bool, fingerprint: str | None = None
    ) -> SlideOutcome:
        self.processed.append(path.name)
        progress("segmentation", 0.5)
        return SlideOutcome(handle={"path": str(path)}, n_cells=50)

    def score_case(
        self, case_key: str, slides: object, outbox: Path, progress: ProgressFn
    ) -> CaseOutcome:
        outcome = super().score_case(case_key, slides, outbox, progress)  # type: ignore[arg-type]
        return replace(outcome, bundle=BUNDLE)


def test_the_upgraded_service_finishes_every_queued_and_interrupted_job_once(
    old_store: Path, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    engine = RecordingEngine(calls=[])
    service = Service(config, engine, probe=probe, bundle=BUNDLE, backend="stand-in")
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()

    def settled() -> bool:
        store = JobStore(old_store, readonly=True)
        try:
            return all(c.state in TERMINAL for c in store.cases())
        finally:
            store.close()

    try:
        wait_for(settled, timeout=30)
    finally:
        stop.set()
        thread.join(30)
    store = JobStore(old_store, readonly=True)
    try:
        cases = {c.case_key: c for c in store.cases()}
        slides = {Path(s.path).name: s for s in store.slides()}
        results = {key: store.results(case.id) for key, case in cases.items()}
    finally:
        store.close()

    # Finished rows are untouched; every other job ran, once.
    assert (cases["DONE-1"].state, cases["DONE-1"].result_dir) == (DONE, "/site/outbox/DONE-1/v1")
    assert cases["BLUR"].state == REJECTED
    assert cases["COPY"].state == DONE and "same scan as case DONE-1" in cases["COPY"].reason
    for key in ("CASE-RUN", "SLIDE-RUN", "QUEUED-2", "QUEUED-1"):
        assert cases[key].state == DONE and cases[key].result_version == 1, cases[key]
        assert [(r.version, r.bundle_sha256) for r in results[key]] == [(1, BUNDLE.sha256)]
    assert results["DONE-1"] == []  # scored before schema 2: its result.json names its bundle
    assert all(s.state in TERMINAL for s in slides.values())
    # Each slide not finished before the upgrade is processed once; CASE-RUN's slide,
    # finished before, is read back once (from the pipeline's cache) for its case job.
    processed = sorted(engine.processed)
    assert processed == sorted(["SLIDE-RUN.svs", "a.svs", "b.svs", "QUEUED-1.svs", "CASE-RUN.svs"])
    assert sorted(c for c in engine.calls or [] if c.startswith("case:")) == [
        "case:CASE-RUN",
        "case:QUEUED-1",
        "case:QUEUED-2",
        "case:SLIDE-RUN",
    ]
    assert (tmp_path / "outbox" / "CASE-RUN" / "v1" / "result.json").is_file()
    events = read_audit(config.state_dir / "audit.jsonl")
    migrated = [e for e in events if e["event"] == "store_migrated"]
    assert [(e["from_schema"], e["to_schema"]) for e in migrated] == [(1, SCHEMA_VERSION)]
    recovered = sorted((e["kind"], e["state"]) for e in events if e["event"] == "recovered")
    assert recovered == [("case", QUEUED), ("slide", QUEUED)]
    finished = [e for e in events if e["event"] == "finished" and e["kind"] == "case"]
    assert all(e["bundle"]["sha256"] == BUNDLE.sha256 for e in finished if e["version"])
