"""The service times the CPU paths itself before its first job with a bundle
(``[runtime] measure_on_start``): the follower measures, keeps the choice and opens
the networks on it; a measurement that fails costs nothing but the choice; a real
``cytoedge run`` scores its first case on the path it measured."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from appliance.config import Config, PathsConfig, RuntimeConfig
from appliance.service import follow
from appliance.service.audit import read_audit
from appliance.service.follow import BundleFollower
from appliance.service.store import DONE, REJECTED
from appliance.site import measured_choice
from appliance.site.backend_check import Measurement
from appliance.site.measured_choice import (
    choose,
    preferred_paths,
    record_path,
    recorded_choices,
    write_choice,
)
from cytoedge_demo.bench.pipeline import score_one
from cytoedge_demo.synthetic import write_cell_folders
from runtime.backends import RuntimeSettings
from runtime.bundle_format import Bundle, load_bundle
from runtime.probe import CpuInfo
from tests.service_harness import ServiceProcess, copy_unit, write_config
from tests.test_service_worker import Running, StandInEngine, case_state, versions, wait_for


@pytest.fixture(scope="module")
def tiny(tiny_bundle: Path) -> Bundle:
    return load_bundle(tiny_bundle)


def follower_over(tiny: Bundle, data: Path, opened: list[RuntimeSettings]) -> BundleFollower:
    config = Config(paths=PathsConfig(data_dir=str(data), bundle=str(tiny.path)))

    def open_engine(bundle: Bundle, settings: RuntimeSettings) -> StandInEngine:
        opened.append(settings)
        return StandInEngine()

    follower = BundleFollower(config, open_engine)  # type: ignore[arg-type]
    follower.open()
    return follower


def test_the_first_job_measures_keeps_the_choice_and_reopens_on_it(
    tiny: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[RuntimeSettings] = []
    state = tmp_path / "data" / "state"
    follower = follower_over(tiny, tmp_path / "data", opened)
    assert opened[0].prefer == ()  # nothing measured yet: the fixed order
    stages: list[str] = []
    switched = follower(lambda stage, fraction: stages.append(stage))
    assert switched is not None and switched[1].sha256 == tiny.sha256
    choices = recorded_choices(state, tiny)
    assert {c.network for c in choices} == {"encoder", "segmenter"}
    assert opened[-1].prefer == preferred_paths(state, tiny) != ()
    assert "encoder on ort-cpu" in stages and "segmenter on ort-cpu" in stages
    assert follower(lambda stage, fraction: stages.append("again")) is None  # once
    # The next start opens on the kept choice and measures nothing.
    again = follower_over(tiny, tmp_path / "data", opened)
    assert opened[-1].prefer == preferred_paths(state, tiny)
    assert again(lambda stage, fraction: stages.append("again")) is None
    assert "again" not in stages
    # Another CPU: the record no longer holds, and the next start measures again.
    real = measured_choice.cpu_info()
    monkeypatch.setattr(measured_choice, "cpu_info", lambda: CpuInfo("Another CPU", real.flags))
    moved = follower_over(tiny, tmp_path / "data", opened)
    assert opened[-1].prefer == ()
    assert moved(lambda stage, fraction: stages.append(stage)) is not None
    assert json.loads(record_path(state, tiny).read_text())["key"]["cpu"] == "Another CPU"


def test_it_is_off_with_the_switch_and_under_a_configured_backend(
    tiny: Bundle, tmp_path: Path
) -> None:
    for runtime in (RuntimeConfig(measure_on_start=False), RuntimeConfig(backend="ort-cpu")):
        data = tmp_path / runtime.backend
        config = Config(
            paths=PathsConfig(data_dir=str(data), bundle=str(tiny.path)), runtime=runtime
        )
        follower = BundleFollower(config, lambda b, s: StandInEngine())  # type: ignore[arg-type]
        follower.open()
        assert follower(lambda stage, fraction: None) is None
        assert not record_path(config.state_dir, tiny).exists()


def test_a_measurement_that_fails_leaves_the_job_scored_in_the_fixed_order(
    tiny: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("the backend crashed while timing")

    monkeypatch.setattr(follow, "measure", broken)
    for name in ("inbox", "outbox"):
        (tmp_path / name).mkdir()
    opened: list[RuntimeSettings] = []
    follower = follower_over(tiny, tmp_path / "data", opened)
    config = Config(
        paths=PathsConfig(
            data_dir=str(tmp_path / "data"),
            inbox=str(tmp_path / "inbox"),
            outbox=str(tmp_path / "outbox"),
            bundle=str(tiny.path),
        ),
    )
    running = Running(config, StandInEngine(), follow=follower)
    try:
        with caplog.at_level(logging.ERROR, logger="appliance.service.follow"):
            (tmp_path / "inbox" / "S1.svs").write_bytes(b"x" * 5000)
            wait_for(lambda: case_state(running, "S1") == DONE)
    finally:
        running.halt()
    assert versions(tmp_path / "outbox", "S1") == ["v1"]
    assert [s.prefer for s in opened] == [()]  # never reopened: the fixed order ran it
    failed = [r for r in caplog.records if "measuring the CPU paths failed" in r.getMessage()]
    assert failed and "the backend crashed while timing" in str(failed[0].exc_info[1])
    assert not record_path(config.state_dir, tiny).exists()


@pytest.mark.slow
def test_a_real_service_measures_before_its_first_case_and_scores_it_on_the_choice(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    write_cell_folders(tmp_path / "patients", 1, 40, seed=7)
    config = write_config(
        tmp_path, tiny_bundle, backend="auto", measure_on_start=True, case_quiet_seconds=1.0
    )
    state = tmp_path / "data" / "state"
    service = ServiceProcess(config, state).start()
    try:
        copy_unit(tmp_path / "patients" / "P0001", tmp_path / "inbox" / "P0001")
        service.wait_for(
            lambda: service.case_state("P0001") in (DONE, REJECTED), 240, "the case scored"
        )
        slide = service.read(lambda s: s.slides()[0])
        assert service.terminate() == 0
    finally:
        service.ensure_stopped()
    record = json.loads(record_path(state, load_bundle(tiny_bundle)).read_text())
    assert record["created"] < slide.started_at  # measured before the first job began
    encoder = next(c for c in record["choices"] if c["network"] == "encoder")
    assert slide.state == DONE, service.log_text()
    # The slide's cells were embedded on the chosen path (the case's heads are not
    # part of the choice: the result's own backend is theirs).
    finished = [r for r in read_audit(state / "audit.jsonl") if r["event"] == "finished"]
    assert next(r for r in finished if r["kind"] == "slide")["backend"] == encoder["backend"]
    (version,) = sorted((tmp_path / "outbox" / "P0001").glob("v*/result.json"))
    assert json.loads(version.read_text())["scans"][0]["encoder_variant"] == encoder["precision"]
    assert "timing the encoder and the segmenter" in service.log_text()


def test_bench_pipeline_runs_each_network_on_the_measured_choice_and_names_it(
    tiny: Bundle, tmp_path: Path, small_scan_writer: object
) -> None:
    """The choice differs from the fixed order on both networks (whose first is
    ``ort-cpu``): openvino for each, kept as ``doctor --self-test`` keeps it."""
    pytest.importorskip("openvino")
    assert callable(small_scan_writer)
    slide = small_scan_writer(tmp_path / "smear.tif", seed=1, size=768)
    timed = [
        Measurement(network, "openvino", "fp32", True, seconds_per_unit=0.01, unit="cell")
        for network in ("encoder", "segmenter")
    ]
    state = tmp_path / "state"
    write_choice(state, tiny, choose(tiny, timed), timed)
    fixed = score_one(Path(slide), tiny.path, "auto", 1)
    chosen = score_one(Path(slide), tiny.path, "auto", 1, state_dir=state)
    assert fixed["encoder"].startswith("ort-cpu ") and fixed["segmenter"].startswith("ort-cpu ")
    assert (chosen["encoder"], chosen["segmenter"]) == ("openvino fp32", "openvino fp32")
