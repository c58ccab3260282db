"""The optional archive move (``paths.archive``): a finished case's inputs leave the inbox.

Only when configured; otherwise inputs are never touched. Each unit moves
whole (a scan with its sidecar, an MRXS with its folder, a DICOM or cell
folder), keeping its place below the inbox, so ``inbox/P-7/a.svs`` becomes
``archive/P-7/a.svs``; a name already taken in the archive gets a numbered
suffix rather than overwriting. A case folder's ``.ready`` goes with it and the
emptied folder is removed.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from pathlib import Path

from appliance.service import inbox_layout

log = logging.getLogger(__name__)


def _free_target(target: Path) -> Path:
    if not target.exists():
        return target
    for n in range(1, 10_000):
        candidate = target.with_name(f"{target.stem}.{n}{target.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"no free archive name for {target}")


def _move(path: Path, inbox: Path, archive: Path) -> Path:
    target = _free_target(archive / path.relative_to(inbox))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(target))
    return target


def archive_case(
    slide_paths: list[str], inbox: Path, archive: Path, pattern: re.Pattern[str] | None
) -> dict[str, str]:
    """Move the units behind ``slide_paths`` from the inbox to the archive.

    Returns {old slide path: new slide path} for what moved; a unit no longer
    in the inbox is skipped."""
    inbox = inbox.resolve()
    wanted = set(slide_paths)
    moved: dict[str, str] = {}
    case_dirs: set[Path] = set()
    for unit in inbox_layout.discover(inbox, pattern).units:
        if str(unit.path) not in wanted:
            continue
        if unit.kind == "dicom":
            folder = unit.extras[0]
            new_folder = _move(folder, inbox, archive)
            moved[str(unit.path)] = str(new_folder / unit.path.name)
        else:
            new_path = _move(unit.path, inbox, archive)
            for extra in unit.extras:
                if extra.exists():
                    _move(extra, inbox, archive)
            moved[str(unit.path)] = str(new_path)
        if unit.case_dir not in (None, inbox, unit.path):  # a folder unit moved whole
            case_dirs.add(unit.case_dir)
    for folder in case_dirs:
        ready = folder / inbox_layout.READY_FILE
        if ready.exists():
            _move(ready, inbox, archive)
        with contextlib.suppress(OSError):  # only when empty: anything else stays
            folder.rmdir()
    if moved:
        log.info("inputs moved to the archive", extra={"moved": moved})
    return moved
