"""Starting the window, and rendering it to PNG for the documentation.

``run_window`` is what ``cytoedge gui`` calls. ``render_screenshots`` draws the
window offscreen over the sample queue (gui/samples.py) at 1280x800, the size
the window must fit, so the pictures in the README show what a technician sees.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from PySide6.QtCore import QBuffer, QEventLoop, QIODevice, QTimer
from PySide6.QtGui import QFont, QImage
from PySide6.QtWidgets import QApplication

from appliance.config import Config
from appliance.service.store import store_path
from gui.main_window import MainWindow, ServiceControl
from gui.store_reader import StoreReader

log = logging.getLogger("cytoedge.gui")
BASE_POINT_SIZE = 12  # readable at arm's length on a lab monitor
SCREEN_SIZE = (1280, 800)
SCREENSHOTS = {"done.png": "MM-2611-0416", "rejected.png": "MM-2611-0415"}


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


def _wait(condition: Callable[[], bool], timeout_ms: int = 10_000) -> bool:
    """Spin the event loop until condition() or the timeout (for offscreen rendering)."""
    loop = QEventLoop()
    waited = 0
    while not condition() and waited < timeout_ms:
        QTimer.singleShot(20, loop.quit)
        loop.exec()
        waited += 20
    return condition()


def render_screenshots(out_dir: Path) -> list[Path]:
    """Draw the window over the sample queue, a done case and a rejected one, to PNG."""
    from gui.samples import write_sample_site

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    app = make_application()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="cytoedge-screens-") as tmp:
        store, outbox = write_sample_site(Path(tmp))
        window = MainWindow(store, outbox, version=software_version())
        window.resize(*SCREEN_SIZE)
        window.show()
        snapshot = StoreReader(store).poll()
        if snapshot is None:
            raise RuntimeError(f"the sample store {store} could not be read")
        window.apply_snapshot(snapshot)
        for name, case_key in SCREENSHOTS.items():
            window.select_case(case_key)
            if not _wait(lambda key=case_key: _showing(window, key)):
                raise RuntimeError(f"the result of {case_key} did not load")
            app.processEvents()
            target = out_dir / name
            save_small_png(window.grab().toImage(), target)
            written.append(target)
        window.close()
    return written


def save_small_png(image: QImage, target: Path) -> None:
    """A 256-colour PNG: half the bytes of Qt's, and the same picture to the eye."""
    buffer = QBuffer()
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    if not image.save(buffer, "PNG"):
        raise RuntimeError(f"could not encode {target.name}")
    picture = Image.open(io.BytesIO(bytes(buffer.data()))).convert("RGB")
    picture.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(target, optimize=True)


def _showing(window: MainWindow, case_key: str) -> bool:
    loaded = window.pane.loaded
    return loaded is not None and loaded.result.case_id == case_key
