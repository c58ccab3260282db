"""``cytoedge demo``: plugged into the ``cytoedge`` command through the
``cytoedge.commands`` entry point; heavy imports happen inside the commands."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from appliance.cli.shared import ConfigOption, fail, setup

demo_app = typer.Typer(
    help="Build the demo bundle and demo scans (once), then score them.",
    invoke_without_command=True,
)


@demo_app.callback()
def demo(
    ctx: typer.Context,
    rebuild: Annotated[bool, typer.Option(help="Build the demo bundle again.")] = False,
    config: ConfigOption = None,
) -> None:
    """Build the demo bundle and demo scans (once), then score them."""
    if ctx.invoked_subcommand is not None:
        return
    cfg = setup(config)
    missing = [m for m in ("torch", "timm", "tensorflow") if importlib.util.find_spec(m) is None]
    if missing:
        raise fail(
            f"the demo trains its models and needs {', '.join(missing)}: "
            "install the export extra (pip install 'cytoedge[export]')"
        )
    from cytoedge_demo.builder import run_demo

    raise typer.Exit(run_demo(cfg, rebuild=rebuild))


@demo_app.command()
def screenshots(
    out: Annotated[Path, typer.Argument(help="Folder for the PNG files.", file_okay=False)],
    data: Annotated[
        Path | None,
        typer.Option(
            help="A data directory the service has scored: its first case waiting for review "
            "is signed off there (a new version). Default: the sample queue, in a temporary "
            "folder.",
            file_okay=False,
            exists=True,
        ),
    ] = None,
) -> None:
    """Draw a review in the window to PNG files (README pictures), then exit."""
    try:
        from cytoedge_demo.screenshots import render_screenshots
    except ImportError as exc:
        raise fail(f"the window needs PySide6: pip install 'cytoedge[gui]' ({exc})") from None
    try:
        written = render_screenshots(out, data)
    except RuntimeError as exc:
        raise fail(str(exc)) from None
    for path in written:
        typer.echo(path)


@demo_app.command("live-screenshot")
def live_screenshot(
    case: Annotated[str, typer.Argument(help="The case to show, as the queue names it.")],
    out: Annotated[Path, typer.Argument(help="The PNG file to write.", dir_okay=False)],
    tab: Annotated[str, typer.Option(help="cells | heatmap | slides")] = "heatmap",
    config: ConfigOption = None,
) -> None:
    """Run the window with the service (as `gui --with-service`) until the inbox is
    finished, then draw CASE to OUT (the README's field-folder picture)."""
    cfg = setup(config)
    try:
        from cytoedge_demo.live_screenshot import TABS, render_live_screenshot
    except ImportError as exc:
        raise fail(f"the window needs PySide6: pip install 'cytoedge[gui]' ({exc})") from None
    if tab not in TABS:
        raise fail(f"--tab must be one of {', '.join(TABS)}")
    typer.echo(render_live_screenshot(cfg, case, out, tab))
