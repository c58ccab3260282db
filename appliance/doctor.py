"""``cytoedge doctor``: what this machine can run, and whether it can score."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from appliance.config import Config
from runtime.probe import gpu_names, probe_backends

PACKAGES = (
    "cytoedge",
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "openslide-python",
    "openslide-bin",
    "tifffile",
    "Pillow",
    "scikit-image",
    "stardist",
    "watchdog",
    "typer",
    "rich",
    "PySide6-Essentials",
    "torch",
    "timm",
    "tensorflow-cpu",
)
# OpenSlide has no call that lists its formats; these are the vendors its
# documentation names for the 4.x series.
OPENSLIDE_4_FORMATS = (
    "Aperio (.svs)",
    "DICOM WSI",
    "Hamamatsu (.ndpi, .vms, .vmu)",
    "Leica (.scn)",
    "MIRAX (.mrxs)",
    "Philips (.tiff)",
    "Sakura (.svslide)",
    "Trestle (.tif)",
    "Ventana (.bif)",
    "Zeiss (.czi)",
    "generic tiled TIFF",
)


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _openslide_line() -> tuple[bool, str]:
    try:
        import openslide
    except Exception as exc:  # the shared library can be missing or broken
        return False, f"not usable: {exc}"
    version = openslide.__library_version__
    formats = ", ".join(OPENSLIDE_4_FORMATS) if version.startswith("4.") else "see its docs"
    return True, f"library {version}; formats: {formats}"


def _bundle_line(config: Config, explicit: Path | None) -> tuple[bool, str]:
    """(usable, text). A default bundle that was never built is not an error."""
    path = explicit or config.bundle_dir
    configured = explicit is not None or bool(config.paths.bundle)
    if not (path / "bundle.json").is_file():
        if configured:
            return False, f"{path}: no bundle.json"
        return True, f"{path}: not built yet (`cytoedge demo` builds the demo bundle)"
    return True, f"{path}: bundle.json present"


def run_doctor(config: Config, bundle: Path | None = None) -> int:
    """Print the report; return the exit code (0 when the setup can score)."""
    out = Console(soft_wrap=True)
    out.print(f"Python {sys.version.split()[0]} on {platform.platform()}")
    out.print(f"Configuration: {config.source or 'defaults'}; data directory {config.data_dir}")

    versions = Table(title="Packages", show_header=True)
    versions.add_column("package")
    versions.add_column("version")
    for name in PACKAGES:
        versions.add_row(name, _package_version(name))
    out.print(versions)

    backends = Table(title="Inference backends (automatic order)")
    backends.add_column("backend")
    backends.add_column("usable")
    backends.add_column("detail")
    statuses = probe_backends()
    for status in statuses:
        backends.add_row(status.name, "yes" if status.available else "no", status.detail)
    out.print(backends)
    gpus = gpu_names()
    out.print(f"GPU: {', '.join(gpus) if gpus else 'none visible'}")
    chosen = config.runtime.backend
    usable = {s.name for s in statuses if s.available}
    backend_ok = bool(usable) if chosen == "auto" else chosen in usable
    out.print(f"Configured backend: {chosen} ({'usable' if backend_ok else 'NOT usable'})")

    slide_ok, slide_text = _openslide_line()
    out.print(f"OpenSlide: {slide_text}")
    bundle_ok, bundle_text = _bundle_line(config, bundle)
    out.print(f"Bundle: {bundle_text}")

    ok = backend_ok and slide_ok and bundle_ok
    if not ok:
        out.print("[bold red]Cannot score; see above.[/]")
    elif (bundle or config.bundle_dir).joinpath("bundle.json").is_file():
        out.print("[bold green]Ready to score.[/]")
    else:
        out.print("[bold yellow]Ready to score once the demo bundle is built.[/]")
    return 0 if ok else 1
