"""``cytoedge doctor --bundle``: verifies a bundle for real and shows where each network runs."""

from __future__ import annotations

from pathlib import Path

from appliance.site.pause_note import PauseNote
from tests.runtime_models import TinyBundle
from tests.test_cli import cytoedge


def test_doctor_verifies_a_bundle_and_shows_backends(tmp_path: Path) -> None:
    made = TinyBundle(tmp_path, with_int8=True)
    made.write()
    result = cytoedge("doctor", "--bundle", str(made.path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tiny 1.0, intended use demo, 7 files verified (sha256)" in result.stdout
    assert "Demo model, not for diagnosis." in result.stdout
    assert "Would run on: ort-cpu" in result.stdout
    assert "skipped tensorrt: tensorrt is not installed" in result.stdout
    encoder_row = next(line for line in result.stdout.splitlines() if "encoder" in line)
    assert "ort-cpu" in encoder_row and "int8" in encoder_row
    assert result.stdout.count("head mm_risk") == 2 and result.stdout.count("head pb_screen") == 3
    assert "Ready to score." in result.stdout


def test_doctor_refuses_a_tampered_bundle_naming_the_file(tmp_path: Path) -> None:
    made = TinyBundle(tmp_path)
    made.write()
    target = made.path / "heads" / "pb_screen.2.onnx"
    target.write_bytes(target.read_bytes()[:-1] + b"\x00")
    result = cytoedge("doctor", "--bundle", str(made.path))
    assert result.returncode == 1
    assert "heads/pb_screen.2.onnx: sha256 does not match" in result.stdout
    assert "Cannot score" in result.stdout


def test_doctor_lists_data_anyone_may_read_or_write_and_what_holds_the_service(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    made = TinyBundle(tmp_path / "model")
    made.write()
    (data / "outbox" / "C-1" / "v1").mkdir(parents=True, mode=0o750)
    private = data / "outbox" / "C-1" / "v1" / "result.json"
    private.write_text("{}")
    private.chmod(0o640)
    world = data / "outbox" / "C-1" / "v1" / "report.html"
    world.write_text("<html>")
    world.chmod(0o644)
    shared = data / "state"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    for folder in (data, data / "outbox", data / "outbox" / "C-1"):
        folder.chmod(0o750)
    PauseNote(shared).say("data disk full: 3 MB free, needs about 45 MB")
    (shared / "paused").chmod(0o640)
    config = tmp_path / "cytoedge.toml"
    config.write_text(f'[paths]\ndata_dir = "{data}"\n')
    env = {"CYTOEDGE_CONFIG": str(config)}
    result = cytoedge("doctor", "--bundle", str(made.path), env=env)
    lines = result.stdout.splitlines()
    assert f"  0644 {world}" in lines and f"  0777 {shared}" in lines, result.stdout
    assert not any(str(private) in line for line in lines)
    assert "Service: data disk full: 3 MB free, needs about 45 MB" in result.stdout
    assert result.returncode == 1 and "Cannot score" in result.stdout

    world.chmod(0o640)
    shared.chmod(0o2770)
    PauseNote(shared).say("")
    result = cytoedge("doctor", "--bundle", str(made.path), env=env)
    assert "Data permissions: nothing readable or writable by anyone" in result.stdout
    assert result.returncode == 0, result.stdout
