"""The one command-line entry point, ``cytoedge``.

This module is the composition root: it is the only place in ``appliance``
that reaches ``export`` and ``gui`` (and the command groups other distributions
plug in), and only through their own Typer groups, which import torch,
TensorFlow or Qt inside the commands, never at module level
(tests/test_layering.py holds that line).
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from appliance.bundle_cli import bundle_app
from appliance.command import ConfigOption, fail, setup
from appliance.validate_cli import validate
from export.cli import export_app
from export.train_cli import train

app = typer.Typer(
    name="cytoedge",
    help="Offline hematology slide scoring: watch an inbox, score scans, explain results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(export_app, name="export")
app.add_typer(bundle_app, name="bundle")
log = logging.getLogger("cytoedge")
PLUGIN_GROUP = "cytoedge.commands"


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
            f"no usable model bundle ({exc}); `cytoedge bundle install FILE` installs "
            "one, `cytoedge demo` builds the demo bundle"
        ) from None
    groups = [(case, files)] if case else [(path.stem or path.name, [path]) for path in files]
    console = Console(stderr=True)
    run = score_inputs(groups, bundle, cfg, console)
    print_table(run, Console())
    for path, reason in run.rejected:
        sys.stderr.write(f"cytoedge: rejected {path}: {reason}\n")
    if run.rejected:
        raise typer.Exit(1)


# Model owners and sites: labelled cases to a new bundle version, and a bundle checked
# against a site's own labelled cases.
app.command()(train)
app.command()(validate)


@app.command()
def fhir(
    targets: Annotated[
        list[str], typer.Argument(help="Case ids, case folders or result version folders.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the FHIR files (default: paths.fhir_outbox)."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Write signed-off results as FHIR R4 for the laboratory system (nothing is sent).

    A sign-off in the window writes it already; this writes it again, e.g. for a LIS
    that lost it. A result nobody has signed off is refused (exit 1, one line each)."""
    from appliance.fhir import FhirError, export_signed_off

    cfg = setup(config, log_to_file=False)
    refused = False
    for target in targets:
        try:
            typer.echo(export_signed_off(target, cfg.outbox, out or cfg.fhir_outbox))
        except FhirError as exc:
            sys.stderr.write(f"cytoedge: {exc}\n")
            refused = True
        except OSError as exc:
            sys.stderr.write(f"cytoedge: {target}: could not write the FHIR file: {exc}\n")
            refused = True
    if refused:
        raise typer.Exit(1)


@app.command()
def gui(
    with_service: Annotated[
        bool, typer.Option("--with-service", help="Also run the service in this process.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Open the technician's window."""
    try:
        from gui.app import run_window
    except ImportError as exc:
        raise fail(f"the window needs PySide6: pip install 'cytoedge[gui]' ({exc})") from None
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
def doctor(
    bundle: Annotated[
        Path | None, typer.Option(help="Verify this bundle instead of the configured one.")
    ] = None,
    gpu_self_test: Annotated[
        bool,
        typer.Option(
            "--gpu-self-test",
            help="Also run every network on every backend that loads and compare it with "
            "the CPU (builds missing TensorRT engines).",
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Show what this machine can run; exit 0 when the configured setup can score."""
    from appliance.doctor import run_doctor

    cfg = setup(config, log_to_file=False)
    raise typer.Exit(run_doctor(cfg, bundle, gpu_self_test))


def _add_plugin_commands() -> None:
    """Command groups other installed distributions declare under ``cytoedge.commands``.

    ``cytoedge-demo`` (demo/) adds ``demo`` and ``bench``; a clinical site installs
    neither, and ``cytoedge demo`` then says where the demo is.
    """
    names = set()
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        app.add_typer(entry.load(), name=entry.name)
        names.add(entry.name)
    if "demo" not in names:

        @app.command()
        def demo() -> None:
            """Build the demo bundle and demo scans (needs the cytoedge-demo distribution)."""
            raise fail(
                "the demo is not installed here: it is the cytoedge-demo distribution in the "
                "source tree's demo/ folder (`make demo` installs it with the export extra)"
            )


_add_plugin_commands()


def main() -> None:
    app()
