"""Logging: human-readable lines on the console, JSON lines in a rotating file."""

from __future__ import annotations

import errno
import json
import logging
import logging.handlers
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.logging import RichHandler

LOG_FILE_NAME = "cytoedge.jsonl"
_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record; ``extra={...}`` fields are kept as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _LogFile(logging.handlers.RotatingFileHandler):
    """The JSON log file; a record that does not fit on a full disk is dropped quietly
    (the console still has it), not reported with a traceback per record."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return
        super().handleError(record)


def _no_root_chatter(record: logging.LogRecord) -> bool:
    """Keep below-warning records of the bare root logger off the console: libraries
    that log there (onnxruntime's quantiser writes a line per tensor) would bury
    ours, which all use named loggers. The log file still gets them."""
    return record.name != "root" or record.levelno >= logging.WARNING


# Packages whose DEBUG records the log file keeps; other libraries' start at INFO.
OWN_PACKAGES = frozenset({"appliance", "runtime", "export", "gui", "cytoedge_demo"})


def _no_library_debug(record: logging.LogRecord) -> bool:
    """Keep libraries' DEBUG records out of the file: Pillow logs every tag of every TIFF
    it opens, which rotated a demo run's log three times and pushed the service's own
    records out of it."""
    return record.levelno >= logging.INFO or record.name.split(".")[0] in OWN_PACKAGES


def setup_logging(
    log_dir: Path | None,
    level: str = "INFO",
    max_bytes: int = 10_000_000,
    backups: int = 5,
) -> None:
    """Configure the root logger once per process (calling again replaces handlers)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    console = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
    console.setLevel(level)
    console.addFilter(_no_root_chatter)
    root.addHandler(console)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = _LogFile(
            log_dir / LOG_FILE_NAME, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        file_handler.setFormatter(JsonLineFormatter())
        file_handler.setLevel(logging.DEBUG)
        file_handler.addFilter(_no_library_debug)
        root.addHandler(file_handler)
        root.setLevel(logging.DEBUG)


@contextmanager
def console_only_warnings() -> Iterator[None]:
    """Keep the console to warnings for a while (the log file still gets every record):
    for a command whose progress bars and tables already say what happens."""
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, RichHandler)]
    levels = [h.level for h in consoles]
    for handler in consoles:
        handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for handler, level in zip(consoles, levels, strict=True):
            handler.setLevel(level)
