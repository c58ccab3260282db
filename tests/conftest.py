"""Shared fixtures: every test gets its own data directory, never the user's."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# With TensorFlow 2.21 already loaded, importing torch's compiler stack (triton)
# segfaults; the other order is fine. The suite trains StarDist and exports ViTs
# in one process, so torch, when installed, is loaded first.
with contextlib.suppress(ImportError):
    import torch._dynamo  # noqa: F401
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def isolated_data_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    data = tmp_path_factory.mktemp("data")
    monkeypatch.setenv("CYTOEDGE_DATA", str(data))
    monkeypatch.delenv("CYTOEDGE_CONFIG", raising=False)
    return data
