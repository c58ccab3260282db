"""``cytoedge doctor``: what this machine can run, and whether it can score."""

from __future__ import annotations

import importlib.metadata
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from appliance.config import Config
from appliance.site.backend_check import (
    REFERENCE,
    SelfTestReport,
    run_self_test,
    site_settings,
    write_record,
)
from appliance.site.bundle_trust import NOT_TRUSTED, Trust, TrustError, check_folder
from appliance.site.pace import measure_pace
from appliance.site.pause_note import read_pause
from appliance.site.permissions import open_paths
from appliance.site.self_test import choice_table, measure_paths
from runtime.backends import (
    Backend,
    BackendError,
    Fallback,
    ModelVariants,
    RuntimeSettings,
    open_model,
    plan_backends,
    probe_backends,
)
from runtime.bundle_format import Bundle, BundleError, load_bundle
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


@dataclass(frozen=True)
class NetworkCheck:
    """One network of a bundle on this machine: where it runs, or why it cannot."""

    label: str
    backend: str  # "" when no backend could run it
    variant: str
    fallbacks: tuple[Fallback, ...]  # better backends skipped, and why
    problem: str = ""  # why it cannot be used; "" when it loaded and ran a test input


def bundle_networks(bundle: Bundle) -> list[tuple[str, Path | ModelVariants]]:
    """Every network of a bundle, labelled as doctor shows it."""
    networks: list[tuple[str, Path | ModelVariants]] = [("encoder", bundle.encoder_variants())]
    if (segmenter := bundle.segmenter_variants()) is not None:
        networks.append(("segmenter", segmenter))
    if bundle.patient_encoder is not None:
        networks.append(("patient encoder", bundle.patient_encoder.model_variants(bundle.path)))
    networks += [
        (f"head {head.name} [{k}]", bundle.file(rel))
        for head in bundle.heads
        for k, rel in enumerate(head.files)
    ]
    return networks


def check_networks(bundle: Bundle, settings: RuntimeSettings) -> list[NetworkCheck]:
    """Load each network as scoring would (no engine builds: a stale TensorRT engine is a
    skip with its reason) and run it once on a small input; every output must be finite."""
    settings = replace(settings, build_engines=False)
    side = _test_side(bundle)
    checks = []
    # The checks say what the per-model log lines would; keep the console to them.
    backend_log = logging.getLogger("runtime.backends")
    level = backend_log.level
    backend_log.setLevel(logging.WARNING)
    try:
        for label, model in bundle_networks(bundle):
            try:
                loaded = open_model(model, settings, engine_dir=bundle.engines_dir)
            except BackendError as exc:
                checks.append(NetworkCheck(label, "", "-", (), str(exc)))
                continue
            try:
                outputs = loaded.run(_test_feeds(loaded, side))
                finite = all(np.isfinite(np.asarray(v, np.float64)).all() for v in outputs.values())
                problem = "" if finite else "gives non-finite outputs on a test input"
            except BackendError as exc:
                problem = f"cannot run a test input: {exc}"
            finally:
                loaded.close()
            checks.append(
                NetworkCheck(label, loaded.name, loaded.variant, tuple(loaded.fallbacks), problem)
            )
    finally:
        backend_log.setLevel(level)
    return checks


def _test_side(bundle: Bundle) -> int:
    """Height and width for a network whose image size is free (the segmenter): the
    smallest multiple of its div_by of at least 64 px."""
    step = math.lcm(*bundle.segmenter.div_by) if bundle.segmenter else 1
    return step * math.ceil(64 / step)


def _test_feeds(model: Backend, side: int) -> dict[str, np.ndarray]:
    """A seeded input of each input's shape: two rows, ``side`` for free image axes."""
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in model.inputs:
        shape = [
            dim if isinstance(dim, int) else (2 if axis == 0 else side)
            for axis, dim in enumerate(spec.shape)
        ]
        feeds[spec.name] = rng.normal(0.0, 1.0, shape).astype(spec.dtype)
    return feeds


def _bundle_check(
    config: Config, explicit: Path | None, out: Console, skipped_up_front: set[str]
) -> tuple[bool, bool, Bundle | None]:
    """Verify the bundle and load and run each of its networks as scoring would.

    Returns (usable, built, the bundle when it verified). A default bundle that was
    never built is not an error.
    """
    path = explicit or config.bundle_dir
    configured = explicit is not None or bool(config.paths.bundle)
    if not (path / "bundle.json").is_file():
        if configured:
            out.print(f"Bundle: {path}: no bundle.json")
            return False, False, None
        out.print(
            f"Bundle: {path}: none installed yet (`cytoedge bundle install FILE`; "
            "`cytoedge demo` builds the demo bundle)"
        )
        return True, False, None
    try:
        bundle = load_bundle(path)
    except BundleError as exc:
        out.print(f"Bundle: [bold red]refused[/]: {exc}")
        return False, True, None
    out.print(
        f"Bundle: {path}: {bundle.name} {bundle.version}, intended use {bundle.intended_use}, "
        f"{len(bundle.files)} files verified (sha256), bundle sha256 {bundle.sha256[:12]}"
    )
    if bundle.is_demo:
        out.print("[bold yellow]Demo model, not for diagnosis.[/]")
    trusted = _signature(config, bundle, out)
    if not bundle.heads:
        out.print(
            "[bold red]No heads[/]: this bundle embeds cells but scores nothing; "
            f"train its heads with `cytoedge train CASES --bundle {path}`"
        )
    served = _triton_server(config, bundle, out)
    models = Table(title="Bundle networks on this machine")
    for column in ("network", "runs on", "variant", "skipped (reason above unless given)"):
        models.add_column(column)
    checks = check_networks(
        bundle, site_settings(config.runtime.settings, config.state_dir, bundle)
    )
    for check in checks:
        skipped = "; ".join(
            f.backend if f.backend in skipped_up_front else str(f) for f in check.fallbacks
        )
        if check.problem:
            runs_on = f"[red]{check.backend or 'none'}[/]"
            skipped = "; ".join(filter(None, (skipped, check.problem)))
        else:
            runs_on = check.backend
        models.add_row(check.label, runs_on, check.variant, skipped or "-")
    out.print(models)
    out.print(f"Encoder int8: {bundle.encoder.int8_note or 'no note'}")
    if bundle.segmenter is not None:
        out.print(f"Segmenter int8: {bundle.segmenter.int8_note or 'no note'}")
    if (patient := bundle.patient_encoder) is not None:
        out.print(f"Patient encoder fp16: {patient.fp16_note or 'no note'}")
        out.print(f"Patient encoder int8: {patient.int8_note or 'no note'}")
    usable = not any(check.problem for check in checks) and bool(bundle.heads) and trusted
    return usable and served, True, bundle


def _triton_server(config: Config, bundle: Bundle, out: Console) -> bool:
    """With ``backend = "triton"``: the server, its round trip, and per network the
    versions it serves and whether one is this bundle's. False when the server cannot
    run this bundle and the workstation may not fall back to its own backends."""
    if config.runtime.backend != "triton":
        return True
    from runtime.backends.triton import LOCAL, check_server

    remote = config.runtime.triton
    report = check_server(bundle, remote)
    for line in report.lines:
        out.print(f"Triton: {escape(line)}")
    if report.ok:
        return True
    if remote.fallback == LOCAL:
        out.print("Triton: [bold yellow]the networks run on this workstation[/] (fallback local)")
        return True
    out.print("Triton: [bold red]cannot score this bundle on the server[/]")
    return False


def _signature(config: Config, bundle: Bundle, out: Console) -> bool:
    """Print who signed the bundle, checked again against today's trusted keys, revocations
    and policy; False when the policy requires a signature this bundle lacks."""
    try:
        trust = Trust.of(config)
    except TrustError as exc:
        out.print(f"Signature: [bold red]{escape(str(exc))}[/]")
        return False
    verdict = check_folder(bundle, trust)
    if verdict.signer is not None:
        out.print(f"Signature: signed by {escape(str(verdict.signer))}")
        return True
    if trust.policy == "off":
        out.print("Signature: not checked (bundles.policy = off)")
        return True
    colour = "red" if trust.policy == "require" else "yellow"
    out.print(
        f"Signature: [bold {colour}]{NOT_TRUSTED}[/] ({escape(verdict.reason)}; "
        f"bundles.policy = {trust.policy})"
    )
    return trust.policy != "require"


def _gpu_self_test(config: Config, bundle: Bundle | None, out: Console) -> bool:
    """Run the GPU self-test and print it; True when nothing broke a limit."""
    if not gpu_names():
        out.print("GPU self-test: no GPU visible on this machine; nothing to compare it with.")
        return True
    if bundle is None:
        out.print("GPU self-test: [bold red]needs a bundle that verifies[/] (see above).")
        return False
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=out
    ) as bars:
        task = bars.add_task("GPU self-test", total=1.0)
        report = run_self_test(
            bundle,
            config.runtime.settings,
            progress=lambda stage, done: bars.update(task, description=stage, completed=done),
        )
    out.print(self_test_table(report))
    record = write_record(config.state_dir, bundle, report)
    if report.avoid:
        out.print(
            f"[bold red]Not used for this bundle here: {', '.join(report.avoid)}[/] "
            f"(kept in {record}; the service and `cytoedge score` skip them)"
        )
    out.print(f"GPU self-test: {'passed' if report.passed else '[bold red]FAILED[/]'}")
    return report.passed


def self_test_table(report: SelfTestReport) -> Table:
    """Each network on each backend against the reference: names whole, one measure a
    line, the speed under the verdict, so that it reads at 80 columns."""
    table = Table(
        title=f"GPU self-test against {REFERENCE} (fp32), same inputs",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=0,
    )
    table.add_column("network", no_wrap=True)
    table.add_column("backend", no_wrap=True)
    table.add_column("parity, speed")
    table.add_column("measured (limit)", overflow="fold")
    for row in report.measurements:
        if row.passed is None:
            table.add_row(row.network, row.backend, "not loaded", row.detail)
            continue
        measured = "\n".join(
            f"{key} {_figure(value)} ({row.limits[key]})"
            if key in row.limits
            else f"{key} {_figure(value)}"
            for key, value in row.metrics.items()
        )
        verdict = "[green]pass[/]" if row.passed else "[bold red]FAIL[/]"
        table.add_row(
            row.network,
            f"{row.backend} {row.variant}",
            f"{verdict}\n{row.seconds_per_unit:.3g} s/{row.unit}",
            measured,
        )
    return table


def _figure(value: float) -> str:
    return f"{value:.0f}" if value == int(value) and abs(value) >= 1 else f"{value:.6g}"


# A pause note older than this is left from a service that is not running.
PAUSE_NOTE_FRESH_S = 30.0


def _service_hold(config: Config, out: Console) -> bool:
    """What the running service says holds its work (a damaged bundle, a full disk)."""
    pause = read_pause(config.state_dir)
    if not pause.reason or time.time() - pause.at > PAUSE_NOTE_FRESH_S:
        return True
    out.print(f"[bold red]Service:[/] {escape(pause.reason)}")
    return False


def _open_data(config: Config, out: Console) -> None:
    """Paths with patient data that anyone on the machine may read or write."""
    outboxes = (config.outbox, config.fhir_outbox)
    elsewhere = [p for p in outboxes if not p.is_relative_to(config.data_dir)]
    found = open_paths([config.data_dir, *elsewhere])
    scope = "" if found.complete else f" (the first {found.checked} paths; not all in time)"
    if not found.paths:
        out.print(f"Data permissions: nothing readable or writable by anyone{scope}")
        return
    out.print(
        f"[bold yellow]Data permissions: readable or writable by anyone{scope}; patient "
        "data must not be (chmod -R o-rwx, or run install.sh again):[/]"
    )
    for path, mode in found.paths:
        out.print(f"  {oct(mode)[2:].zfill(4)} {escape(str(path))}")


def _self_test(config: Config, bundle: Bundle | None, out: Console) -> bool:
    """Measure every path of the encoder and segmenter here and keep the fastest that
    passed its gate (appliance.site.self_test); True when each network has one."""
    if bundle is None:
        out.print("Self-test: [bold red]needs a bundle that verifies[/] (see above).")
        return False
    report, choices, record = measure_paths(bundle, config.runtime.settings, config.state_dir, out)
    out.print(choice_table(report, choices))
    for choice in choices:
        out.print(f"{choice.network}: {choice.backend} at {choice.precision}")
    out.print(f"Kept in {record}; the service and `cytoedge score` use it.")
    return len(choices) == len({m.network for m in report.measurements})


def run_doctor(
    config: Config,
    bundle: Path | None = None,
    gpu_self_test: bool = False,
    self_test: bool = False,
) -> int:
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
    bundle_ok, bundle_built, loaded = _bundle_check(config, bundle, out, up_front)
    if bundle_ok and loaded is not None:
        settings = site_settings(config.runtime.settings, config.state_dir, loaded)
        out.print(measure_pace(loaded, settings).sentence())
    self_test_ok = _gpu_self_test(config, loaded, out) if gpu_self_test else True
    held_ok = _service_hold(config, out)
    _open_data(config, out)
    if self_test:
        self_test_ok = _self_test(config, loaded, out) and self_test_ok

    ok = backend_ok and slide_ok and bundle_ok and self_test_ok and held_ok
    if not ok:
        out.print("[bold red]Cannot score; see above.[/]")
    elif bundle_built:
        out.print("[bold green]Ready to score.[/]")
    else:
        out.print("[bold yellow]Ready to score once a bundle is installed.[/]")
    return 0 if ok else 1
