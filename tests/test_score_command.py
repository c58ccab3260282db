"""``cytoedge score`` as a technician's script runs it: exit codes, the table, one-line reasons."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.results import case_folder, latest_version, read_result
from appliance.service.audit import read_audit
from tests.conftest import assert_technician_reason
from tests.runtime_models import TinyBundle

ROOT = Path(__file__).resolve().parents[1]


def cytoedge(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200")
    if config is not None:
        env["CYTOEDGE_CONFIG"] = str(config)
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )


def config_for(bundle: Path, folder: Path) -> Path:
    path = folder / "cytoedge.toml"
    path.write_text(f'[paths]\nbundle = "{bundle}"\n', encoding="utf-8")
    return path


@pytest.mark.slow
def test_a_scan_is_scored_and_a_bad_one_rejected_in_one_run(
    tiny_bundle: Path,
    small_scan_writer: Callable[..., Path],
    tmp_path: Path,
    isolated_data_dir: Path,
) -> None:
    scan = small_scan_writer(tmp_path / "scans dir" / "smear é 1.tif", seed=5)
    empty = tmp_path / "scans dir" / "empty.svs"
    empty.write_bytes(b"")
    done = cytoedge("score", str(scan), str(empty), config=config_for(tiny_bundle, tmp_path))

    assert done.returncode == 1, done.stderr
    rejected = [line for line in done.stderr.splitlines() if line.startswith("cytoedge: rejected")]
    assert len(rejected) == 1 and "empty.svs" in rejected[0] and "empty file" in rejected[0]
    assert "smear é 1" in done.stdout and "rejected" in done.stdout
    case_dir = case_folder(isolated_data_dir / "outbox", "smear é 1")
    assert case_dir.name.startswith("smear_é_1~")  # readable, and its own
    latest = json.loads((case_dir / "latest.json").read_text())
    result_dir = case_dir / latest["path"]
    result = json.loads((result_dir / "result.json").read_text())
    assert result["status"] in ("scored", "abstained")
    assert result["scans"][0]["cells"] > 0
    assert result["bundle"]["intended_use"] == "demo"
    assert (result_dir / "report.html").is_file()


@pytest.mark.slow
def test_scans_given_as_one_case_share_one_result(
    tiny_bundle: Path,
    small_scan_writer: Callable[..., Path],
    tmp_path: Path,
    isolated_data_dir: Path,
) -> None:
    scans = [small_scan_writer(tmp_path / f"s{i}.tif", seed=10 + i) for i in range(2)]
    config = config_for(tiny_bundle, tmp_path)
    done = cytoedge("score", "--case", "patient-9", *map(str, scans), config=config)
    assert done.returncode == 0, done.stderr
    assert "patient-9" in done.stdout
    case_dir = isolated_data_dir / "outbox" / "patient-9"
    result = json.loads((case_dir / "v1" / "result.json").read_text())
    assert [s["slide_id"] for s in result["scans"]] == ["s0", "s1"]
    # the same case again: a new version, from cached embeddings
    again = cytoedge("score", "--case", "patient-9", *map(str, scans), config=config)
    assert again.returncode == 0, again.stderr
    assert json.loads((case_dir / "latest.json").read_text())["version"] == 2


@pytest.mark.slow
def test_case_ids_that_differ_only_in_unsafe_characters_never_share_a_result(
    tiny_bundle: Path,
    small_scan_writer: Callable[..., Path],
    tmp_path: Path,
    isolated_data_dir: Path,
) -> None:
    scan = small_scan_writer(tmp_path / "s.tif", seed=21)
    config = config_for(tiny_bundle, tmp_path)
    for case_id in ("P 001", "P_001", "P/001"):
        done = cytoedge("score", "--case", case_id, str(scan), config=config)
        assert done.returncode == 0, done.stderr
    outbox = isolated_data_dir / "outbox"
    assert len(list(outbox.iterdir())) == 3
    for case_id in ("P 001", "P_001", "P/001"):
        latest = latest_version(outbox, case_id)
        assert latest is not None and latest.version == 1
        assert read_result(latest.path).case_id == case_id
    # Each result is in the audit trail with its files, and the trail is intact.
    records = read_audit(isolated_data_dir / "state" / "audit.jsonl")
    finished = {r["case"]: r for r in records if r["event"] == "finished"}
    assert set(finished) == {"P 001", "P_001", "P/001"}
    assert all(
        r["source"] == "score" and "result.json" in r["result_files"] for r in finished.values()
    )
    verified = cytoedge("audit", "verify", config=config)
    assert verified.returncode == 0 and "intact" in verified.stdout, verified.stdout


def test_without_a_bundle_score_says_so_in_one_line(tmp_path: Path) -> None:
    scan = tmp_path / "a.tif"
    scan.write_bytes(b"II*\x00")
    done = cytoedge("score", str(scan), config=config_for(tmp_path / "no-bundle", tmp_path))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "no usable model bundle" in done.stderr and "cytoedge demo" in done.stderr


def test_a_real_unopenable_tiff_is_one_rejection_line_not_a_traceback(
    openslide_files: Path, tmp_path: Path
) -> None:
    """openslide-python's unopenable.tiff once crashed the TIFF reader when a pixel size
    was configured (the reader's own error message failed)."""
    tiny = TinyBundle(tmp_path / "tiny")
    tiny.write()
    config = tmp_path / "cytoedge.toml"
    config.write_text(
        f'[paths]\nbundle = "{tiny.path}"\n\n[scan]\npixel_size_um = 0.25\n', encoding="utf-8"
    )
    scan = openslide_files / "unopenable.tiff"
    done = cytoedge("score", str(scan), config=config)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    [line] = [line for line in done.stderr.splitlines() if line.startswith("cytoedge:")]
    prefix = f"cytoedge: rejected {scan}: "
    assert line.startswith(prefix), line
    assert_technician_reason(line.removeprefix(prefix))


def test_a_reader_out_of_memory_is_a_rejection_of_that_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from appliance import console
    from appliance.cli import score_command
    from appliance.config import load_config

    bundle = TinyBundle(tmp_path / "tiny").write()

    def out_of_memory(path: Path, *args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(score_command, "process_slide", out_of_memory)
    scan = tmp_path / "big.svs"
    run = score_command.score_inputs(
        [("big", [scan])], bundle, load_config(None), Console(file=io.StringIO())
    )
    assert run.rejected == [(scan, console.OUT_OF_MEMORY)] and run.cases == []
