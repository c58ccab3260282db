"""The report printer's child process: Qt lays the report HTML out and prints an A4 PDF.

Run by ``appliance.results.report.print_pdf_in_child`` as
``python -m appliance.results.print_pdf BASE_DIR TARGET_PDF < report.html``.

The document is laid out on a fixed page, ``BODY_PX``: A4 less 12 mm margins in
CSS pixels (96 to the inch), so that the report's HTML sizes its pictures in
the units the page has and a pixel of the layout is a 96th of an inch on paper.
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

MARGIN_MM = 12.0
A4_MM = (210.0, 297.0)
CSS_DPI = 96.0
BODY_PX = tuple(int((side - 2 * MARGIN_MM) / 25.4 * CSS_DPI) for side in A4_MM)  # (703, 1031)
FIT_SCALES = (1.0, 1.05, 1.1, 1.2, 1.3)  # at most 1.3: 9.5 pt text still prints at 7.3 pt


def print_pdf(report_html: str, base_dir: Path, target: Path) -> None:
    """The child's work: lay the HTML out with Qt and print it to an A4 PDF."""
    from PySide6.QtCore import QMarginsF, QSizeF, QUrl
    from PySide6.QtGui import (
        QGuiApplication,
        QImage,
        QPageLayout,
        QPageSize,
        QPdfWriter,
        QTextDocument,
    )

    app = QGuiApplication(["cytoedge-report"])  # fonts need an application object
    document = QTextDocument()
    for src in set(re.findall(r"<img src='([^']+)'", report_html)):
        image = QImage(str(base_dir / html.unescape(src)))
        if not image.isNull():
            document.addResource(QTextDocument.ResourceType.ImageResource, QUrl(src), image)
    document.setDocumentMargin(0)
    document.setHtml(report_html)
    # Paginated on the page's own size: no page numbers, no extra margins. A case that
    # does not fit (many slides, long reasons) is laid out on a larger page and printed
    # scaled down to A4, rather than spill its last lines onto a second page.
    for scale in FIT_SCALES:
        document.setPageSize(QSizeF(BODY_PX[0] * scale, BODY_PX[1] * scale))
        if document.pageCount() == 1:
            break
    writer = QPdfWriter(str(target))
    writer.setPageSize(QPageSize(QPageSize.PageSizeId.A4))
    margins = QMarginsF(MARGIN_MM, MARGIN_MM, MARGIN_MM, MARGIN_MM)
    writer.setPageMargins(margins, QPageLayout.Unit.Millimeter)
    writer.setTitle("cytoedge report")
    writer.setCreator("cytoedge")
    document.print_(writer)
    del writer, document, app  # the PDF is complete once the writer is gone


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m appliance.results.print_pdf BASE_DIR TARGET_PDF < report.html")
    print_pdf(sys.stdin.buffer.read().decode("utf-8"), Path(sys.argv[1]), Path(sys.argv[2]))
