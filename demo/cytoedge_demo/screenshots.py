"""The window drawn offscreen during a review, to PNG, for the documentation.

``cytoedge demo screenshots DIR --data DATA_DIR`` draws the window over a data
directory the service has scored (its job store, result folders and audit
trail, read as a technician's window reads them) at 1280x800, the smallest
screen the window must fit, and takes a reviewer through one sign-off:

- ``review.png``: only the cases waiting for review, the first scored one
  selected, the sign-off dialog open over it;
- ``signed-off.png``: the same case once signed off (its new version);
- ``rejected.png``: the first case rejected with a result (QC), with its reasons.

The sign-off is real: it writes a new version of that case in DATA_DIR and a
line in its audit trail. Without ``--data`` the sample queue is drawn, in a
temporary folder.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from PySide6.QtCore import QBuffer, QEventLoop, QIODevice, QPoint, QRect, Qt, QTimer
from PySide6.QtGui import QColor, QImage, QPainter
from PySide6.QtWidgets import QApplication, QWidget

from appliance.service.store import store_path
from cytoedge_demo.samples import write_sample_site
from gui.app import SCREEN_SIZE, make_application, software_version
from gui.main_window import MainWindow
from gui.store_reader import StoreReader

REVIEWER = "Demo Reviewer"
PICTURES = ("review.png", "signed-off.png", "rejected.png")


def _wait(condition: Callable[[], bool], timeout_ms: int = 30_000) -> bool:
    """Spin the event loop until condition() or the timeout (for offscreen rendering)."""
    loop = QEventLoop()
    waited = 0
    while not condition() and waited < timeout_ms:
        QTimer.singleShot(20, loop.quit)
        loop.exec()
        waited += 20
    return condition()


def render_screenshots(out_dir: Path, data_dir: Path | None = None) -> list[Path]:
    """Draw a review over ``data_dir`` (else the sample queue) to PNG files in ``out_dir``."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    app = make_application()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cytoedge-screens-") as tmp:
        if data_dir is None:
            data_dir = Path(tmp)
            store, outbox = write_sample_site(data_dir)
        else:
            store, outbox = store_path(data_dir / "state"), data_dir / "outbox"
        window = MainWindow(
            store,
            outbox,
            data_dir=data_dir,
            fhir_outbox=data_dir / "fhir-outbox",
            version=software_version(),
        )
        try:
            return _review(app, window, store, out_dir)
        finally:
            window.close()


def _review(app: QApplication, window: MainWindow, store: Path, out_dir: Path) -> list[Path]:
    window.resize(*SCREEN_SIZE)
    window.show()
    _refresh(window, store)
    window.review_filter.setChecked(True)
    waiting = [c for c in window.model.cases() if c.review is not None and c.review.to_review]
    if not waiting:
        raise RuntimeError(f"no case in {store} waits for review")
    case = next((c for c in waiting if c.state == "done"), waiting[0])  # one with calls
    key = case.case_key
    window.select_case(key)
    if not _wait(lambda: _showing(window, key, case.review.version)):
        raise RuntimeError(f"the result of {key} did not load")
    undecided = any(reason.startswith("indeterminate") for reason in case.review.waiting)
    dialog = window.ask_sign_off("sent_for_fish" if undecided else "accepted")
    if dialog is None:
        raise RuntimeError(f"{key} cannot be signed off")
    dialog.name.setText(REVIEWER)
    dialog.reason.setText("checked the cells and the heatmap")
    app.processEvents()
    written = [save_small_png(_with_dialog(window, dialog), out_dir / PICTURES[0])]
    signed: list[bool] = []
    window.relay.signed.connect(lambda ok, message, folder: signed.append(ok))
    dialog.ok.click()
    if not _wait(lambda: bool(signed)) or not signed[0]:
        raise RuntimeError(f"the sign-off of {key} failed: {window.statusBar().currentMessage()}")
    _wait(lambda: _showing(window, key, case.review.version + 1))
    window.review_filter.setChecked(False)
    _refresh(window, store)
    window.select_case(key)
    _wait(lambda: _showing(window, key, case.review.version + 1))
    written.append(save_small_png(window.grab().toImage(), out_dir / PICTURES[1]))
    rejected = [c for c in window.model.cases() if c.state == "rejected"]
    rejected = next((c for c in rejected if c.result_dir), rejected[0] if rejected else None)
    if rejected is not None:
        window.select_case(rejected.case_key)
        _wait(lambda: window.pane.loaded is None or _showing(window, rejected.case_key))
        app.processEvents()
        written.append(save_small_png(window.grab().toImage(), out_dir / PICTURES[2]))
    return written


def _refresh(window: MainWindow, store: Path) -> None:
    """What the window's polling thread does once a second."""
    snapshot = StoreReader(store).poll()
    if snapshot is None:
        raise RuntimeError(f"the job store {store} could not be read")
    window.reviews.refresh()
    window.apply_snapshot(window.reviews.annotate(snapshot))


def _showing(window: MainWindow, case_key: str, version: int | None = None) -> bool:
    loaded = window.pane.loaded
    return (
        loaded is not None
        and loaded.view.result.case_id == case_key
        and version in (None, loaded.view.result.version)
    )


def _with_dialog(window: MainWindow, dialog: QWidget) -> QImage:
    """The window with its dialog (a separate top-level, undecorated offscreen) drawn where
    it opens, centred, under a title bar such as a desktop draws."""
    picture = window.grab().toImage()
    over = dialog.grab().toImage()
    bar = 30
    at = QPoint((picture.width() - over.width()) // 2, (picture.height() - over.height()) // 3)
    painter = QPainter(picture)
    painter.fillRect(picture.rect(), QColor(0, 0, 0, 50))  # the window behind a modal dialog
    title = QRect(at.x(), at.y() - bar, over.width(), bar)
    painter.fillRect(title, QColor("#3b4252"))
    painter.setPen(QColor("white"))
    left = Qt.AlignmentFlag.AlignVCenter
    painter.drawText(title.adjusted(10, 0, 0, 0), left, dialog.windowTitle())
    painter.drawImage(at, over)
    painter.setPen(QColor("#3b4252"))
    painter.drawRect(QRect(at.x(), at.y() - bar, over.width() - 1, over.height() + bar - 1))
    painter.end()
    return picture


def save_small_png(image: QImage, target: Path) -> Path:
    """A 256-colour PNG: half the bytes of Qt's, and the same picture to the eye."""
    buffer = QBuffer()
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    if not image.save(buffer, "PNG"):
        raise RuntimeError(f"could not encode {target.name}")
    picture = Image.open(io.BytesIO(bytes(buffer.data()))).convert("RGB")
    picture.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(target, optimize=True)
    return target
