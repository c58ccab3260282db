"""``cytoedge gui --with-service`` as a real process (offscreen) stopped by a signal, as a
desktop logout (SIGTERM) or a closed terminal (SIGHUP) stops it: the window closes and
the service in it stops the way ``cytoedge run`` stops, so the store says it stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("PySide6")

from appliance.service.audit import read_audit
from appliance.service.store import TERMINAL
from cytoedge_demo.synthetic import write_cell_folders
from tests.runtime_models import TinyBundle
from tests.service_harness import ROOT, ServiceProcess, copy_unit, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return TinyBundle(tmp_path_factory.mktemp("tiny")).write().path


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("patients")
    write_cell_folders(root, 1, 40, seed=31)
    return root


@pytest.fixture
def window(tmp_path: Path, bundle_dir: Path) -> Iterator[ServiceProcess]:
    config = write_config(tmp_path, bundle_dir)
    running = ServiceProcess(config, tmp_path / "data" / "state", ("gui", "--with-service"))
    yield running
    running.ensure_stopped()


def status(config: Path) -> str:
    env = {**os.environ, "CYTOEDGE_CONFIG": str(config)}
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "status"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout + done.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_stops_the_window_and_its_service_cleanly(
    window: ServiceProcess, patients: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    window.start()
    copy_unit(patients / "P0001", tmp_path / "inbox" / "P0001")
    # The service in the window works: it takes the scan and finishes its case.
    window.wait_for(lambda: window.case_state("P0001") in TERMINAL, 90, "the case finished")
    time.sleep(1.0)  # the window idle in Qt's event loop, as on a desktop
    assert "service: running" in status(window.config)
    assert window.proc is not None
    window.proc.send_signal(signum)
    assert window.proc.wait(60) == 0, window.log_text()
    service = window.read(lambda s: s.service_info())
    assert service is not None and service.stopped_at is not None, window.log_text()
    said = status(window.config)
    assert "service: stopped" in said and "did not stop cleanly" not in said, said
    events = read_audit(tmp_path / "data" / "state" / "audit.jsonl")
    assert [e.get("clean") for e in events if e["event"] == "service_stopped"] == [True]
    log = window.log_text()
    assert "Traceback" not in log and "Fatal Python error" not in log, log
