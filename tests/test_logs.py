from __future__ import annotations

import json
import logging
from pathlib import Path

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
