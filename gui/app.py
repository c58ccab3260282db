"""Starting the window: ``run_window`` is what ``cytoedge gui`` calls."""

from __future__ import annotations

import logging
import sys
import threading

from PySide6.QtGui import QFont
from PySide6.QtWidgets import QApplication

from appliance.config import Config
from appliance.service.store import store_path
from gui.main_window import MainWindow, ServiceControl

log = logging.getLogger("cytoedge.gui")
BASE_POINT_SIZE = 12  # readable at arm's length on a lab monitor
SCREEN_SIZE = (1280, 800)  # the smallest screen the window must fit


def make_application(argv: list[str] | None = None) -> QApplication:
    """The QApplication with the window's look: Fusion style, a larger default font."""
    app = QApplication.instance()
    if not isinstance(app, QApplication):
        app = QApplication(argv if argv is not None else sys.argv[:1])
    app.setApplicationName("cytoedge")
    app.setStyle("Fusion")
    font = QFont(app.font())
    font.setPointSize(BASE_POINT_SIZE)
    app.setFont(font)
    return app


def software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cytoedge")
    except PackageNotFoundError:
        return "unknown"


def build_window(config: Config, service: ServiceControl | None = None) -> MainWindow:
    return MainWindow(
        store_path(config.state_dir),
        config.outbox,
        bundle_dir=config.bundle_dir,
        data_dir=config.data_dir,
        fhir_outbox=config.fhir_outbox,
        service=service,
        version=software_version(),
    )


class InProcessService:
    """The service running on its own thread in the window's process (`gui --with-service`).

    ``service`` is what ``cytoedge run`` runs: an object whose ``run(stop)``
    serves until the event is set (its worker has its own thread, so nothing
    here touches the UI thread). Pausing needs the service's
    ``watching_paused`` event (docs/DESIGN.md); without it the window offers no
    pause button.
    """

    def __init__(self, service: object) -> None:
        self._service = service
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=service.run,  # type: ignore[attr-defined]
            args=(self._stop,),
            name="cytoedge-service",
            daemon=True,
        )
        self._paused: threading.Event | None = getattr(service, "watching_paused", None)

    @property
    def can_pause(self) -> bool:
        return isinstance(self._paused, threading.Event)

    @property
    def paused(self) -> bool:
        return self._paused is not None and self._paused.is_set()

    def set_paused(self, paused: bool) -> None:
        if self._paused is None:
            raise RuntimeError("this service cannot pause its watching")
        if paused:
            self._paused.set()
        else:
            self._paused.clear()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> bool:
        """Ask the service to stop and wait for it; True when it ended in time."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()


def run_window(config: Config, service: object | None = None) -> int:
    """Show the window until it is closed; with a service, run it alongside; exit status."""
    app = make_application()
    in_process = InProcessService(service) if service is not None else None
    window = build_window(config, in_process if in_process and in_process.can_pause else None)
    window.resize(*SCREEN_SIZE)
    window.show()
    if in_process is not None:
        in_process.start()
    window.start()
    try:
        return app.exec()
    finally:
        if in_process is not None and not in_process.stop():
            log.error("the service did not stop within a minute of closing the window")
