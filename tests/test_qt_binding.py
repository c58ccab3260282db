"""The Qt binding the window runs on keeps Python's reference counts: a binding that
loses a reference on every delivered signal crashes a long-running window."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("PySide6")

# The garbage collector is off while counting: a collection freeing an unrelated cycle
# that held None would move the count as well. The bug moves it by one per emit.
EMITS = (
    "import gc, sys\n"
    "from PySide6.QtCore import QCoreApplication, QObject, Signal\n"
    "app = QCoreApplication([])\n"
    "class Source(QObject):\n"
    "    changed = Signal()\n"
    "source = Source()\n"
    "source.changed.connect(lambda: None)\n"
    "gc.collect()\n"
    "gc.disable()\n"
    "before = sys.getrefcount(True), sys.getrefcount(None)\n"
    "for _ in range(1000):\n"
    "    source.changed.emit()\n"
    "after = sys.getrefcount(True), sys.getrefcount(None)\n"
    "print(max(abs(a - b) for a, b in zip(after, before)))\n"
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
    # 1000 emits: a leak or loss per signal moves a count by about 1000.
    printed = result.stdout.strip()
    assert printed.isdigit() and int(printed) < 100, result.stdout + result.stderr[-500:]
    assert result.returncode == 0, result.stderr[-500:]
