"""The validation report's pictures, drawn with Pillow: a ROC curve and a reliability
diagram per task, a reliability diagram per multi-class head; for a cell head its
confusion matrix and its accuracy-coverage curve."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

from appliance.results.pictures import label_font

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont
SIZE = 360  # px a side: two side by side fit the report's page width
MARGIN = (48, 16, 16, 44)  # left, top, right, bottom: room for ticks and axis titles
CURVE = (31, 90, 180)
REFERENCE = (170, 170, 170)
GRID = (232, 232, 232)
THRESHOLD = (176, 0, 32)


class _Axes:
    """A square in pixels, x from 0 to 1 and y over ``y_range``, with five grid steps
    on each axis and titled axes."""

    def __init__(
        self, title: str, x_title: str, y_title: str, y_range: tuple[float, float] = (0.0, 1.0)
    ) -> None:
        self.image = Image.new("RGB", (SIZE, SIZE), "white")
        self.draw = ImageDraw.Draw(self.image)
        left, top, right, bottom = MARGIN
        self.x0, self.y0 = left, SIZE - bottom
        self.width, self.height = SIZE - left - right, SIZE - top - bottom - 14
        self.y_low, self.y_high = y_range
        font = label_font(11)
        digits = 1 if self.y_high - self.y_low >= 0.5 else 2
        for step in range(6):
            v = step / 5
            y_value = self.y_low + v * (self.y_high - self.y_low)
            x, y = self.point(v, self.y_low)[0], self.point(0, y_value)[1]
            self.draw.line([(x, self.y0), (x, self.y0 - self.height)], fill=GRID)
            self.draw.line([(self.x0, y), (self.x0 + self.width, y)], fill=GRID)
            self.draw.text((x - 8, self.y0 + 4), f"{v:.1f}", fill="black", font=font)
            _text(self.draw, (self.x0 - 4, y), f"{y_value:.{digits}f}", font, "right")
        self.draw.rectangle(
            [self.x0, self.y0 - self.height, self.x0 + self.width, self.y0], outline="black"
        )
        self.draw.text((self.x0, 2), title, fill="black", font=label_font(12))
        self.draw.text((self.x0 + self.width // 2 - 60, self.y0 + 20), x_title, fill="black")
        # Above the frame, right of the tick labels: the top tick's label sits left of it.
        self.draw.text((self.x0 + 4, self.y0 - self.height - 14), y_title, fill="black", font=font)

    def point(self, x: float, y: float) -> tuple[float, float]:
        share = (y - self.y_low) / (self.y_high - self.y_low)
        return self.x0 + x * self.width, self.y0 - share * self.height

    def diagonal(self) -> None:
        self.draw.line([self.point(0, 0), self.point(1, 1)], fill=REFERENCE, width=1)


def roc_picture(
    title: str,
    corners: Sequence[tuple[float, float]],
    operating_point: tuple[float, float] | None,
) -> Image.Image:
    """The ROC curve through its corners; ``operating_point`` (1 - specificity,
    sensitivity at the bundle's threshold) as a red dot."""
    axes = _Axes(title, "1 - specificity", "sensitivity")
    axes.diagonal()
    if len(corners) > 1:
        axes.draw.line([axes.point(x, y) for x, y in corners], fill=CURVE, width=2)
    if operating_point is not None:
        x, y = axes.point(*operating_point)
        axes.draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=THRESHOLD)
    return axes.image


def reliability_picture(title: str, bins: Sequence[tuple[float, float, int]]) -> Image.Image:
    """Observed frequency against mean predicted probability per bin; a dot's area
    grows with its bin's case count, the diagonal is perfect calibration."""
    axes = _Axes(title, "predicted probability", "observed frequency")
    axes.diagonal()
    largest = max((n for _, _, n in bins), default=1)
    points = [axes.point(p, o) for p, o, _ in bins]
    if len(points) > 1:
        axes.draw.line(points, fill=CURVE, width=1)
    for (x, y), (_, _, n) in zip(points, bins, strict=True):
        r = 3 + 5 * (n / largest) ** 0.5
        axes.draw.ellipse([x - r, y - r, x + r, y + r], outline=CURVE, fill=(200, 215, 240))
    return axes.image


def coverage_picture(
    title: str,
    curve: Sequence[tuple[float, float]],
    operating_point: tuple[float, float] | None,
    target: float,
) -> Image.Image:
    """Accuracy against coverage (the share of cells called, surest first); the target
    accuracy dashed, ``operating_point`` (coverage, accuracy) as a red dot. The accuracy
    axis starts a tenth below the lowest accuracy, so that the top of the curve, where
    operating points lie, is not squeezed into a sliver."""
    lowest = min([a for _, a in curve if math.isfinite(a)] + [target])
    axes = _Axes(title, "coverage", "accuracy", (min(math.floor(lowest * 10) / 10, 0.9), 1.0))
    _, target_y = axes.point(0, target)
    for start in range(0, int(axes.width), 8):
        x = axes.x0 + start
        axes.draw.line([(x, target_y), (x + 4, target_y)], fill=THRESHOLD, width=1)
    if len(curve) > 1:
        axes.draw.line([axes.point(c, a) for c, a in curve], fill=CURVE, width=2)
    if operating_point is not None and math.isfinite(operating_point[1]):
        x, y = axes.point(*operating_point)
        axes.draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=THRESHOLD)
    return axes.image


# The confusion matrix is drawn at this many pixels per pixel of the page, so that its
# small type stays sharp in the PDF; a cell's side is kept between these bounds.
CONFUSION_SCALE = 1.5
CONFUSION_WIDTH = 1020  # px, at most: the page's width at CONFUSION_SCALE
CONFUSION_CELL = (30, 90)
CONFUSION_HEADING = 26  # px above the column labels for the picture's one line of key
DIAGONAL = (46, 125, 50)
OFF_DIAGONAL = (230, 120, 20)


def confusion_layout(labels: Sequence[str]) -> tuple[int, int, int]:
    """Where ``confusion_picture`` puts its grid for these class labels: the left and top
    edges of its first cell and a cell's side, in pixels (the labels' room is the
    longest label's)."""
    font = label_font(15)
    label_px = max((int(font.getlength(label)) for label in labels), default=0) + 12
    cell = (CONFUSION_WIDTH - label_px - 8) // max(len(labels), 1)
    return (
        label_px,
        CONFUSION_HEADING + label_px,
        max(CONFUSION_CELL[0], min(CONFUSION_CELL[1], cell)),
    )


def confusion_width(labels: Sequence[str]) -> int:
    """The width in pixels of ``confusion_picture`` for these class labels."""
    left, _, cell = confusion_layout(labels)
    return left + len(labels) * cell + 8


def confusion_picture(
    labels: Sequence[str],
    matrix: Sequence[Sequence[int]],
    critical: Collection[tuple[int, int]] = (),
) -> Image.Image:
    """Rows the true class, columns the call, a count in every cell. A cell is shaded by
    its share of the row (green on the diagonal, orange off it); the ``critical`` cells
    (row, column) that hold cells are framed in red."""
    n = len(labels)
    font = label_font(15)
    label_px, top, cell = confusion_layout(labels)
    image = Image.new("RGB", (confusion_width(labels), top + n * cell + 8), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), "rows: true class; columns: called", fill="black", font=font)
    largest = max((count for row in matrix for count in row), default=0)
    counts_font = label_font(max(9, min(16, int(cell * 0.75 / (0.6 * max(len(str(largest)), 1))))))
    for index, label in enumerate(labels):
        y = top + index * cell + cell // 2
        _text(draw, (label_px - 6, y), label, font, "right")
        _vertical_text(image, label, (label_px + index * cell + cell // 2, top - 6), font)
    for row, counts in enumerate(matrix):
        total = sum(counts) or 1
        for column, count in enumerate(counts):
            share = count / total
            tint = DIAGONAL if row == column else OFF_DIAGONAL
            fill = tuple(int(255 - share * (255 - c)) for c in tint) if count else (255, 255, 255)
            x, y = label_px + column * cell, top + row * cell
            draw.rectangle([x, y, x + cell, y + cell], fill=fill, outline=GRID)
            if count and (row, column) in critical:
                draw.rectangle(
                    [x + 1, y + 1, x + cell - 1, y + cell - 1], outline=THRESHOLD, width=3
                )
            ink = "white" if share > 0.6 else ("black" if count else (170, 170, 170))
            _text(draw, (x + cell / 2, y + cell / 2), str(count), counts_font, "centre", ink)
    draw.rectangle([label_px, top, label_px + n * cell, top + n * cell], outline="black")
    return image


def _text(
    draw: ImageDraw.ImageDraw,
    at: tuple[float, float],
    text: str,
    font: Font,
    align: Literal["left", "centre", "right"],
    fill: str | int | tuple[int, int, int] = "black",
) -> None:
    """``text`` centred vertically on ``at``, starting, centred or ending at its x."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    shift = {"left": 0.0, "centre": (right - left) / 2, "right": float(right - left)}[align]
    draw.text((at[0] - shift - left, at[1] - (bottom - top) / 2 - top), text, fill=fill, font=font)


def _vertical_text(
    image: Image.Image, text: str, bottom_centre: tuple[int, int], font: Font
) -> None:
    """``text`` read bottom to top, centred on ``bottom_centre``'s x and ending at its y."""
    probe = ImageDraw.Draw(image)
    left, _, right, _ = probe.textbbox((0, 0), text, font=font)
    width, height = right - left + 4, 22
    strip = Image.new("L", (width, height), 0)
    _text(ImageDraw.Draw(strip), (2, height / 2), text, font, "left", 255)
    turned = strip.rotate(90, expand=True)
    x, y = bottom_centre
    image.paste((0, 0, 0), (x - height // 2, y - width), turned)
