"""The one command-line entry point, ``cytoedge``.

This module is the composition root: it is the only place in ``appliance``
that reaches ``export``, ``gui`` and ``bench``, and only through their own
Typer groups, which import torch, TensorFlow or Qt inside the commands, never
at module level (tests/test_layering.py holds that line).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from appliance.config import Config, ConfigError, load_config
from appliance.logs import setup_logging
from bench.cli import bench_app
from export.cli import export_app

NOT_AVAILABLE_EXIT = 2
app = typer.Typer(
    name="cytoedge",
    help="Offline hematology slide scoring: watch an inbox, score scans, explain results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(export_app, name="export")
app.add_typer(bench_app, name="bench")
log = logging.getLogger("cytoedge")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML configuration file (default: $CYTOEDGE_CONFIG).",
        envvar="CYTOEDGE_CONFIG",
        show_envvar=False,
        dir_okay=False,
    ),
]


def fail(message: str, code: int = NOT_AVAILABLE_EXIT) -> typer.Exit:
    """Print one line on stderr and return the Exit to raise."""
    sys.stderr.write(f"cytoedge: {message}\n")
    return typer.Exit(code)


def setup(config_path: Path | None, *, log_to_file: bool = True) -> Config:
    """Load the configuration and start logging; a bad file exits 2 with one line."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    try:
        config.ensure_dirs()
    except OSError as exc:
        raise fail(f"cannot create the data directories: {exc}") from None
    setup_logging(
        config.log_dir if log_to_file else None,
        config.logging.level,
        config.logging.max_bytes,
        config.logging.backups,
    )
    return config


def not_available(what: str, issue: str) -> typer.Exit:
    return fail(f"{what} is not available yet ({issue}).")


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the service: watch the inbox, score each complete scan once."""
    from appliance.service.commands import run_service

    raise typer.Exit(run_service(setup(config)))


@app.command()
def status(
    limit: Annotated[int, typer.Option(help="Show at most this many recent cases.")] = 50,
    config: ConfigOption = None,
) -> None:
    """Print the service's queue: cases and their slides, most recent first."""
    from rich.console import Console

    from appliance.service.commands import print_status

    raise typer.Exit(print_status(setup(config, log_to_file=False), limit, Console()))


@app.command()
def rescore(
    targets: Annotated[
        list[str], typer.Argument(help="Scan paths in the inbox, case folders or case ids.")
    ],
    config: ConfigOption = None,
) -> None:
    """Score scans or cases again (caches bypassed); the running service picks them up."""
    from rich.console import Console

    from appliance.service.commands import request_rescore

    raise typer.Exit(request_rescore(setup(config, log_to_file=False), targets, Console()))


@app.command()
def score(
    files: Annotated[list[Path], typer.Argument(help="Scan files or single-cell folders.")],
    case: Annotated[str | None, typer.Option(help="Score all FILES as one case.")] = None,
    config: ConfigOption = None,
) -> None:
    """Score one or more scans now and print the result.

    Each FILE is a case of its own unless --case groups them. Exit 0 when every
    case was scored or abstained; 1 with one line per rejected input; 2 when
    no usable model bundle is configured.
    """
    from rich.console import Console

    from appliance.score_cli import print_table, score_inputs
    from runtime.bundle import BundleError, load_bundle

    cfg = setup(config)
    try:
        bundle = load_bundle(cfg.bundle_dir)
    except BundleError as exc:
        raise fail(
            f"no usable model bundle ({exc}); `cytoedge demo` builds the demo bundle"
        ) from None
    groups = [(case, files)] if case else [(path.stem or path.name, [path]) for path in files]
    console = Console(stderr=True)
    run = score_inputs(groups, bundle, cfg, console)
    print_table(run, Console())
    for path, reason in run.rejected:
        sys.stderr.write(f"cytoedge: rejected {path}: {reason}\n")
    if run.rejected:
        raise typer.Exit(1)


@app.command()
def gui(
    with_service: Annotated[
        bool, typer.Option("--with-service", help="Also run the service in this process.")
    ] = False,
    screenshots: Annotated[
        Path | None,
        typer.Option(
            help="Render the window over sample data to PNG files in this folder, then exit.",
            file_okay=False,
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Open the technician's window."""
    try:
        from gui.app import render_screenshots, run_window
    except ImportError as exc:
        raise fail(f"the window needs PySide6: pip install 'cytoedge[gui]' ({exc})") from None
    if screenshots is not None:
        for path in render_screenshots(screenshots):
            typer.echo(path)
        return
    cfg = setup(config)
    service = None
    if with_service:
        try:
            from appliance.service.commands import build_service
        except ImportError:
            raise fail(
                "this build cannot run the service inside the window; run `cytoedge run` beside it"
            ) from None
        try:
            service = build_service(cfg)
        except (ValueError, RuntimeError) as exc:
            raise fail(str(exc)) from None
    raise typer.Exit(run_window(cfg, service))


@app.command()
def demo(
    rebuild: Annotated[bool, typer.Option(help="Build the demo bundle again.")] = False,
    config: ConfigOption = None,
) -> None:
    """Build the demo bundle and demo scans (once), then score them."""
    import importlib.util

    cfg = setup(config)
    missing = [m for m in ("torch", "timm", "tensorflow") if importlib.util.find_spec(m) is None]
    if missing:
        raise fail(
            f"the demo trains its models and needs {', '.join(missing)}: "
            "install the export extra (pip install 'cytoedge[export]')"
        )
    from export.demo import run_demo

    raise typer.Exit(run_demo(cfg, rebuild=rebuild))


@app.command()
def doctor(
    bundle: Annotated[
        Path | None, typer.Option(help="Verify this bundle instead of the configured one.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Show what this machine can run; exit 0 when the configured setup can score."""
    from appliance.doctor import run_doctor

    cfg = setup(config, log_to_file=False)
    raise typer.Exit(run_doctor(cfg, bundle))


def main() -> None:
    app()
