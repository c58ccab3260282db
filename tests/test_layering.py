"""The scoring path never loads torch or TensorFlow, and runtime stands alone."""

from __future__ import annotations

import ast
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
        "import appliance, appliance.cli.main, appliance.site.doctor, runtime, runtime.probe"
    )
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_scoring_with_the_runtime_loads_no_framework(tmp_path: Path) -> None:
    # Every runtime module imported, and a bundle's encoder and heads actually run.
    from tests.runtime_models import TinyBundle

    TinyBundle(tmp_path).write()
    loaded = modules_loaded_by(
        "import numpy as np, runtime.backends.trt, runtime.backends.cuda, runtime.engines; "
        "from runtime.bundle_format import load_bundle; from runtime.encoder import Encoder; "
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


# Packages from the bottom up: a module may import its own package and the layers below
# it, never one beside or above (docs/DESIGN.md, "The shape of the code", draws this).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("runtime",),
    ("appliance.readers", "appliance.results"),
    ("appliance.config", "appliance.logs", "appliance.console"),
    ("appliance.pipeline",),
    ("appliance.site",),
    ("appliance.service",),
    ("appliance.review", "appliance.validation"),
    ("appliance.cli",),
    ("appliance.__main__",),
    ("export", "gui"),
    ("cytoedge_demo",),
)
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}


def package_of(module: str) -> str | None:
    """The LAYERS entry a dotted module name belongs to (None: not the project's)."""
    parts = module.split(".")
    for n in (2, 1):
        if ".".join(parts[:n]) in RANK:
            return ".".join(parts[:n])
    return None


def project_modules() -> dict[str, Path]:
    modules = {}
    for top in ("runtime", "appliance", "export", "gui"):
        for path in (ROOT / top).rglob("*.py"):
            modules[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    for path in (ROOT / "demo" / "cytoedge_demo").rglob("*.py"):
        modules[".".join(path.relative_to(ROOT / "demo").with_suffix("").parts)] = path
    return modules


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names, lazy ones inside functions too."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_every_package_of_the_project_has_its_layer() -> None:
    unplaced = sorted(
        module
        for module in project_modules()
        if package_of(module) is None and module not in ("appliance.__init__", "appliance")
    )
    assert unplaced == [], f"add these to LAYERS: {unplaced}"


def test_imports_only_point_down() -> None:
    """No upward and no sideways import between packages: appliance reaches neither
    export nor gui, export and gui not each other, and no product code the demo."""
    offenders = []
    for module, path in project_modules().items():
        source = package_of(module)
        if source is None:
            continue
        for name in imported_modules(path):
            target = package_of(name)
            if target is not None and target != source and RANK[target] >= RANK[source]:
                offenders.append(f"{path.relative_to(ROOT)}: {source} -> {target} ({name})")
    assert offenders == [], "\n".join(sorted(set(offenders)))
