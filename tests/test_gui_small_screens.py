"""The window on laptop screens: 1366 x 768 less a 40 px taskbar, and 1024 x 728.

Offscreen at both sizes, and on a real X display (Xvfb, the xcb platform) whose
screen is that size, opened the way ``cytoedge gui`` opens it: the whole window
on the screen, nothing clipped (tests/gui_checks.py), and the review bar, the
demo banner, every call with its threshold and the status bar within reach.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import Qt

from cytoedge_demo.samples import write_sample_site
from gui.app import make_application
from gui.main_window import MainWindow
from gui.store_reader import StoreReader
from tests.gui_checks import clipped_once_settled, out_of_reach, result_parts, virtual_display

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(1366, 728), (1024, 728)]
# Calls, banners and the review bar (0416), a QC rejection (0415), a blood screen (0101).
CASES = ("MM-2611-0416", "MM-2611-0415", "PB-2611-0101")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_sample_site(tmp_path_factory.mktemp("site"))


def showing(window: MainWindow, case_key: str) -> bool:
    loaded = window.pane.loaded
    return loaded is not None and loaded.view.result.case_id == case_key


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_window_works_whole_on_a_laptop_screen_offscreen(qtbot, site, size) -> None:
    make_application()
    store, outbox = site
    window = MainWindow(store, outbox)
    qtbot.addWidget(window)
    window.resize(*size)
    window.show()
    window.apply_snapshot(window.reviews.annotate(StoreReader(store).poll()))
    for case_key in CASES:
        window.select_case(case_key)
        qtbot.waitUntil(lambda key=case_key: showing(window, key), timeout=5000)
        qtbot.wait(50)
        assert (window.width(), window.height()) == size
        assert clipped_once_settled(window) == [], case_key
        parts = result_parts(window)
        assert len(parts) >= 5, case_key  # banners, review bar, calls, status bar
        assert out_of_reach(window, parts) == [], case_key
    # Stacked on the narrow screen, side by side on the wide one.
    wide = size[0] >= 1200
    horizontal = window.splitter.orientation() == Qt.Orientation.Horizontal
    assert horizontal == wide


def test_the_result_pane_cannot_be_dragged_narrower_than_its_calls(qtbot, site) -> None:
    make_application()
    store, outbox = site
    window = MainWindow(store, outbox)
    qtbot.addWidget(window)
    window.resize(1366, 728)
    window.show()
    window.apply_snapshot(window.reviews.annotate(StoreReader(store).poll()))
    window.select_case("MM-2611-0416")
    qtbot.waitUntil(lambda: showing(window, "MM-2611-0416"), timeout=5000)
    qtbot.wait(50)
    window.splitter.setSizes([5000, 10])  # the handle dragged to the far right
    qtbot.wait(50)
    assert clipped_once_settled(window) == []
    assert out_of_reach(window, result_parts(window)) == []


# Run in a fresh interpreter (this process's Qt is offscreen), opened as run_window opens it.
WINDOW_ON_X = """
import sys, time
from pathlib import Path
from cytoedge_demo.samples import write_sample_site
from gui.app import make_application, show_on_screen
from gui.main_window import MainWindow
from gui.store_reader import StoreReader
from tests.gui_checks import clipped_once_settled, out_of_reach, result_parts

app = make_application()
store, outbox = write_sample_site(Path(sys.argv[1]))
window = MainWindow(store, outbox)
show_on_screen(window)
window.apply_snapshot(window.reviews.annotate(StoreReader(store).poll()))
screen = window.screen().availableGeometry()
problems = []
for key in sys.argv[3:]:
    window.select_case(key)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
        window.pane.loaded is not None and window.pane.loaded.view.result.case_id == key
    ):
        app.processEvents()
    for _ in range(30):
        app.processEvents()
        time.sleep(0.01)
    if not screen.contains(window.frameGeometry()):
        problems.append((key, "off the screen", window.frameGeometry().getRect()))
    problems += [(key, *p) for p in clipped_once_settled(window)]
    problems += [(key, p) for p in out_of_reach(window, result_parts(window))]
    window.grab().save(f"{sys.argv[2]}-{key}.png")
print(app.platformName(), window.isVisible(), screen.width(), screen.height(), problems)
window.close()
"""


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_window_works_whole_on_a_laptop_screen_on_x(size, tmp_path: Path) -> None:
    with virtual_display(f"{size[0]}x{size[1]}") as display:
        env = {
            **os.environ,
            "DISPLAY": display,
            "QT_QPA_PLATFORM": "xcb",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "demo")]),
        }
        env.pop("WAYLAND_DISPLAY", None)
        pictures = tmp_path / "window"
        done = subprocess.run(
            [sys.executable, "-c", WINDOW_ON_X, str(tmp_path / "site"), str(pictures), *CASES],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    expected = f"xcb True {size[0]} {size[1]} []"
    assert done.stdout.strip() == expected, done.stdout + done.stderr[-2000:]
