from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from appliance.logs import LOG_FILE_NAME, setup_logging


def test_records_go_to_a_json_lines_file_with_extra_fields(tmp_path: Path) -> None:
    setup_logging(tmp_path, "WARNING")
    try:
        logging.getLogger("cytoedge.test").info("slide seen", extra={"case": "C1", "bytes": 12})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("cytoedge.test").exception("failed")
        for handler in logging.getLogger().handlers:
            handler.flush()
        lines = (tmp_path / LOG_FILE_NAME).read_text(encoding="utf-8").splitlines()
        entries = [json.loads(line) for line in lines]
    finally:
        setup_logging(None)
    # The file keeps INFO even when the console shows only warnings.
    assert entries[0]["message"] == "slide seen"
    assert entries[0]["case"] == "C1" and entries[0]["bytes"] == 12
    assert entries[0]["level"] == "INFO" and entries[0]["time"].endswith("Z")
    assert entries[1]["level"] == "ERROR" and "ValueError: boom" in entries[1]["exception"]


def test_root_logger_chatter_stays_off_the_console_but_reaches_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(tmp_path, "INFO")
    try:
        logging.info("Quantization parameters for tensor x not specified")  # a library's
        logging.warning("a library's warning")
        logging.getLogger("cytoedge.test").info("ours")
        for handler in logging.getLogger().handlers:
            handler.flush()
        messages = [
            json.loads(line)["message"]
            for line in (tmp_path / LOG_FILE_NAME).read_text(encoding="utf-8").splitlines()
        ]
    finally:
        setup_logging(None)
    shown = capsys.readouterr().out
    assert "ours" in shown and "a library's warning" in shown
    assert "Quantization parameters" not in shown
    assert "Quantization parameters for tensor x not specified" in messages


def test_the_file_keeps_our_debug_records_but_not_a_library_s(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "tiny.tif")
    setup_logging(tmp_path / "logs", "INFO")
    try:
        logging.getLogger("appliance.test").debug("ours, in detail")
        with Image.open(tmp_path / "tiny.tif") as image:  # Pillow logs each tag at DEBUG
            image.load()
        logging.getLogger("PIL.test").info("a library's info")
        for handler in logging.getLogger().handlers:
            handler.flush()
        lines = (tmp_path / "logs" / LOG_FILE_NAME).read_text(encoding="utf-8").splitlines()
    finally:
        setup_logging(None)
    entries = [json.loads(line) for line in lines]
    assert [e["message"] for e in entries] == ["ours, in detail", "a library's info"]
