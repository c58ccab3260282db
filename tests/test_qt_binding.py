"""The Qt binding the window runs on keeps Python's reference counts: a binding that
loses a reference on every delivered signal crashes a long-running window."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("PySide6")

EMITS = (
    "import sys\n"
    "from PySide6.QtCore import QCoreApplication, QObject, Signal\n"
    "app = QCoreApplication([])\n"
    "class Source(QObject):\n"
    "    changed = Signal()\n"
    "source = Source()\n"
    "source.changed.connect(lambda: None)\n"
    "before = sys.getrefcount(True), sys.getrefcount(None)\n"
    "for _ in range(500):\n"
    "    source.changed.emit()\n"
    "print(before == (sys.getrefcount(True), sys.getrefcount(None)))\n"
)


def test_signals_delivered_to_python_keep_reference_counts() -> None:
    # In a process of its own: a binding with the bug aborts the interpreter at exit.
    result = subprocess.run(
        [sys.executable, "-c", EMITS],
        capture_output=True,
        text=True,
        timeout=120,
        env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin"},
    )
    assert result.stdout.strip() == "True", result.stdout + result.stderr[-500:]
    assert result.returncode == 0, result.stderr[-500:]
