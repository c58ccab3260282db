"""The result pane: what a case predicts, how sure, which cells drove it, and QC.

Files are read and images decoded on a pool thread (``read_folder``); the pane
only turns the decoded images into pixmaps and lays them out, so a large
heatmap or a slow share never freezes the window.
"""

from __future__ import annotations

import contextlib
import html
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QObject, QPointF, QRectF, QSize, Qt, QThreadPool, QTimer, Signal
from PySide6.QtGui import QColor, QImage, QPainter, QPaintEvent, QPen, QPixmap, QPolygonF
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QStackedWidget,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from appliance.results import TopCell
from gui.cell_gallery import CellGallery, class_words
from gui.differential_view import DifferentialPanel
from gui.pictures import ScaledImage
from gui.result_data import (
    CaseView,
    CellView,
    ResultUnreadableError,
    cell_measurements,
    load_result,
)
from gui.review_state import ReviewState
from gui.review_view import ReviewBar
from gui.similar_view import SimilarCases
from gui.text import wrappable

CALL_COLOURS = {"positive": "#b00020", "negative": "#1b5e20", "indeterminate": "#8a6d00"}
BANNER_STYLES = {
    "demo": "background:#b00020; color:white;",
    "rejected": "background:#7f1010; color:white;",
    "abstained": "background:#f2c200; color:#1a1a1a;",
    "unsigned": "background:#8a6d00; color:white;",
}
ENLARGED_PX = 384


@dataclass
class LoadedResult:
    """A result with its pictures decoded, ready for the UI thread."""

    view: CaseView
    images: dict[Path, QImage] = field(default_factory=dict)
    measurements: dict[tuple[str, int], dict[str, str]] = field(default_factory=dict)

    def image(self, path: Path | None) -> QImage | None:
        return None if path is None else self.images.get(path)


def read_folder(path: Path, case_id: str | None = None) -> LoadedResult:
    """Everything the pane shows for one result folder (runs off the UI thread); with
    ``case_id``, only a result of that case."""
    result = load_result(path, case_id)
    cells = result.top_cells + result.gallery_cells
    wanted = [c.image for c in cells] + [result.gallery]
    for slide in result.slides:
        wanted += [slide.heatmap, slide.thumbnail]
    images = {}
    for image_path in wanted:
        if image_path is not None:
            image = QImage(str(image_path))
            if not image.isNull():
                images[image_path] = image
    measurements: dict[tuple[str, int], dict[str, str]] = {}
    for slide in result.slides:
        ids = {c.cell.cell_id for c in cells if c.cell.slide == slide.slide_id}
        if slide.cells_csv is not None and ids:
            for cell_id, row in cell_measurements(slide.cells_csv, ids).items():
                measurements[slide.slide_id, cell_id] = row
    return LoadedResult(result, images, measurements)


class ResultLoader(QObject):
    """Reads result folders on the global thread pool; only the newest request is delivered
    (checked again on the UI thread: a folder read before a newer request was made may
    arrive after it)."""

    loaded = Signal(object)  # LoadedResult
    failed = Signal(str)
    _read = Signal(int, object)  # (token, LoadedResult | reason), from the pool thread

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._latest = 0
        self._counter = itertools.count(1)
        self._read.connect(self._deliver)

    def request(self, path: Path, case_id: str | None = None) -> None:
        token = next(self._counter)
        self._latest = token
        QThreadPool.globalInstance().start(lambda: self._run(token, path, case_id))

    def cancel(self) -> None:
        self._latest = next(self._counter)

    def _run(self, token: int, path: Path, case_id: str | None) -> None:
        try:
            loaded: LoadedResult | str = read_folder(path, case_id)
        except ResultUnreadableError as exc:
            loaded = str(exc)
        if token != self._latest:
            return
        with contextlib.suppress(RuntimeError):  # the pane was closed while it was read
            self._read.emit(token, loaded)

    def _deliver(self, token: int, loaded: LoadedResult | str) -> None:
        if token != self._latest:
            return
        if isinstance(loaded, str):
            self.failed.emit(loaded)
        else:
            self.loaded.emit(loaded)


class ProbabilityBar(QWidget):
    """A horizontal bar to the probability, coloured by the call, with the threshold marked."""

    def __init__(self, probability: float, threshold: float, call: str, name: str) -> None:
        super().__init__()
        self.probability = min(1.0, max(0.0, probability))
        self.threshold = min(1.0, max(0.0, threshold))
        self.call = call
        text = f"{name}: probability {probability:.2f}, threshold {threshold:.2f}, {call}"
        self.setAccessibleName(text)
        self.setToolTip(text)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def sizeHint(self) -> QSize:  # noqa: N802
        return QSize(220, self.fontMetrics().height() + 12)

    def minimumSizeHint(self) -> QSize:  # noqa: N802
        return QSize(120, self.fontMetrics().height() + 12)

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        tick = 5.0
        track = QRectF(1, tick + 1, self.width() - 2, self.height() - 2 * tick - 2)
        painter.setPen(QPen(QColor("#8c8c8c"), 1))
        painter.setBrush(QColor("#ececec"))
        painter.drawRect(track)
        fill = QRectF(track.left(), track.top(), track.width() * self.probability, track.height())
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(QColor(CALL_COLOURS.get(self.call, "#555555")))
        painter.drawRect(fill)
        x = track.left() + track.width() * self.threshold
        painter.setPen(QPen(QColor("#000000"), 2.5))
        painter.drawLine(QPointF(x, 1), QPointF(x, self.height() - 1))
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(QColor("#000000"))
        painter.drawPolygon(
            QPolygonF([QPointF(x - tick, 0), QPointF(x + tick, 0), QPointF(x, tick)])
        )
        painter.end()


def call_label(call: str, big: bool = False) -> QLabel:
    label = QLabel(call.upper() if call == "positive" else call)
    size = "15pt" if big else "12pt"
    label.setStyleSheet(
        f"color:{CALL_COLOURS.get(call, '#333333')}; font-weight:bold; font-size:{size};"
    )
    return label


class CellDialog(QDialog):
    """One cell, enlarged, with the cell head's class, its attention (a top cell) and its
    measurements."""

    def __init__(
        self,
        shown: CellView,
        image: QImage | None,
        measurements: dict[str, str],
        labels: dict[str, str],
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        cell = shown.cell
        top = isinstance(cell, TopCell)
        self.setWindowTitle(f"Cell #{cell.rank}" if top else f"Cell {cell.cell_id}")
        layout = QHBoxLayout(self)
        picture = QLabel()
        picture.setAlignment(Qt.AlignmentFlag.AlignCenter)
        if image is not None:
            picture.setPixmap(
                QPixmap.fromImage(
                    image.scaled(
                        ENLARGED_PX,
                        ENLARGED_PX,
                        Qt.AspectRatioMode.KeepAspectRatio,
                        Qt.TransformationMode.SmoothTransformation,
                    )
                )
            )
        else:
            picture.setText("no crop stored for this cell")
        layout.addWidget(picture)
        form = QFormLayout()
        called = class_words(shown, labels)
        if called:
            form.addRow("Class:", QLabel(called))
        if top:
            form.addRow("Rank:", QLabel(f"#{cell.rank} of the highest-attention cells"))
            form.addRow(
                "Attention:", QLabel(f"{cell.attention * 100:.2f} % of the case's attention")
            )
        form.addRow("Slide:", QLabel(cell.slide))
        form.addRow("Cell:", QLabel(str(cell.cell_id)))
        if top:
            form.addRow("Position (px):", QLabel(f"x {cell.x:,.0f}, y {cell.y:,.0f}"))
        # Shown above, or not a measurement (the outline, for QuPath and GIS tools).
        said = {"cell_id", "id", "x", "y", "attention", "polygon_wkt", "cell_class"}
        said |= {"class_confidence", "class_sure"}
        for key, value in measurements.items():
            if key not in said and value not in ("", None):
                form.addRow(f"{key.replace('_', ' ')}:", QLabel(str(value)))
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        side = QVBoxLayout()
        side.addLayout(form)
        side.addStretch(1)
        side.addWidget(buttons)
        layout.addLayout(side)
        self.measurements = measurements


class ResultPane(QWidget):
    """Right-hand side of the window for the selected case."""

    cell_opened = Signal(object)  # CellDialog, for tests and the main window

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.loaded: LoadedResult | None = None
        self.loader = ResultLoader(self)
        self.loader.loaded.connect(self.show_result)
        self.loader.failed.connect(lambda reason: self.show_message("Result not readable", reason))
        self._stack = QStackedWidget()
        self._message_title = QLabel()
        self._message_title.setStyleSheet("font-size:16pt; font-weight:bold;")
        self._message_title.setWordWrap(True)
        self._message_title.setTextFormat(Qt.TextFormat.PlainText)
        self._message_body = QLabel()
        self._message_body.setWordWrap(True)
        self._message_body.setTextFormat(Qt.TextFormat.PlainText)
        # A case still collecting slides can be scored now; the window connects it.
        self.score_now = QPushButton("Score &now")
        self.score_now.setVisible(False)
        message = QWidget()
        message_layout = QVBoxLayout(message)
        message_layout.addWidget(self._message_title)
        message_layout.addWidget(self._message_body)
        message_layout.addWidget(self.score_now, 0, Qt.AlignmentFlag.AlignLeft)
        message_layout.addStretch(1)
        self._stack.addWidget(message)
        self._stack.addWidget(self._build_result_page())
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._stack)
        self.show_message("No case selected", "Choose a case in the queue to see its result.")

    # --- building -------------------------------------------------------------
    def _build_result_page(self) -> QWidget:
        """The result, in a scroll area that never scrolls sideways: every text wraps to
        the pane's width, and a result with more to say than the pane's height scrolls."""
        page = QWidget()
        page.setObjectName("result_page")
        layout = QVBoxLayout(page)
        layout.setContentsMargins(6, 0, 6, 0)
        self.banner_box = QVBoxLayout()
        self.banner_box.setSpacing(4)
        layout.addLayout(self.banner_box)
        self.title = QLabel()
        self.title.setStyleSheet("font-size:17pt; font-weight:bold;")
        self.title.setWordWrap(True)
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.qc_line = QLabel()
        self.qc_line.setWordWrap(True)
        layout.addWidget(self.title)
        layout.addWidget(self.summary)
        layout.addWidget(self.qc_line)
        self.review_bar = ReviewBar()
        layout.addWidget(self.review_bar)

        self.predictions_box = QGroupBox("Predictions")
        self.predictions_grid = QGridLayout(self.predictions_box)
        self.predictions_grid.setColumnStretch(1, 1)
        self.predictions_grid.setHorizontalSpacing(12)
        layout.addWidget(self.predictions_box)
        self.differential = DifferentialPanel()
        layout.addWidget(self.differential)

        self.tabs = QTabWidget()
        self.gallery = CellGallery()
        self.gallery.opened.connect(self.open_cell)
        self.tabs.addTab(self.gallery, "&Cells")

        heat_tab = QWidget()
        heat_layout = QVBoxLayout(heat_tab)
        heat_layout.setContentsMargins(2, 2, 2, 2)
        row = QHBoxLayout()
        row.addWidget(QLabel("Slide:"))
        self.slide_choice = QComboBox()
        self.slide_choice.setAccessibleName("Slide shown in the heatmap")
        self.slide_choice.currentIndexChanged.connect(self._show_heatmap)
        row.addWidget(self.slide_choice, 1)
        self.heat_only_slide = QCheckBox("Slide only (hide attention)")
        self.heat_only_slide.toggled.connect(self._show_heatmap)
        row.addWidget(self.heat_only_slide)
        heat_layout.addLayout(row)
        self.heatmap = ScaledImage()
        self.heatmap.setAccessibleName("Attention heatmap over the slide, blue low, red high")
        heat_layout.addWidget(self.heatmap, 1)
        self.tabs.addTab(heat_tab, "Attention &heatmap")

        self.slides_table = QTableWidget(0, 4)
        self.slides_table.setHorizontalHeaderLabels(["Slide", "QC", "Cells", "QC reasons"])
        self.slides_table.verticalHeader().setVisible(False)
        self.slides_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.slides_table.setWordWrap(True)
        header = self.slides_table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        self.slide_picture = ScaledImage()
        self.slide_picture.setAccessibleName("The selected slide, as scanned")
        self.slides_table.currentCellChanged.connect(self._show_slide_picture)
        slides_tab = QWidget()
        slides_layout = QVBoxLayout(slides_tab)
        slides_layout.setContentsMargins(2, 2, 2, 2)
        slides_layout.addWidget(self.slides_table, 1)
        slides_layout.addWidget(self.slide_picture, 2)
        self.tabs.addTab(slides_tab, "&Slides and QC")
        self.similar = SimilarCases()
        self.similar.opened.connect(self.load)
        self.similar.install_keys(self)
        self.tabs.addTab(self.similar, "Si&milar")
        self.tabs.setMinimumHeight(260)  # the pictures stay usable; the page scrolls instead
        layout.addWidget(self.tabs, 1)
        self.scroll = QScrollArea()
        self.scroll.setObjectName("result_scroll")
        self.scroll.setWidget(page)
        self.scroll.setWidgetResizable(True)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        return self.scroll

    # --- showing --------------------------------------------------------------
    def show_message(self, title: str, body: str, *, score_now: bool = False) -> None:
        """A case without a result to show: queued, running, failed, or nothing selected;
        ``score_now``: offer to score it without waiting for more slides."""
        self.loader.cancel()
        self.loaded = None
        self._message_title.setText(wrappable(title))
        self._message_body.setText(wrappable(body))
        self.score_now.setVisible(score_now)
        self._stack.setCurrentIndex(0)

    def load(self, folder: Path, case_id: str | None = None) -> None:
        """Read a result folder in the background; the pane updates when it arrives. With
        ``case_id`` (the queue's case), a result of another case is refused, not shown."""
        self.loader.request(folder, case_id)

    def show_result(self, loaded: LoadedResult) -> None:
        self.loaded = loaded
        view = loaded.view
        result = view.result
        self._stack.setCurrentIndex(1)
        self.scroll.verticalScrollBar().setValue(0)  # a new case is read from its top
        self._fill_banners(view)
        if result.review is not None:  # signed: the result says so itself, before the queue
            review = result.review
            self.review_bar.show_state(
                ReviewState(view.folder, result.version, review.waited_for, review)
            )
        self.title.setText(wrappable(result.case_id))
        slides = len(result.scans)
        parts = [
            f"Result v{result.version}",
            {"scored": "scored", "abstained": "no call", "rejected": "rejected"}.get(
                result.status, result.status
            ),
            f"{result.cells:,} cells analysed from {slides} slide{'s' * (slides != 1)}",
        ]
        if result.attention_top20_mass is not None:
            mass = result.attention_top20_mass * 100
            parts.append(f"top 20 % of cells hold {mass:.0f} % of attention")
        if result.bundle.signer is not None:  # without one, a banner says so (under warn)
            parts.append(f"bundle {result.bundle.signed_words}")
        self.summary.setText(" · ".join(parts))
        self._fill_qc(view)
        self._fill_predictions(view)
        self.differential.show_differential(result.differential, result.burden, result.warnings)
        self.gallery.show_view(view, loaded.image)
        self.slide_choice.blockSignals(True)
        self.slide_choice.clear()
        for slide in view.slides:
            self.slide_choice.addItem(slide.name, slide.slide_id)
        self.slide_choice.blockSignals(False)
        self._show_heatmap()
        self._fill_slides(view)
        self.similar.show_view(view)
        # After the new rows are shown (Qt shows them from the event loop), not before.
        QTimer.singleShot(0, self, self._keep_page_whole)
        if result.status == "rejected" or (
            not result.top_cells and any(not slide.qc_passed for slide in view.slides)
        ):
            self.tabs.setCurrentIndex(2)  # nothing scored because of QC: show the QC

    def _keep_page_whole(self) -> None:
        """The page never scrolls sideways: the pane may not be made narrower than it."""
        bar = self.scroll.verticalScrollBar().sizeHint().width()
        self.scroll.setMinimumWidth(self.scroll.widget().minimumSizeHint().width() + bar)

    def select_slide(self, file_name: str) -> None:
        """Show this slide's heatmap (the queue's slide rows are named by file)."""
        for row in range(self.slide_choice.count()):
            if self.slide_choice.itemText(row) == file_name:
                self.slide_choice.setCurrentIndex(row)
                return

    def _fill_banners(self, result: CaseView) -> None:
        while self.banner_box.count():
            item = self.banner_box.takeAt(0)
            if item is not None and item.widget() is not None:
                item.widget().deleteLater()
        for kind, text in result.banners():
            banner = QLabel(wrappable(text))
            banner.setTextFormat(Qt.TextFormat.PlainText)
            banner.setObjectName(f"banner_{kind}")
            banner.setWordWrap(True)
            banner.setAlignment(Qt.AlignmentFlag.AlignCenter)
            banner.setStyleSheet(
                BANNER_STYLES[kind] + "font-size:15pt; font-weight:bold; padding:6px;"
            )
            banner.setAccessibleName(text)
            self.banner_box.addWidget(banner)

    def _fill_qc(self, result: CaseView) -> None:
        failed = [s for s in result.slides if not s.qc_passed]
        if not result.slides:
            self.qc_line.setText("QC: no scan information")
        elif failed:
            reasons = sorted({r for s in failed for r in s.scan.qc.reasons})
            said = html.escape(wrappable("; ".join(reasons) or "no reason given"))
            self.qc_line.setText(
                f"<b style='color:#b00020'>QC failed</b> on {len(failed)} of "
                f"{len(result.slides)} slide(s): {said}"
            )
        else:
            count = len(result.slides)
            where = "the slide" if count == 1 else f"all {count} slides"
            self.qc_line.setText(f"<b style='color:#1b5e20'>QC passed</b> on {where}")

    def _fill_predictions(self, view: CaseView) -> None:
        """Each head's rows as its kind made them: a bar per call, then its findings."""
        grid = self.predictions_grid
        while grid.count():
            item = grid.takeAt(0)
            if item is not None and item.widget() is not None:
                item.widget().deleteLater()
        row = 0
        for head in view.result.heads:
            for prediction in head.predictions:
                name = QLabel(prediction.label)
                name.setStyleSheet("font-weight:bold;")
                grid.addWidget(name, row, 0)
                bar = ProbabilityBar(
                    prediction.probability, prediction.threshold, prediction.call, prediction.label
                )
                grid.addWidget(bar, row, 1)
                numbers = QLabel(
                    f"{prediction.probability:.2f}  (threshold {prediction.threshold:.2f})"
                )
                grid.addWidget(numbers, row, 2)
                grid.addWidget(call_label(prediction.call), row, 3)
                row += 1
            for finding in head.findings:
                label = QLabel(f"<b>{html.escape(finding.label)}</b>")
                label.setWordWrap(True)
                if finding.call is not None:
                    grid.addWidget(label, row, 0, 1, 3)
                    grid.addWidget(call_label(finding.call, big=True), row, 3)
                else:
                    label.setText(f"{label.text()}: {html.escape(finding.text)}")
                    grid.addWidget(label, row, 0, 1, 4)
                row += 1
        if row == 0:
            reason = view.result.abstain_reason or "no predictions in this result"
            message = QLabel(wrappable(f"No call was made: {reason}."))
            message.setTextFormat(Qt.TextFormat.PlainText)
            message.setWordWrap(True)
            grid.addWidget(message, 0, 0, 1, 4)
        self.predictions_box.setVisible(True)

    def open_cell(self, cell: CellView) -> CellDialog | None:
        if self.loaded is None:
            return None
        dialog = CellDialog(
            cell,
            self.loaded.image(cell.image),
            self.loaded.measurements.get(cell.key, {}),
            self.loaded.view.class_labels,
            self,
        )
        self.cell_opened.emit(dialog)
        dialog.open()
        return dialog

    def _show_heatmap(self, *_: object) -> None:
        if self.loaded is None:
            return
        slide_id = self.slide_choice.currentData()
        slide = next((s for s in self.loaded.view.slides if s.slide_id == slide_id), None)
        if slide is None:
            self.heatmap.set_image(None, "no slide")
            return
        path = slide.thumbnail if self.heat_only_slide.isChecked() else slide.heatmap
        self.heatmap.set_image(self.loaded.image(path), "no picture for this slide")

    def _fill_slides(self, result: CaseView) -> None:
        table = self.slides_table
        table.setRowCount(len(result.slides))
        for row, slide in enumerate(result.slides):
            verdict = QTableWidgetItem(slide.scan.qc.verdict)
            verdict.setForeground(QColor("#1b5e20" if slide.qc_passed else "#b00020"))
            cells = QTableWidgetItem(f"{slide.scan.cells:,}")
            cells.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            items = [
                QTableWidgetItem(slide.name),
                verdict,
                cells,
                QTableWidgetItem("; ".join(slide.scan.qc.reasons) or "-"),
            ]
            for column, item in enumerate(items):
                item.setToolTip(item.text())
                table.setItem(row, column, item)
            # How much of the scan gave these cells, and what the case's budget left out.
            why = [slide.scan.examined.sentence() if slide.scan.examined else None]
            why.append(slide.scan.set_aside_sentence())
            if any(why):
                cells.setToolTip("\n".join(w for w in why if w))
        table.resizeRowsToContents()
        if result.slides:
            table.setCurrentCell(0, 0)
        self._show_slide_picture(0)

    def _show_slide_picture(self, row: int, *_: int) -> None:
        if self.loaded is None or not 0 <= row < len(self.loaded.view.slides):
            self.slide_picture.set_image(None, "")
            return
        slide = self.loaded.view.slides[row]
        picture = self.loaded.image(slide.thumbnail)
        self.slide_picture.set_image(picture, "")
        self.slide_picture.setVisible(picture is not None)  # else the QC table takes the room
