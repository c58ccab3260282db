"""The window of a live ``cytoedge gui --with-service`` run, drawn offscreen to PNG.

``cytoedge demo live-screenshot CASE OUT`` starts the service on a thread of the
window's process over the configured inbox, exactly as ``gui --with-service``
does, waits until every case in the store is finished, selects CASE and draws
the window at 1280x800 showing the chosen tab (for the README's field-folder
picture: a case of camera fields, its contact sheet and heatmap).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from PySide6.QtCore import QEventLoop, QTimer

from appliance.config import Config
from appliance.service.startup import build_service
from appliance.service.store import store_path
from cytoedge_demo.screenshots import save_small_png
from gui.app import SCREEN_SIZE, InProcessService, build_window, make_application
from gui.store_reader import StoreReader

FINISHED = {"done", "rejected", "failed"}
TABS = {"cells": 0, "heatmap": 1, "slides": 2}


def _spin(ms: int = 200) -> None:
    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def render_live_screenshot(
    config: Config, case_key: str, target: Path, tab: str = "heatmap", timeout_s: float = 1800
) -> Path:
    """Serve the inbox with the window open until all is finished; draw CASE to ``target``."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    app = make_application()
    config.ensure_dirs()
    service = InProcessService(build_service(config))
    window = build_window(config, service if service.can_pause else None)
    window.resize(*SCREEN_SIZE)
    window.show()
    service.start()
    window.start()
    reader = StoreReader(store_path(config.state_dir))
    deadline = time.monotonic() + timeout_s
    try:
        cases: dict[str, str] = {}
        while time.monotonic() < deadline:
            _spin()
            snapshot = reader.poll()
            if snapshot is not None:
                cases = {c.case_key: c.state for c in snapshot.cases}
            if case_key in cases and all(state in FINISHED for state in cases.values()):
                break
        else:
            raise RuntimeError(f"the inbox was not finished within {timeout_s:.0f} s: {cases}")
        _spin(1500)  # the window's own poll picks the last rows up
        window.select_case(case_key)
        while window.pane.loaded is None or window.pane.loaded.view.result.case_id != case_key:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the result of {case_key} did not load")
            _spin()
        window.pane.tabs.setCurrentIndex(TABS[tab])
        _spin(500)
        app.processEvents()
        target.parent.mkdir(parents=True, exist_ok=True)
        save_small_png(window.grab().toImage(), target)
        return target
    finally:
        reader.close()
        window.close()
        service.stop()
