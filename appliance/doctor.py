"""``cytoedge doctor``: what this machine can run, and whether it can score."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import sys
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from appliance.config import Config
from runtime.backends import BackendError, open_model, plan_backends, probe_backends
from runtime.bundle import BundleError, load_bundle
from runtime.probe import gpu_names

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
    return True, f"library {openslide.__library_version__}"


def _formats_table() -> Table:
    """What the inbox and `cytoedge score` accept: the readers' own table."""
    # Here, not at the top: the readers load OpenSlide, whose library may be missing.
    from appliance.readers.formats import FORMATS

    table = Table(title="Scan formats accepted (inbox and cytoedge score)")
    for column in ("format", "extensions", "read with", "layout"):
        table.add_column(column)
    for fmt in FORMATS:
        table.add_row(
            fmt.name,
            " ".join(fmt.extensions),
            " then ".join(fmt.readers),
            fmt.layout.description,
        )
    return table


def _bundle_check(
    config: Config, explicit: Path | None, out: Console, skipped_up_front: set[str]
) -> tuple[bool, bool]:
    """Verify the bundle and load each of its networks as scoring would.

    Returns (usable, built). A default bundle that was never built is not an error.
    """
    path = explicit or config.bundle_dir
    configured = explicit is not None or bool(config.paths.bundle)
    if not (path / "bundle.json").is_file():
        if configured:
            out.print(f"Bundle: {path}: no bundle.json")
            return False, False
        out.print(f"Bundle: {path}: not built yet (`cytoedge demo` builds the demo bundle)")
        return True, False
    try:
        bundle = load_bundle(path)
    except BundleError as exc:
        out.print(f"Bundle: [bold red]refused[/]: {exc}")
        return False, True
    out.print(
        f"Bundle: {path}: {bundle.name} {bundle.version}, intended use {bundle.intended_use}, "
        f"{len(bundle.files)} files verified (sha256), bundle sha256 {bundle.sha256[:12]}"
    )
    if bundle.is_demo:
        out.print("[bold yellow]Demo model, not for diagnosis.[/]")
    if not bundle.heads:
        out.print(
            "[bold red]No heads[/]: this bundle embeds cells but scores nothing; "
            f"train its heads with `cytoedge train CASES --bundle {path}`"
        )
    models = Table(title="Bundle networks on this machine")
    for column in ("network", "runs on", "variant", "skipped (reason above unless given)"):
        models.add_column(column)
    ok = True
    settings = replace(config.runtime.settings, build_engines=False)
    # The table says what the per-model log lines would; keep the console to the table.
    backend_log = logging.getLogger("runtime.backends")
    level = backend_log.level
    backend_log.setLevel(logging.WARNING)
    networks = [("encoder", bundle.encoder_variants())] + [
        (f"head {head.name} [{k}]", bundle.file(rel))
        for head in bundle.heads
        for k, rel in enumerate(head.files)
    ]
    for label, model in networks:
        try:
            # No engine builds here: a stale TensorRT engine shows as a skip with its reason.
            loaded = open_model(model, settings, engine_dir=bundle.engines_dir)
        except BackendError as exc:
            models.add_row(label, "[red]none[/]", "-", str(exc))
            ok = False
            continue
        skipped = "; ".join(
            f.backend if f.backend in skipped_up_front else str(f) for f in loaded.fallbacks
        )
        models.add_row(label, loaded.name, loaded.variant, skipped or "-")
        loaded.close()
    backend_log.setLevel(level)
    out.print(models)
    out.print(f"Encoder int8: {bundle.encoder.int8_note or 'no note'}")
    return ok and bool(bundle.heads), True


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
    candidates, skipped = plan_backends(chosen)
    backend_ok = bool(candidates)
    out.print(f"Configured backend: {chosen} ({'usable' if backend_ok else 'NOT usable'})")
    if candidates:
        out.print(f"Would run on: {candidates[0]} (tried in order: {', '.join(candidates)})")
    for fallback in skipped:
        out.print(f"  skipped {fallback.backend}: {fallback.reason}")

    slide_ok, slide_text = _openslide_line()
    out.print(f"OpenSlide: {slide_text}")
    if slide_ok:
        out.print(_formats_table())
    up_front = {fallback.backend for fallback in skipped}
    bundle_ok, bundle_built = _bundle_check(config, bundle, out, up_front)

    ok = backend_ok and slide_ok and bundle_ok
    if not ok:
        out.print("[bold red]Cannot score; see above.[/]")
    elif bundle_built:
        out.print("[bold green]Ready to score.[/]")
    else:
        out.print("[bold yellow]Ready to score once the demo bundle is built.[/]")
    return 0 if ok else 1
