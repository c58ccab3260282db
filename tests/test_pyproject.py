"""Both distributions' metadata builds without a warning: the first screen a newcomer
sees (``make demo`` installs both) must be clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_METADATA = (
    "import sys, setuptools.build_meta as backend; "
    "backend.prepare_metadata_for_build_wheel(sys.argv[1])"
)


@pytest.mark.parametrize("project", ["pyproject.toml", "demo/pyproject.toml"])
def test_metadata_builds_with_warnings_as_errors(project: str, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(ROOT / project, source / "pyproject.toml")
    (source / "README.md").write_text("readme\n", encoding="utf-8")
    for package in ("appliance", "runtime", "export", "gui", "cytoedge_demo"):
        (source / package).mkdir()
        (source / package / "__init__.py").touch()
    out = tmp_path / "metadata"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", BUILD_METADATA, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
