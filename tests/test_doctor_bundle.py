"""``cytoedge doctor --bundle``: verifies a bundle for real and shows where each network runs."""

from __future__ import annotations

from pathlib import Path

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
