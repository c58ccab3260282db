"""Starting the window: ``run_window`` is what ``cytoedge gui`` calls."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading

from PySide6.QtCore import QSocketNotifier, QTimer
from PySide6.QtGui import QFont, QGuiApplication
from PySide6.QtWidgets import QApplication, QWidget

from appliance.config import Config
from appliance.service.startup import stop_on_signals
from appliance.service.store import store_path
from gui.main_window import MainWindow, ServiceControl

log = logging.getLogger("cytoedge.gui")
BASE_POINT_SIZE = 12  # readable at arm's length on a lab monitor
# The window's size where the screen has room; a smaller screen gets all of its free
# area (the window works down to 1024 x 728: a laptop screen less its taskbar).
SCREEN_SIZE = (1280, 800)


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
        training_dir=config.training_cells_dir,
        service=service,
        version=software_version(),
        case_quiet_seconds=config.watch.case_quiet_seconds,
        audit_max_bytes=config.audit.max_bytes,
    )


def show_on_screen(window: QWidget) -> None:
    """Show the window at ``SCREEN_SIZE``, or maximised on a screen whose free area
    (without its taskbar) is smaller, so that nothing of it lies off the screen."""
    screen = window.screen() or QGuiApplication.primaryScreen()
    free = screen.availableGeometry()
    width, height = min(SCREEN_SIZE[0], free.width()), min(SCREEN_SIZE[1], free.height())
    window.resize(width, height)
    window.move(free.x() + (free.width() - width) // 2, free.y() + (free.height() - height) // 2)
    if (width, height) == SCREEN_SIZE:
        window.show()
    else:  # a window manager fits the frame in too; without one, the size above holds
        window.showMaximized()


class SignalWakeup:
    """Lets Python's signal handlers run while Qt's event loop waits in C++.

    Python only notes a signal and runs its handler at the next Python bytecode; Qt's
    loop may run none for minutes. ``signal.set_wakeup_fd`` writes a byte to a socket
    when one arrives, and the notifier on its other end calls into Python at once.
    """

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        for end in (self._read, self._write):
            end.setblocking(False)
        self._previous = signal.set_wakeup_fd(self._write.fileno())
        self._notifier = QSocketNotifier(self._read.fileno(), QSocketNotifier.Type.Read)
        self._notifier.activated.connect(self._drain)  # Python runs: its handlers run

    def _drain(self) -> None:
        with contextlib.suppress(OSError):
            while self._read.recv(64):
                pass

    def close(self) -> None:
        self._notifier.setEnabled(False)
        signal.set_wakeup_fd(self._previous)
        self._read.close()
        self._write.close()


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

    @property
    def stopping(self) -> threading.Event:
        """Set: the service finishes or hands back its job and stops."""
        return self._stop

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> bool:
        """Ask the service to stop and wait for it; True when it ended in time."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()


def run_window(config: Config, service: object | None = None) -> int:
    """Show the window until it is closed or a stop signal comes (a desktop logout's
    SIGTERM, SIGHUP, Ctrl+C); with a service, run it alongside and stop it as
    ``cytoedge run`` stops (the store records a clean stop); exit status."""
    app = make_application()
    in_process = InProcessService(service) if service is not None else None
    window = build_window(config, in_process if in_process and in_process.can_pause else None)
    wakeup = SignalWakeup()

    def close() -> None:
        window.close()
        app.quit()  # also ends a dialog's own loop

    # The handler runs on this thread, maybe before the loop starts: close from the loop.
    stop = in_process.stopping if in_process is not None else threading.Event()
    stop_on_signals(stop, then=lambda: QTimer.singleShot(0, close))
    show_on_screen(window)
    if in_process is not None:
        in_process.start()
    window.start()
    try:
        return app.exec()
    finally:
        wakeup.close()
        if in_process is not None and not in_process.stop():
            log.error("the service did not stop within a minute of closing the window")
