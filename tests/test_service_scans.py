"""``cytoedge run`` on slide scan files with the tiny bundle (segmenter included):
a TIFF written slowly in chunks, and a case folder of two slides."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.service.store import DONE, REJECTED, WAITING
from tests.service_harness import ServiceProcess, result_versions, write_config

pytestmark = pytest.mark.slow
# Scored, or rejected with a result saying why (the tiny bundle is no good model).
FINISHED = (DONE, REJECTED)


def shared_fixture(request: pytest.FixtureRequest, name: str) -> object:
    """The scoring tests' shared fixture, or a skip while a checkout has none."""
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        pytest.skip(f"needs the {name} fixture (tests/conftest.py)")


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """Small smears, written outside the inbox (the generator adds truth files)."""
    writer = shared_fixture(request, "small_scan_writer")
    assert callable(writer)
    root = tmp_path_factory.mktemp("scans")
    writer(root / "smear-1.tif", seed=1)
    for seed in (2, 3):  # smaller: the case test processes two
        writer(root / f"small-{seed}.tif", seed=seed, size=768)
    return root


@pytest.fixture
def service(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServiceProcess]:
    bundle = shared_fixture(request, "tiny_bundle")
    assert isinstance(bundle, Path)
    config = write_config(tmp_path, bundle, quiet_seconds=2.0, case_quiet_seconds=600.0)
    running = ServiceProcess(config, tmp_path / "data" / "state")
    yield running
    running.ensure_stopped()


def test_a_scan_file_written_in_chunks_over_15_s_is_scored_once_after_it_is_complete(
    service: ServiceProcess, scans: Path, tmp_path: Path
) -> None:
    service.start()
    data = (scans / "smear-1.tif").read_bytes()
    target = tmp_path / "inbox" / "slow.tif"
    chunks = 30
    step = -(-len(data) // chunks)
    with open(target, "wb") as out:
        for i in range(chunks):  # 30 chunks, 0.5 s apart: quiet never reached
            out.write(data[i * step : (i + 1) * step])
            out.flush()
            time.sleep(0.5)
            slides = service.read(lambda s: s.slides()) or []
            assert all(s.state == WAITING and s.started_at is None for s in slides), slides
    completed_at = time.time()
    service.wait_for(lambda: service.case_state("slow") in FINISHED, 180, "the scan scored")
    slide = service.read(lambda s: s.slides()[0])
    assert slide.started_at > completed_at and slide.attempts == 1
    assert slide.state in FINISHED and slide.n_cells is not None, slide
    assert slide.size == len(data)
    time.sleep(3.0)
    assert result_versions(tmp_path / "outbox", "slow") == ["v1"]
    result = json.loads((tmp_path / "outbox" / "slow" / "v1" / "result.json").read_text())
    assert result["scans"][0]["sha256"] == hashlib.sha256(data).hexdigest() == slide.fingerprint
    assert service.terminate() == 0


def test_a_case_folder_of_two_slides_is_scored_as_one_case_on_ready(
    service: ServiceProcess, scans: Path, tmp_path: Path
) -> None:
    service.start()
    case = tmp_path / "inbox" / "PATIENT-1"
    case.mkdir()
    for name in ("small-2.tif", "small-3.tif"):
        shutil.copyfile(scans / name, case / name)

    def both_processed() -> bool:
        states = service.read(lambda s: [x.state for x in s.slides()]) or []
        return len(states) == 2 and all(x in FINISHED for x in states)

    service.wait_for(both_processed, 240, "both slides processed")
    assert service.case_state("PATIENT-1") == WAITING, "no .ready, quiet period not over"
    (case / ".ready").write_bytes(b"")
    service.wait_for(lambda: service.case_state("PATIENT-1") in FINISHED, 60, "the case scored")
    assert result_versions(tmp_path / "outbox", "PATIENT-1") == ["v1"]
    result = json.loads((tmp_path / "outbox" / "PATIENT-1" / "v1" / "result.json").read_text())
    assert len(result["scans"]) == 2
    assert service.terminate() == 0
