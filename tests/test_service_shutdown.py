"""SIGTERM ends ``cytoedge run`` through the interpreter's normal exit (atexit
handlers run), after a finished job and in the middle of one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.service.audit import read_audit
from appliance.service.store import DONE, QUEUED, RUNNING
from cytoedge_demo.synthetic import write_cell_folders
from tests.runtime_models import TinyBundle
from tests.service_harness import ServiceProcess, copy_unit, result_versions, write_config

pytestmark = pytest.mark.slow

# Imported by every interpreter the service starts (the PDF printer's too); each
# leaves a marker named by its pid only when it exits normally (never after
# os._exit or a crash).
SITECUSTOMIZE = """\
import atexit, os
from pathlib import Path

_markers = os.environ.get("CYTOEDGE_TEST_EXIT_MARKERS")
if _markers:
    _pid = os.getpid()
    atexit.register(lambda: (Path(_markers) / str(_pid)).write_text("normal exit"))
"""


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return TinyBundle(tmp_path_factory.mktemp("tiny")).write().path


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("patients")
    write_cell_folders(root, 1, 60, seed=21)
    write_cell_folders(root / "big", 1, 400, seed=22)
    return root


@pytest.fixture
def service(
    tmp_path: Path, bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ServiceProcess]:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    (tmp_path / "exits").mkdir()
    monkeypatch.setenv("CYTOEDGE_TEST_EXIT_MARKERS", str(tmp_path / "exits"))
    running = ServiceProcess(write_config(tmp_path, bundle_dir), tmp_path / "data" / "state")
    yield running
    running.ensure_stopped()


def _exited_normally(service: ServiceProcess, tmp_path: Path) -> bool:
    return (tmp_path / "exits" / str(service.pid)).is_file()


def _stopped_cleanly(tmp_path: Path) -> bool:
    events = read_audit(tmp_path / "data" / "state" / "audit.jsonl")
    return [e.get("clean") for e in events if e["event"] == "service_stopped"] == [True]


def test_sigterm_after_a_scored_case_is_a_normal_exit_with_code_0(
    service: ServiceProcess, patients: Path, tmp_path: Path
) -> None:
    service.start()
    copy_unit(patients / "P0001", tmp_path / "inbox" / "P0001")
    service.wait_for(lambda: service.case_state("P0001") == DONE, 90, "the case scored")
    pdf = tmp_path / "outbox" / "P0001" / "v1" / "report.pdf"
    assert pdf.read_bytes().startswith(b"%PDF")  # printed while the worker thread ran
    assert service.terminate() == 0
    assert _exited_normally(service, tmp_path)
    assert _stopped_cleanly(tmp_path)
    log = service.log_text()
    assert "Fatal Python error" not in log and "Traceback" not in log, log


def test_sigterm_during_a_job_abandons_it_exits_normally_and_the_next_start_finishes_it(
    service: ServiceProcess, patients: Path, tmp_path: Path
) -> None:
    service.start()
    copy_unit(patients / "big" / "P0001", tmp_path / "inbox" / "BIG")
    service.wait_for(
        lambda: service.read(lambda s: any(x.state == RUNNING for x in s.slides())),
        60,
        "the job running",
    )
    assert service.terminate() == 0
    assert _exited_normally(service, tmp_path)
    assert _stopped_cleanly(tmp_path)
    slide = service.read(lambda s: s.slides()[0])
    # Finished within the grace period, or abandoned back to the queue uncounted.
    assert (slide.state, slide.attempts) in {(DONE, 1), (QUEUED, 0)}, slide
    service.start()
    service.wait_for(lambda: service.case_state("BIG") == DONE, 90, "the job finished")
    assert result_versions(tmp_path / "outbox", "BIG") == ["v1"]
    assert service.terminate() == 0
    assert _exited_normally(service, tmp_path)
