"""The report printer's child process: Qt lays the report HTML out and prints an A4 PDF.

Run by ``appliance.results.report.print_pdf_in_child`` as
``python -m appliance.results.print_pdf BASE_DIR TARGET_PDF < report.html``.
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path


def print_pdf(report_html: str, base_dir: Path, target: Path) -> None:
    """The child's work: lay the HTML out with Qt and print it to an A4 PDF."""
    from PySide6.QtCore import QMarginsF, QUrl
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
    document.setHtml(report_html)
    writer = QPdfWriter(str(target))
    writer.setPageSize(QPageSize(QPageSize.PageSizeId.A4))
    writer.setPageMargins(QMarginsF(12, 12, 12, 12), QPageLayout.Unit.Millimeter)
    writer.setTitle("cytoedge report")
    writer.setCreator("cytoedge")
    document.print_(writer)
    del writer, document, app  # the PDF is complete once the writer is gone


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m appliance.results.print_pdf BASE_DIR TARGET_PDF < report.html")
    print_pdf(sys.stdin.buffer.read().decode("utf-8"), Path(sys.argv[1]), Path(sys.argv[2]))
