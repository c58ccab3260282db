"""``cytoedge gui``, plugged into the command line through the ``cytoedge.commands``
entry point; Qt is imported inside the command, so the command line starts without it."""

from __future__ import annotations

from typing import Annotated

import typer

from appliance.cli.shared import ConfigOption, fail, setup


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
        from appliance.service.startup import build_service

        try:
            service = build_service(cfg)
        except (ValueError, RuntimeError) as exc:  # a bad configuration: one line
            raise fail(str(exc)) from None
    raise typer.Exit(run_window(cfg, service))
