"""The window drawn offscreen over the sample queue, to PNG, for the documentation.

``cytoedge demo screenshots DIR`` draws it at 1280x800, the smallest screen the
window must fit, so the pictures in the README show what a technician sees.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from PySide6.QtCore import QBuffer, QEventLoop, QIODevice, QTimer
from PySide6.QtGui import QImage

from cytoedge_demo.samples import write_sample_site
from gui.app import SCREEN_SIZE, make_application, software_version
from gui.main_window import MainWindow
from gui.store_reader import StoreReader

SCREENSHOTS = {"done.png": "MM-2611-0416", "rejected.png": "MM-2611-0415"}


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
        window.apply_snapshot(window.reviews.annotate(snapshot))
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
    return loaded is not None and loaded.view.result.case_id == case_key
