"""Why a scan cannot be read: one exception type per cause, each with a one-line reason.

The service and ``cytoedge score`` catch ``ScanError`` and report ``reason``
(the job becomes *rejected*, not *failed*: the input is at fault, not the code).
A reason is a sentence for a technician: what is wrong with the file and, where
it helps, what to do. The text of a library's exception never becomes one
(``fails_as`` logs it at DEBUG instead).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class ScanError(Exception):
    """A scan that cannot be used. ``reason`` is one line, safe to show a technician."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = " ".join(reason.split())  # always one line
        super().__init__(f"{self.path.name}: {self.reason}")


class ScanNotFoundError(ScanError):
    """The path does not exist or is not a regular file / folder."""


class EmptyFileError(ScanError):
    """A zero-byte file (often a copy still in progress or a failed transfer)."""


class NotAnImageError(ScanError):
    """The bytes are not an image format we read, whatever the extension says."""


class UnreadableScanError(ScanError):
    """An image format we know whose data is damaged (truncated, corrupt tiles)."""


class UnsupportedScanError(ScanError):
    """A valid file in a layout we do not read (e.g. a compression codec we lack)."""


class PixelSizeError(ScanError):
    """No physical pixel size (none in the file, no sidecar, none configured) or an absurd one."""


class NotBrightfieldError(ScanError):
    """Grayscale, multi-channel fluorescence or dark-field: not a Romanowsky brightfield stain."""


class ImageTooLargeError(ScanError):
    """Dimensions beyond any real slide (decompression-bomb guard); checked before decoding."""


class BlankScanError(ScanError):
    """No stained cells anywhere on the scan: nothing to analyse."""


class CellFolderError(ScanError):
    """A folder of single-cell images that is incomplete, empty or holds unusable images."""


class FieldFolderError(ScanError):
    """A folder of field photos that is incomplete, empty or holds something else."""


@contextmanager
def fails_as(error: type[ScanError], path: Path, reason: str) -> Iterator[None]:
    """Turn any failure inside the block into ``error(path, reason)``.

    Image libraries raise all kinds of exceptions on damaged data (TypeError,
    zlib.error, struct.error, ...), so this is broad on purpose. A ``ScanError``
    passes unchanged, and so does ``MemoryError`` (the machine, not the file:
    the service retries it). An operating-system error (permissions, I/O) is
    about the storage, not the contents, and is said so.
    """
    try:
        yield
    except (ScanError, MemoryError):
        raise
    except Exception as exc:
        log.debug("reader failed: %s", reason, exc_info=exc, extra={"path": str(path)})
        if isinstance(exc, OSError) and exc.errno in errno.errorcode:
            why = os.strerror(exc.errno).lower()
            raise error(path, f"the file cannot be read from storage: {why}") from None
        raise error(path, reason) from None


def listed_files(
    error: type[ScanError], folder: Path, manifest: str, names: list[str]
) -> list[Path]:
    """The files a folder's manifest lists, all present; else ``error`` naming a missing one."""
    paths = [folder / name for name in names]
    missing = [p.name for p in paths if not p.is_file()]
    if len(missing) == 1:
        raise error(folder, f"{manifest} lists {missing[0]}, which is missing from the folder")
    if missing:
        raise error(folder, f"{manifest} lists {len(missing)} missing files, e.g. {missing[0]}")
    return paths
