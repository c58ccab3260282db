"""The one command-line entry point, ``cytoedge``.

The appliance's own commands are here. The others plug in through the
``cytoedge.commands`` entry point, so that nothing in ``appliance`` imports the
packages above it (tests/test_layering.py holds that line): ``export`` and
``train`` (export/, torch and TensorFlow inside the commands), ``gui`` (gui/, Qt
inside the command), and from the cytoedge-demo distribution ``demo`` and
``bench``. An entry is a Typer group (added as a group) or a command function.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from appliance.cli.audit_commands import audit_app
from appliance.cli.bundle_commands import bundle_app
from appliance.cli.review_command import sign_off_command
from appliance.cli.shared import ConfigOption, fail, setup
from appliance.cli.validate_command import validate
from runtime.files import restrict_umask

app = typer.Typer(
    name="cytoedge",
    help="Offline hematology slide scoring: watch an inbox, score scans, explain results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(bundle_app, name="bundle")
app.add_typer(audit_app, name="audit")
log = logging.getLogger("cytoedge")
PLUGIN_GROUP = "cytoedge.commands"


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the service: watch the inbox, score each complete scan once."""
    from appliance.cli.service_commands import run_service

    raise typer.Exit(run_service(setup(config)))


@app.command()
def status(
    limit: Annotated[int, typer.Option(help="Show at most this many recent cases.")] = 50,
    config: ConfigOption = None,
) -> None:
    """Print the service's queue: cases and their slides, most recent first."""
    from rich.console import Console

    from appliance.cli.service_commands import print_status

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

    from appliance.cli.service_commands import request_rescore

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

    from appliance.cli.score_command import print_table, score_inputs
    from runtime.bundle_format import BundleError, load_bundle

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


# Sites: a bundle checked against a site's own labelled cases (``train``, which needs
# torch, plugs in from export/).
app.command()(validate)
# A reviewer at a terminal: what the window's sign-off dialog writes.
app.command(name="sign-off")(sign_off_command)


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
    from appliance.review.fhir import FhirError, export_signed_off

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
    self_test: Annotated[
        bool,
        typer.Option(
            "--self-test",
            help="Time the encoder and segmenter on every backend and precision that "
            "passes its parity gate here, and keep the fastest for this bundle.",
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Show what this machine can run; exit 0 when the configured setup can score."""
    from appliance.site.doctor import run_doctor

    cfg = setup(config, log_to_file=False)
    raise typer.Exit(run_doctor(cfg, bundle, gpu_self_test, self_test))


def _add_plugin_commands() -> None:
    """Command groups and commands installed distributions declare under
    ``cytoedge.commands``: cytoedge's own ``export``, ``train`` and ``gui``, and
    cytoedge-demo's ``demo`` and ``bench``. A clinical site installs no demo, and
    ``cytoedge demo`` then says where the demo is."""
    names = set()
    for entry in sorted(importlib.metadata.entry_points(group=PLUGIN_GROUP), key=_order):
        command = entry.load()
        if isinstance(command, typer.Typer):
            app.add_typer(command, name=entry.name)
        else:
            app.command(name=entry.name)(command)
        names.add(entry.name)
    if "demo" not in names:

        @app.command()
        def demo() -> None:
            """Build the demo bundle and demo scans (needs the cytoedge-demo distribution)."""
            raise fail(
                "the demo is not installed here: it is the cytoedge-demo distribution in the "
                "source tree's demo/ folder (`make demo` installs it with the export extra)"
            )


def _order(entry: importlib.metadata.EntryPoint) -> tuple[int, str]:
    """The help lists plugged-in commands in a fixed order, whatever the metadata's."""
    known = ("train", "gui", "export", "demo", "bench")
    return (known.index(entry.name) if entry.name in known else len(known), entry.name)


_add_plugin_commands()


def main() -> None:
    restrict_umask()  # what any command writes below the data directory is not world-readable
    app()
