"""Shared fixtures and checks: every test gets its own data directory, never the user's."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# With TensorFlow 2.21 already loaded, importing torch's compiler stack (triton)
# segfaults; the other order is fine. The suite trains StarDist and exports ViTs
# in one process, so torch, when installed, is loaded first.
with contextlib.suppress(ImportError):
    import torch._dynamo  # noqa: F401
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# What a reason must never hold: exception class names, "Error:"-style text, reprs,
# library names or their messages.
INTERNAL_TEXT = re.compile(
    r"\w*(Error|Exception)\b|\.error\b|Errno|Traceback|<\w|\bNone\b"
    r"|libdicom|tifffile|Pillow|imagecodecs|TIFFRGBA|zlib|OpenSlide"
)


def assert_technician_reason(reason: str) -> None:
    """One line, a plain sentence, no internal text."""
    assert reason == " ".join(reason.split()), reason
    assert not INTERNAL_TEXT.search(reason), reason
    assert reason[0].isalpha() and len(reason.split()) >= 5 and len(reason) < 240, reason


@pytest.fixture(autouse=True)
def isolated_data_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    data = tmp_path_factory.mktemp("data")
    monkeypatch.setenv("CYTOEDGE_DATA", str(data))
    monkeypatch.delenv("CYTOEDGE_CONFIG", raising=False)
    return data


@pytest.fixture(scope="session")
def tiny_bundle() -> Path:
    """Path of a small, honestly built bundle (tests/fixtures/tiny_bundle.py); cached."""
    from tests.fixtures.tiny_bundle import missing_build_dependencies, tiny_bundle_path

    missing = missing_build_dependencies()
    if missing:
        pytest.skip(f"building the tiny bundle needs {', '.join(missing)} (the export extra)")
    return tiny_bundle_path()


@pytest.fixture(scope="session")
def small_scan_writer() -> object:
    """``write_small_scan(path, seed=0, size=1024, variant="good") -> Path``."""
    from tests.fixtures.tiny_bundle import write_small_scan

    return write_small_scan


@pytest.fixture(scope="session")
def openslide_files() -> Path:
    """openslide-python's real test slides, good and broken (tests/fixtures/openslide_files.py)."""
    from tests.fixtures.openslide_files import FOLDER, present

    if not FOLDER.is_dir():
        pytest.skip(f"openslide-python's test files are not in {FOLDER}: run `make testdata`")
    if not present():
        pytest.fail(f"{FOLDER} does not hold the pinned files: remove it and run `make testdata`")
    return FOLDER


@pytest.fixture(scope="session")
def current_reference() -> object:
    """A stain reference as the demo builder derives one for a bundle written now (fields
    of many densities, intensities relative to each field's glass)."""
    import numpy as np

    from appliance.pipeline import stain
    from cytoedge_demo.synthetic import SmearSpec, render_field

    images = [
        render_field(SmearSpec(width=800, height=800, seed=60 + i, nucleated_per_mm2=d)).image
        for i, d in enumerate(np.linspace(300.0, 3600.0, 16))
    ]
    return stain.derive_reference(images, tile_px=400, relative_to_glass=True)
