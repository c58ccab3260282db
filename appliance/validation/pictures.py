"""The validation report's pictures, drawn with Pillow: a ROC curve and a reliability
diagram per task, a reliability diagram per multi-class head."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from appliance.results.pictures import label_font

SIZE = 360  # px a side: two side by side fit the report's page width
MARGIN = (48, 16, 16, 44)  # left, top, right, bottom: room for ticks and axis titles
CURVE = (31, 90, 180)
REFERENCE = (170, 170, 170)
GRID = (232, 232, 232)
THRESHOLD = (176, 0, 32)


class _Axes:
    """A unit square in pixels, with a grid every 0.2 and titled axes."""

    def __init__(self, title: str, x_title: str, y_title: str) -> None:
        self.image = Image.new("RGB", (SIZE, SIZE), "white")
        self.draw = ImageDraw.Draw(self.image)
        left, top, right, bottom = MARGIN
        self.x0, self.y0 = left, SIZE - bottom
        self.width, self.height = SIZE - left - right, SIZE - top - bottom - 14
        font = label_font(11)
        for step in range(6):
            v = step / 5
            x, y = self.point(v, 0)[0], self.point(0, v)[1]
            self.draw.line([(x, self.y0), (x, self.y0 - self.height)], fill=GRID)
            self.draw.line([(self.x0, y), (self.x0 + self.width, y)], fill=GRID)
            self.draw.text((x - 8, self.y0 + 4), f"{v:.1f}", fill="black", font=font)
            self.draw.text((self.x0 - 26, y - 6), f"{v:.1f}", fill="black", font=font)
        self.draw.rectangle(
            [self.x0, self.y0 - self.height, self.x0 + self.width, self.y0], outline="black"
        )
        self.draw.text((self.x0, 2), title, fill="black", font=label_font(12))
        self.draw.text((self.x0 + self.width // 2 - 60, self.y0 + 20), x_title, fill="black")
        self.draw.text((2, self.y0 - self.height - 14), y_title, fill="black", font=font)

    def point(self, x: float, y: float) -> tuple[float, float]:
        return self.x0 + x * self.width, self.y0 - y * self.height

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
