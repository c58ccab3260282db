"""Pictures in the window that keep their aspect ratio as the panes are resized."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import QLabel, QSizePolicy


class ScaledImage(QLabel):
    """A picture that keeps its aspect ratio while the pane is resized."""

    def __init__(self) -> None:
        super().__init__()
        self._image: QImage | None = None
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Ignored)
        self.setMinimumSize(120, 90)

    def set_image(self, image: QImage | None, missing_text: str = "no picture") -> None:
        self._image = image
        if image is None:
            self.setPixmap(QPixmap())
            self.setText(missing_text)
        else:
            self.setText("")
            self._rescale()

    def resizeEvent(self, event: object) -> None:  # noqa: N802
        self._rescale()

    def _rescale(self) -> None:
        if self._image is None or self.width() < 2 or self.height() < 2:
            return
        scaled = self._image.scaled(
            self.size(),
            Qt.AspectRatioMode.KeepAspectRatio,
            Qt.TransformationMode.SmoothTransformation,
        )
        self.setPixmap(QPixmap.fromImage(scaled))
