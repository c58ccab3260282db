"""The scoring path never loads torch or TensorFlow, and runtime stands alone."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "tensorflow", "timm", "keras")


def modules_loaded_by(import_line: str) -> set[str]:
    code = f"import sys; {import_line}; print('\\n'.join(sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return {name.split(".")[0] for name in result.stdout.split()}


def test_importing_appliance_and_runtime_loads_no_framework() -> None:
    loaded = modules_loaded_by(
        "import appliance, appliance.cli, appliance.doctor, runtime, runtime.probe"
    )
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_scoring_with_the_runtime_loads_no_framework(tmp_path: Path) -> None:
    # Every runtime module imported, and a bundle's encoder and heads actually run.
    from tests.runtime_models import TinyBundle

    TinyBundle(tmp_path).write()
    loaded = modules_loaded_by(
        "import numpy as np, runtime.backends.trt, runtime.backends.cuda, runtime.engines; "
        "from runtime.bundle import load_bundle; from runtime.encoder import Encoder; "
        "from runtime.heads import load_heads; "
        f"b = load_bundle({str(tmp_path / 'bundle')!r}); "
        "e = Encoder(b).embed(np.zeros((2, 32, 32, 3), np.uint8)); "
        "[h.predict(e) for h in load_heads(b).values()]"
    )
    assert "onnxruntime" in loaded
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_no_framework_import_statements_on_the_scoring_path() -> None:
    pattern = re.compile(rf"^\s*(import|from)\s+({'|'.join(HEAVY)})\b", re.MULTILINE)
    offenders = [
        str(path.relative_to(ROOT))
        for part in ("appliance", "runtime", "gui")
        for path in (ROOT / part).rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_runtime_imports_none_of_the_other_parts() -> None:
    pattern = re.compile(
        r"^\s*(import|from)\s+(appliance|export|gui|cytoedge_demo)\b", re.MULTILINE
    )
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "runtime").rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_product_code_imports_no_demo_code() -> None:
    """A clinical site installs cytoedge without cytoedge-demo (demo/): the scoring path
    never reaches it; export reaches only its synthetic cells, the gates' probe images."""
    pattern = re.compile(r"^\s*(?:import|from)\s+(cytoedge_demo[\w.]*)", re.MULTILINE)
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for part in ("appliance", "runtime", "gui", "export")
        for path in (ROOT / part).rglob("*.py")
        for module in pattern.findall(path.read_text(encoding="utf-8"))
        if not (part == "export" and module == "cytoedge_demo.synthetic")
    ]
    assert offenders == []
