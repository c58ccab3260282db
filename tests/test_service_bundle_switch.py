"""A bundle switched while the service runs is taken up between jobs, never in one, and
the audit trail and the store say which bundle scored which case."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.config import Config, PathsConfig, RuntimeConfig
from appliance.results import read_result
from appliance.service.audit import read_audit
from appliance.service.follow import BundleFollower
from appliance.service.store import DONE, RUNNING, BundleIdentity, JobStore
from appliance.service.worker import CaseOutcome, ProgressFn
from appliance.site.installed_bundles import install_archive, use_version
from cytoedge_demo.synthetic import write_cell_folders
from runtime.bundle_archive import pack_bundle
from tests.runtime_models import TinyBundle
from tests.service_harness import ROOT, ServiceProcess, copy_unit, write_config
from tests.test_bundle_install import WARN
from tests.test_service_worker import Running, StandInEngine, make_config, wait_for

OLD = BundleIdentity("site-model", "1.0", "1" * 64)
NEW = BundleIdentity("site-model", "2.0", "2" * 64)


class TaggedEngine(StandInEngine):
    """A stand-in engine whose results name its bundle."""

    def __init__(self, bundle: BundleIdentity, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.bundle = bundle

    def score_case(
        self, case_key: str, slides: object, outbox: Path, progress: ProgressFn
    ) -> CaseOutcome:
        outcome = super().score_case(case_key, slides, outbox, progress)  # type: ignore[arg-type]
        return replace(outcome, bundle=self.bundle)


def no_problems(bundle: object) -> list[str]:
    return []


def test_a_switch_is_taken_up_between_jobs_and_recorded(tmp_path: Path) -> None:
    old = TaggedEngine(OLD, slide_delay=2.0, calls=[])
    new = TaggedEngine(NEW, calls=[])
    switch = threading.Event()
    offered: list[bool] = []

    def follow(progress: ProgressFn) -> tuple[TaggedEngine, BundleIdentity] | None:
        if switch.is_set() and not offered:
            offered.append(True)
            return new, NEW
        return None

    config = make_config(tmp_path)
    running = Running(config, old, bundle=OLD, follow=follow)  # type: ignore[arg-type]
    try:
        (tmp_path / "inbox" / "first.svs").write_bytes(b"x" * 500)

        def first_running() -> bool:
            store = running.store
            try:
                return any(s.state == RUNNING for s in store.slides())
            finally:
                store.close()

        wait_for(first_running)
        switch.set()  # mid-job: the slide in progress must end on the old bundle
        wait_for(lambda: _case_state(running, "first") == DONE, timeout=30)
        (tmp_path / "inbox" / "second.svs").write_bytes(b"y" * 500)
        wait_for(lambda: _case_state(running, "second") == DONE, timeout=30)
    finally:
        running.halt()

    assert old.calls == ["slide:first.svs"]  # the job in progress finished on the old engine
    # The first case was scored after the switch: its slide embedded again by the new one.
    assert new.calls == ["slide:first.svs", "case:first", "slide:second.svs", "case:second"]
    assert old.closed_on and set(old.closed_on) <= old.job_threads  # closed on the worker
    events = read_audit(config.state_dir / "audit.jsonl")
    switched = [e for e in events if e["event"] == "bundle_switched"]
    assert len(switched) == 1
    assert switched[0]["previous"]["version"] == "1.0" and switched[0]["bundle"]["version"] == "2.0"
    finished = {
        (e["kind"], Path(e.get("path", e.get("case", ""))).stem): e["bundle"]["version"]
        for e in events
        if e["event"] == "finished"
    }
    assert finished == {
        ("slide", "first"): "1.0",
        ("case", "first"): "2.0",
        ("slide", "second"): "2.0",
        ("case", "second"): "2.0",
    }
    store = JobStore(config.state_dir / "jobs.sqlite", readonly=True)
    try:
        results = {c.case_key: store.results(c.id) for c in store.cases()}
        service_row = store.service_info()
    finally:
        store.close()
    assert {k: [(r.version, r.bundle_version) for r in v] for k, v in results.items()} == {
        "first": [(1, "2.0")],
        "second": [(1, "2.0")],
    }
    assert service_row is not None and service_row.bundle == "site-model 2.0"


def _case_state(running: Running, key: str) -> str | None:
    store = running.store
    try:
        case = store.case_by_key(key)
        return case.state if case else None
    finally:
        store.close()


def test_the_follower_takes_up_a_switched_link_and_refuses_a_broken_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "data" / "bundles"
    for version in ("1.0", "2.0"):
        made = TinyBundle(tmp_path / version).write(version=version)
        install_archive(pack_bundle(made.path, tmp_path), root, no_problems, WARN)
    use_version(root, "1.0", no_problems, WARN)
    config = Config(
        paths=PathsConfig(data_dir=str(tmp_path / "data")),
        runtime=RuntimeConfig(measure_on_start=False),
    )
    follower = BundleFollower(config, lambda bundle, settings: bundle)  # type: ignore[arg-type,return-value]
    _, bundle = follower.open()
    assert bundle.version == "1.0"
    assert follower(lambda s, f: None) is None  # nothing changed
    use_version(root, "2.0", no_problems, WARN)
    switched = follower(lambda s, f: None)
    assert switched is not None and switched[1].version == "2.0"
    # A link moved by hand to a folder that does not verify: refused once, old kept.
    broken = root / "tiny-1.0" / "encoder.onnx"
    broken.write_bytes(broken.read_bytes()[:-1] + b"\0")
    os.replace(_link(root, "tiny-1.0"), root / "current")
    with caplog.at_level(logging.ERROR):
        assert follower(lambda s, f: None) is None
        assert follower(lambda s, f: None) is None
    refusals = [r for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(refusals) == 1


def _link(root: Path, target: str) -> Path:
    link = root / ".manual"
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    return link


@pytest.mark.slow
def test_bundle_install_while_the_service_scores(tmp_path: Path) -> None:
    """The real thing: `cytoedge bundle install` beside a running `cytoedge run`."""
    archives = {}
    for version in ("1.0", "2.0"):
        made = TinyBundle(tmp_path / "made" / version).write(version=version)
        archives[version] = pack_bundle(made.path, tmp_path / "made")
    current = tmp_path / "data" / "bundles" / "current"
    install_archive(archives["1.0"], current.parent, no_problems, WARN)
    config = write_config(tmp_path, current)
    patients = tmp_path / "patients"
    write_cell_folders(patients, 2, 60, seed=31)
    write_cell_folders(patients / "big", 1, 400, seed=32)
    service = ServiceProcess(config, tmp_path / "data" / "state").start()
    try:
        copy_unit(patients / "P0001", tmp_path / "inbox" / "P0001")
        service.wait_for(lambda: service.case_state("P0001") == DONE, 90, "P0001 scored")
        copy_unit(patients / "big" / "P0001", tmp_path / "inbox" / "BIG")
        # Usually caught running (the in-process test above makes sure of mid-job
        # switches); the assertions below hold either way.
        service.wait_for(
            lambda: service.read(
                lambda s: any(x.state in (RUNNING, DONE) and "BIG" in x.path for x in s.slides())
            ),
            60,
            "BIG's slide started",
        )
        installed = subprocess.run(
            [sys.executable, "-m", "appliance", "bundle", "install", str(archives["2.0"])],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env={**os.environ, "CYTOEDGE_CONFIG": str(config)},
        )
        assert installed.returncode == 0, installed.stderr
        service.wait_for(lambda: service.case_state("BIG") == DONE, 120, "BIG scored")
        copy_unit(patients / "P0002", tmp_path / "inbox" / "P0002")
        service.wait_for(lambda: service.case_state("P0002") == DONE, 90, "P0002 scored")
        assert service.terminate() == 0
    finally:
        service.ensure_stopped()
    outbox = tmp_path / "outbox"
    versions = {
        key: read_result(outbox / key / "v1").bundle.version for key in ("P0001", "BIG", "P0002")
    }
    assert versions["P0001"] == "1.0" and versions["P0002"] == "2.0"
    events = read_audit(tmp_path / "data" / "state" / "audit.jsonl")
    assert [e["bundle"]["version"] for e in events if e["event"] == "bundle_switched"] == ["2.0"]
    by_case = {
        e["case"]: e["bundle"]["version"]
        for e in events
        if e["event"] == "finished" and e["kind"] == "case"
    }
    assert by_case == versions  # the audit trail names the bundle each result names
    big_slide = next(
        e
        for e in events
        if e["event"] == "finished" and e["kind"] == "slide" and "BIG" in e["path"]
    )
    assert big_slide["bundle"]["version"] == "1.0"  # in progress at the switch: ended on 1.0
