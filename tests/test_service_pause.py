"""``cytoedge run`` holds its work, spending no attempt, while its bundle is damaged or
its data disk is full, says so, and resumes by itself; and what it writes for a scored,
signed-off case is readable by its group and nobody else."""

from __future__ import annotations

import ast
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import Config, PathsConfig, RuntimeConfig
from appliance.service.engine import PipelineEngine
from appliance.service.store import DONE, QUEUED, REJECTED, WAITING
from appliance.site.pause_note import read_pause
from cytoedge_demo.synthetic import write_cell_folders
from runtime.bundle_format import load_bundle
from tests.service_harness import ROOT, ServiceProcess, copy_unit, write_config

pytestmark = pytest.mark.slow
# Into the service's user and mount namespace, as the same (unprivileged) user: -t PID.
NSENTER = ("nsenter", "-U", "-m", "--preserve-credentials", "-t")
FINISHED = (DONE, REJECTED)  # the tiny bundle is no good model: a call or a reasoned no-call


@pytest.fixture
def bundle_copy(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """The tiny bundle's files, copied: this test damages them."""
    try:
        tiny = request.getfixturevalue("tiny_bundle")
    except pytest.FixtureLookupError:
        pytest.skip("needs the tiny_bundle fixture (tests/conftest.py)")
    copy = tmp_path / "bundle"
    shutil.copytree(tiny, copy, ignore=shutil.ignore_patterns("engines"))
    return copy


@pytest.fixture
def patients(tmp_path: Path) -> Path:
    """Cell folders (P0001, ...) written outside the inbox."""
    root = tmp_path / "patients"
    write_cell_folders(root, 1, 40, seed=7)
    return root


def cytoedge(config: Path, *args: str) -> str:
    env = {**os.environ, "CYTOEDGE_CONFIG": str(config)}
    done = subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout + done.stderr


def test_a_damaged_bundle_file_holds_the_scan_until_the_file_is_repaired(
    tmp_path: Path, bundle_copy: Path, patients: Path
) -> None:
    config = write_config(tmp_path, bundle_copy, case_quiet_seconds=600.0)
    service = ServiceProcess(config, tmp_path / "data" / "state").start()
    try:
        service.wait_for(lambda: service.read(lambda s: s.service_info()), 60, "the service")
        encoder = bundle_copy / "encoder.onnx"
        intact = encoder.read_bytes()
        encoder.write_bytes(intact[: len(intact) // 2])
        copy_unit(patients / "P0001", tmp_path / "inbox" / "P0001")
        service.wait_for(
            lambda: (s := service.read(lambda st: st.slides())) and s[0].state == QUEUED,
            60,
            "the scan queued",
        )
        state_dir = tmp_path / "data" / "state"
        service.wait_for(lambda: read_pause(state_dir).reason, 30, "the pause note")
        said = (
            "scoring paused: bundle file encoder.onnx does not match its sha256 (damaged); "
            "repair the bundle or choose another with `cytoedge bundle use`"
        )
        assert read_pause(state_dir).reason == said
        status = cytoedge(config, "status")
        assert "encoder.onnx does not match its sha256" in status, status
        doctor = cytoedge(config, "doctor")
        assert "encoder.onnx" in doctor, doctor
        slide = service.read(lambda s: s.slides()[0])
        assert (slide.state, slide.attempts) == (QUEUED, 0)

        encoder.write_bytes(intact)  # repaired: taken up without a restart
        service.wait_for(lambda: service.case_state("P0001") in FINISHED, 180, "scored")
        slide = service.read(lambda s: s.slides()[0])
        assert slide.state in FINISHED and slide.attempts == 1, slide
        assert read_pause(state_dir).reason == ""
        assert "Traceback" not in service.log_text()
        assert service.terminate() == 0
    finally:
        service.ensure_stopped()


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


def _fill(folder: Path) -> Path:
    """Write a file until the disk under ``folder`` is full."""
    ballast = folder / "ballast"
    with open(ballast, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return ballast


@pytest.fixture
def small_data_disk(tmp_path: Path, bundle_copy: Path) -> Iterator[ServiceProcess]:
    """The service with its data directory on a 64 MB tmpfs of its own, in a user and
    mount namespace (no root needed). The test reads that disk's files through
    /proc/PID/root, and the store from inside the namespace (SQLite resolves the
    /proc link to the path outside)."""
    if not _can_mount_tmpfs():
        pytest.skip("user namespaces (unshare -rm) cannot mount a tmpfs here")
    config = write_config(tmp_path, bundle_copy, case_quiet_seconds=600.0)
    data = tmp_path / "data"
    mount = f'mount -t tmpfs -o size=64m tmpfs "{data}" && exec "$@"'
    service = ServiceProcess(config, data / "state")
    service.prefix = ("unshare", "-rm", "sh", "-c", mount, "sh")
    service.start()
    yield service
    service.ensure_stopped()


def _slides_inside(service: ServiceProcess) -> list[tuple[str, int]] | None:
    """(state, attempts) of each slide, then of each case, read in the service's
    namespace; None before its store exists."""
    code = (
        "import sys; from pathlib import Path; "
        "from appliance.service.store import JobStore, StoreError\n"
        "try: store = JobStore(Path(sys.argv[1]), readonly=True)\n"
        "except StoreError: sys.exit(3)\n"
        "print(repr([(s.state, s.attempts) for s in store.slides()]"
        " + [(c.state, c.attempts) for c in store.cases()]))"
    )
    done = subprocess.run(
        [*NSENTER, str(service.pid), sys.executable, "-c", code, str(service.store_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode == 3:
        return None
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.strip())


def test_a_full_data_disk_holds_the_work_and_it_resumes_when_space_returns(
    small_data_disk: ServiceProcess, tmp_path: Path, patients: Path
) -> None:
    service = small_data_disk
    service.wait_for(lambda: _slides_inside(service) is not None, 60, "the service")
    data = Path(f"/proc/{service.pid}/root") / (tmp_path / "data").relative_to("/")
    state_dir = data / "state"
    assert (state_dir / "jobs.sqlite").is_file()  # the tmpfs, seen from here
    ballast = _fill(data)  # the store, the audit trail and the log cannot be written now
    copy_unit(patients / "P0001", tmp_path / "inbox" / "P0001")
    service.wait_for(
        lambda: read_pause(state_dir).reason.startswith("data disk full: 0 MB free"),
        60,
        "the pause note",
    )
    slides = _slides_inside(service) or []
    assert all(state in (WAITING, QUEUED) and attempts == 0 for state, attempts in slides)

    ballast.unlink()  # space returns: the scan is admitted and scored
    service.wait_for(
        lambda: (s := _slides_inside(service)) and len(s) == 2 and s[1][0] in FINISHED,
        180,
        "the case scored",
    )
    slide, _case = _slides_inside(service) or []
    assert slide[0] in FINISHED and slide[1] == 1, slide
    service.wait_for(lambda: read_pause(state_dir).reason == "", 30, "the note cleared")
    assert list((data / "cache" / "spool").glob("*")) == []
    log = service.log_text()
    assert "Traceback" not in log and "Logging error" not in log, log[-3000:]
    assert service.terminate() == 0


def _modes(root: Path) -> dict[str, int]:
    return {
        str(path.relative_to(root)): stat.S_IMODE(path.lstat().st_mode)
        for path in [root, *root.rglob("*")]
        if not path.is_symlink()
    }


def test_what_a_scored_and_signed_off_case_writes_is_the_groups_to_read_and_nobody_elses(
    tmp_path: Path, bundle_copy: Path, patients: Path
) -> None:
    config = write_config(tmp_path, bundle_copy, case_quiet_seconds=600.0)
    service = ServiceProcess(config, tmp_path / "data" / "state").start()
    try:
        copy_unit(patients / "P0001", tmp_path / "inbox" / "P0001")
        service.wait_for(lambda: service.case_state("P0001") in FINISHED, 180, "scored")
        case = service.case("P0001")
        assert case is not None and case.result_dir
        # The window's sign-off, in a process started as `cytoedge gui` starts.
        signed = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; "
                "from runtime.files import restrict_umask; restrict_umask(); "
                "from appliance.review.sign_off import SignOff, sign_off; "
                "from appliance.service.audit import AuditLog; "
                "data = Path(sys.argv[2]); "
                "sign_off(Path(sys.argv[1]), SignOff('accepted', 'Dr R'), data_dir=data, "
                "audit=AuditLog(data / 'state' / 'audit.jsonl'), "
                "fhir_outbox=Path(sys.argv[3]), write_pdf=False)",
                case.result_dir,
                str(tmp_path / "data"),
                str(tmp_path / "fhir-outbox"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert signed.returncode == 0, signed.stderr
        assert service.terminate() == 0
    finally:
        service.ensure_stopped()
    written = {
        "data": _modes(tmp_path / "data"),
        "outbox": _modes(tmp_path / "outbox"),
        "fhir-outbox": _modes(tmp_path / "fhir-outbox"),
    }
    data = written["data"]
    assert any(p.startswith("cache/") for p in data) and "state/jobs.sqlite" in data
    assert "state/audit.jsonl" in data and any(p.startswith("logs/") for p in data)
    assert {"P0001/v1/result.json", "P0001/v2/result.json"} <= set(written["outbox"])
    assert written["fhir-outbox"], "no FHIR bundle written"
    wrong = {
        f"{where}/{path}": oct(mode)
        for where, modes in written.items()
        for path, mode in modes.items()
        if mode & 0o007 or mode & 0o040 == 0  # anyone's, or not the group's to read
    }
    # The folders made here by the test's own harness (write_config) are the test's.
    wrong = {p: m for p, m in wrong.items() if p not in ("data/.", "outbox/.")}
    assert wrong == {}


def test_a_slides_estimate_covers_what_processing_it_writes(
    tmp_path: Path, bundle_copy: Path, patients: Path, small_scan_writer: object
) -> None:
    """The room the service waits for is at least the cache entry plus the spool of
    crops the slide had while it was embedded (a cell folder, and a small smear)."""
    assert callable(small_scan_writer)
    smear = small_scan_writer(tmp_path / "smear.tif", seed=1, size=768)
    config = Config(
        paths=PathsConfig(data_dir=str(tmp_path / "data")),
        runtime=RuntimeConfig(backend="ort-cpu", threads=1),
    )
    bundle = load_bundle(bundle_copy)
    engine = PipelineEngine(config, bundle, config.runtime.settings)
    try:
        for path in (patients / "P0001", Path(smear)):
            needed = engine.space_needed(path)
            outcome = engine.process_slide(path, lambda stage, done: None, use_cache=True)
            entry = outcome.handle.cache_entry
            written = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            spool = outcome.n_cells * bundle.cells.patch_px**2 * 3
            assert outcome.n_cells > 0, path
            assert written + spool <= needed, (path, written, spool, needed)
    finally:
        engine.close()
