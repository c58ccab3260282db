"""A bundle as one file to carry: a tar archive with a manifest of checksums.

``pack_bundle`` verifies a bundle folder and writes ``<name>-<version>.bundle.tar``:
``MANIFEST.json`` first (what the archive holds, each file's sha256 and size),
then ``bundle/bundle.json`` and every file it lists (``engines/`` is built per
GPU on site and never shipped). The archive is reproducible: the same bundle
packs to the same bytes.

``unpack_bundle`` reads an archive into an empty folder, refusing anything the
manifest does not list, any link, device or path outside ``bundle/``, a size or
sha256 that differs, or a listed file that never comes (a truncated copy), with
one line for a person. It never writes outside the folder it is given; the
caller decides what happens to it.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from runtime.bundle_format import BUNDLE_FILE, Bundle, BundleError, load_bundle
from runtime.files import atomic_path, sha256_file

ARCHIVE_FORMAT = "cytoedge-bundle-archive"
ARCHIVE_VERSION = 1
MANIFEST = "MANIFEST.json"
ROOT = "bundle"
SUFFIX = ".bundle.tar"
_MANIFEST_LIMIT = 4 << 20  # a manifest lists files; it is never this large
_CHUNK = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class BundleArchiveError(BundleError):
    """An archive that cannot be installed; the message is one line naming the archive."""


def archive_name(bundle: Bundle) -> str:
    """``<name>-<version>.bundle.tar``, in characters any file system takes."""
    return f"{folder_name(bundle)}{SUFFIX}"


def folder_name(bundle: Bundle) -> str:
    """``<name>-<version>``: how installed versions are named beside each other."""
    return _UNSAFE.sub("_", f"{bundle.name}-{bundle.version}").strip("._") or "bundle"


def pack_bundle(bundle_dir: Path, out: Path) -> Path:
    """Verify ``bundle_dir`` and write its archive to ``out`` (a folder: the archive's
    own name inside it); the path written. Raises BundleError for a bundle that does
    not verify."""
    bundle = load_bundle(bundle_dir)
    target = out / archive_name(bundle) if out.is_dir() else out
    members = {BUNDLE_FILE: (bundle.sha256, (bundle.path / BUNDLE_FILE).stat().st_size)}
    members.update({rel: (entry.sha256, entry.bytes) for rel, entry in bundle.files.items()})
    manifest = {
        "format": ARCHIVE_FORMAT,
        "archive_version": ARCHIVE_VERSION,
        "bundle": {
            "name": bundle.name,
            "version": bundle.version,
            "sha256": bundle.sha256,
            "intended_use": bundle.intended_use,
        },
        "files": {
            f"{ROOT}/{rel}": {"sha256": sha, "bytes": size}
            for rel, (sha, size) in sorted(members.items())
        },
    }
    data = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    with atomic_path(target) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_member(MANIFEST, len(data)), io.BytesIO(data))
        for rel, (_, size) in sorted(members.items()):
            with (bundle.path / rel).open("rb") as handle:
                tar.addfile(_member(f"{ROOT}/{rel}", size), handle)
    return target


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A plain file entry with fixed owner, mode and time, so packing is reproducible."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    return info


def unpack_bundle(archive: Path, into: Path) -> Bundle:
    """Verify every member of ``archive`` while writing it under ``into`` (an empty
    folder) and load the bundle it holds with every check; BundleArchiveError, with
    ``into`` left to the caller to remove, when anything does not match."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            manifest = _manifest(tar, archive)
            expected: dict[str, dict[str, Any]] = manifest["files"]
            seen: set[str] = set()
            while (member := tar.next()) is not None:  # the members after the manifest
                name = _checked_name(member, archive, expected, seen)
                seen.add(name)
                _extract(tar, member, into / name, expected[name], archive)
    except BundleArchiveError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise _unreadable(archive, exc) from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise BundleArchiveError(
            f"{archive.name}: {len(missing)} listed file(s) are missing (first: {missing[0]}); "
            "the copy is incomplete"
        )
    try:
        bundle = load_bundle(into / ROOT)
    except BundleError as exc:
        raise BundleArchiveError(f"{archive.name}: {exc}") from None
    if bundle.sha256 != manifest["bundle"].get("sha256"):
        raise BundleArchiveError(f"{archive.name}: bundle.json is not the one the manifest names")
    return bundle


def _manifest(tar: tarfile.TarFile, archive: Path) -> dict[str, Any]:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isreg():
        raise BundleArchiveError(f"{archive.name}: not a bundle archive (no {MANIFEST} first)")
    if first.size > _MANIFEST_LIMIT:
        raise BundleArchiveError(f"{archive.name}: {MANIFEST} is implausibly large")
    handle = tar.extractfile(first)
    assert handle is not None  # a regular file
    try:
        manifest = json.loads(handle.read())
    except (ValueError, UnicodeDecodeError):
        raise BundleArchiveError(f"{archive.name}: {MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise BundleArchiveError(f"{archive.name}: not a cytoedge bundle archive")
    if manifest.get("archive_version") != ARCHIVE_VERSION:
        raise BundleArchiveError(
            f"{archive.name}: archive version {manifest.get('archive_version')!r} is not "
            f"supported (this cytoedge reads {ARCHIVE_VERSION})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("bundle"), dict):
        raise BundleArchiveError(f"{archive.name}: {MANIFEST} lists no files")
    for name, entry in files.items():
        pure = PurePosixPath(name)
        if (
            pure.is_absolute()
            or ".." in pure.parts
            or pure.parts[0] != ROOT
            or len(pure.parts) < 2
            or not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("bytes"), int)
        ):
            raise BundleArchiveError(f"{archive.name}: {MANIFEST} has a bad entry {name!r}")
    return manifest


def _checked_name(
    member: tarfile.TarInfo, archive: Path, expected: dict[str, Any], seen: set[str]
) -> str:
    if not member.isreg():
        raise BundleArchiveError(f"{archive.name}: {member.name} is not a plain file")
    if member.name not in expected:
        raise BundleArchiveError(f"{archive.name}: {member.name} is not in the manifest")
    if member.name in seen:
        raise BundleArchiveError(f"{archive.name}: {member.name} appears twice")
    return member.name


def _extract(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    target: Path,
    entry: dict[str, Any],
    archive: Path,
) -> None:
    if member.size != entry["bytes"]:
        raise BundleArchiveError(
            f"{archive.name}: {member.name} holds {member.size} bytes, the manifest "
            f"records {entry['bytes']}"
        )
    source = tar.extractfile(member)
    assert source is not None  # a regular file
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        shutil.copyfileobj(source, out, _CHUNK)
    if target.stat().st_size != entry["bytes"]:
        raise BundleArchiveError(f"{archive.name}: {member.name} is cut short (truncated copy)")
    if sha256_file(target) != entry["sha256"]:
        raise BundleArchiveError(
            f"{archive.name}: {member.name}: sha256 does not match the manifest "
            "(changed or corrupt)"
        )


def _unreadable(archive: Path, exc: BaseException) -> BundleArchiveError:
    if isinstance(exc, FileNotFoundError):
        return BundleArchiveError(f"{archive}: no such file")
    if isinstance(exc, OSError) and not isinstance(exc, tarfile.TarError):
        return BundleArchiveError(f"{archive}: cannot read it ({exc.strerror or 'I/O error'})")
    return BundleArchiveError(
        f"{archive.name}: not a readable bundle archive (truncated or damaged)"
    )
