"""The window on a real X display: Qt's xcb platform plugin finds every library it needs
(packaging/system-deps.sh installs them), and the window starts, shows a result and
fits 1280 x 800 under Xvfb with the xcb platform, as on a technician's desktop; its
sign-off dialog, with confirmed findings and a karyotype it refuses, fits too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("PySide6")

from tests.gui_checks import virtual_display

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: this process's Qt is already offscreen.
WINDOW_ON_X = """
import sys, time
from pathlib import Path
from cytoedge_demo.samples import write_sample_site
from gui.app import SCREEN_SIZE, make_application
from gui.main_window import MainWindow
from gui.store_reader import StoreReader
from tests.gui_checks import clipped_once_settled

app = make_application()
store, outbox = write_sample_site(Path(sys.argv[1]))
window = MainWindow(store, outbox)
window.resize(*SCREEN_SIZE)
window.show()
window.apply_snapshot(window.reviews.annotate(StoreReader(store).poll()))
problems = []
for key in ("MM-2611-0416", "MM-2611-0415", "PB-2611-0101"):
    window.select_case(key)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
        window.pane.loaded is not None and window.pane.loaded.view.result.case_id == key
    ):
        app.processEvents()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.01)
    problems += [(key, *p) for p in clipped_once_settled(window)]
print(app.platformName(), window.isVisible(), window.width(), window.height(), problems)
window.close()
"""

# The sign-off dialog on the same display: every field and the refusal line drawn whole.
DIALOG_ON_X = """
import sys
from pathlib import Path
from cytoedge_demo.samples import write_sample_site
from gui.app import SCREEN_SIZE, make_application
from gui.main_window import MainWindow
from gui.store_reader import StoreReader
from tests.gui_checks import clipped_once_settled

app = make_application()
store, outbox = write_sample_site(Path(sys.argv[1]))
window = MainWindow(store, outbox)
window.resize(*SCREEN_SIZE)
window.show()
window.apply_snapshot(window.reviews.annotate(StoreReader(store).poll()))
window.select_case("MM-2611-0416")
dialog = window.ask_sign_off("sent_for_fish")
dialog.name.setText("Dr Ana Reviewer")
dialog.fish.setText("t(11;14), del(17p), 1q gain")
dialog.mutations.setText("KRAS G12D, TP53 R273H")
dialog.karyotype.setText("46,XY,t(11;14)(q13;q32)[20]/47,idem,+8[cp5")
refused = (dialog.problem.isVisible(), dialog.ok.isEnabled(), clipped_once_settled(dialog))
dialog.karyotype.setText("46,XY,t(11;14)(q13;q32)[20]")
problems = clipped_once_settled(dialog)
fits = dialog.width() <= SCREEN_SIZE[0] and dialog.height() <= SCREEN_SIZE[1]
print(app.platformName(), refused, dialog.ok.isEnabled(), fits, problems)
dialog.reject()
window.close()
"""


def xcb_plugin() -> Path:
    import PySide6

    return Path(PySide6.__file__).parent / "Qt" / "plugins" / "platforms" / "libqxcb.so"


@pytest.mark.skipif(shutil.which("ldd") is None, reason="no ldd (not a glibc Linux)")
def test_the_xcb_platform_plugin_finds_all_its_libraries() -> None:
    """What failed on a fresh desktop: 'Could not load the Qt platform plugin xcb'."""
    plugin = xcb_plugin()
    if not plugin.is_file():
        pytest.skip("this PySide6 build has no xcb plugin")
    libraries = [plugin, *sorted((plugin.parents[2] / "lib").glob("libQt6XcbQpa.so*"))]
    for library in libraries:
        linked = subprocess.run(["ldd", str(library)], capture_output=True, text=True).stdout
        missing = [line.split()[0] for line in linked.splitlines() if "not found" in line]
        assert missing == [], f"{library.name} needs {missing}: run packaging/system-deps.sh"


@pytest.fixture
def x_display() -> Iterator[str]:
    """A virtual X server of this test's own, on the first free display number."""
    with virtual_display() as display:
        yield display


def on_display(script: str, display: str, site: Path) -> str:
    """What ``script`` prints, run with the xcb platform on ``display`` over a sample site."""
    env = {
        **os.environ,
        "DISPLAY": display,
        "QT_QPA_PLATFORM": "xcb",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "demo")]),
    }
    env.pop("WAYLAND_DISPLAY", None)
    done = subprocess.run(
        [sys.executable, "-c", script, str(site)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_the_window_runs_on_a_real_x_display(x_display: str, tmp_path: Path) -> None:
    assert on_display(WINDOW_ON_X, x_display, tmp_path / "site") == "xcb True 1280 800 []"


def test_the_sign_off_dialog_with_findings_fits_on_a_real_x_display(
    x_display: str, tmp_path: Path
) -> None:
    # The karyotype refused (the line shown, nothing to sign), then put right; nothing clipped.
    printed = on_display(DIALOG_ON_X, x_display, tmp_path / "site")
    assert printed == "xcb (True, False, []) True True []"
