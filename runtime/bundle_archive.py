"""A bundle as one file to carry: a tar archive with a manifest of checksums.

``pack_bundle`` verifies a bundle folder and writes ``<name>-<version>.bundle.tar``:
``MANIFEST.json`` first (what the archive holds, each file's sha256 and size),
then ``bundle/bundle.json`` and every file it lists (``engines/`` is built per
GPU on site and never shipped). The archive is reproducible: the same bundle
packs to the same bytes, and the manifest is a function of the bundle alone
(``manifest_bytes``), so a signature over it can be checked again later against
an unpacked folder.

``sign_archive`` puts ``MANIFEST.sig`` right after the manifest (what it holds is
the signer's business: appliance.site.bundle_trust); ``read_signed_manifest``
reads those two members back without unpacking anything.

``unpack_bundle`` reads an archive into an empty folder, refusing anything the
manifest does not list, any link, device or path outside ``bundle/``, a size or
sha256 that differs, or a listed file that never comes (a truncated copy), with
one line for a person (``MANIFEST.sig`` is the one member it takes without a
listing, and only right after the manifest). It never writes outside the folder it is given; the
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
SIGNATURE = "MANIFEST.sig"
ROOT = "bundle"
SUFFIX = ".bundle.tar"
_MANIFEST_LIMIT = 4 << 20  # a manifest lists files; it is never this large
_SIGNATURE_LIMIT = 64 << 10  # a key's fingerprint and one signature
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
    data = manifest_bytes(bundle)
    with atomic_path(target) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_member(MANIFEST, len(data)), io.BytesIO(data))
        for name, entry in json.loads(data)["files"].items():
            with (bundle.path / PurePosixPath(name).relative_to(ROOT)).open("rb") as handle:
                tar.addfile(_member(name, entry["bytes"]), handle)
    return target


def manifest_bytes(bundle: Bundle) -> bytes:
    """The exact ``MANIFEST.json`` that packing ``bundle`` writes (what a signature covers)."""
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
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def read_signed_manifest(archive: Path) -> tuple[bytes, bytes | None]:
    """The archive's ``MANIFEST.json`` bytes (checked as ``unpack_bundle`` checks them)
    and its ``MANIFEST.sig`` bytes, None when it has none; nothing is unpacked."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            data, _ = _manifest(tar, archive)
            member = tar.next()
            if member is None or member.name != SIGNATURE:
                return data, None
            return data, _signature(tar, member, archive)
    except BundleArchiveError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise _unreadable(archive, exc) from None


def sign_archive(archive: Path, signature: bytes) -> None:
    """Rewrite ``archive`` in place (one rename) with ``signature`` as ``MANIFEST.sig``
    after the manifest, replacing any signature it had; the other members are copied
    byte for byte, so the signed archive is as reproducible as the packed one."""
    try:
        with (
            tarfile.open(archive, "r:*") as source,
            atomic_path(archive) as tmp,
            tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar,
        ):
            data, _ = _manifest(source, archive)
            tar.addfile(_member(MANIFEST, len(data)), io.BytesIO(data))
            tar.addfile(_member(SIGNATURE, len(signature)), io.BytesIO(signature))
            while (member := source.next()) is not None:
                if member.name == SIGNATURE:
                    continue
                if not member.isreg():
                    raise BundleArchiveError(f"{archive.name}: {member.name} is not a plain file")
                tar.addfile(_member(member.name, member.size), source.extractfile(member))
    except BundleArchiveError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise _unreadable(archive, exc) from None


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
            _, manifest = _manifest(tar, archive)
            expected: dict[str, dict[str, Any]] = manifest["files"]
            seen: set[str] = set()
            first = True
            while (member := tar.next()) is not None:  # the members after the manifest
                if first and member.name == SIGNATURE:  # checked before unpacking, if at all
                    first = False
                    continue
                first = False
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


def _manifest(tar: tarfile.TarFile, archive: Path) -> tuple[bytes, dict[str, Any]]:
    """The first member's bytes and what they say, checked."""
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isreg():
        raise BundleArchiveError(f"{archive.name}: not a bundle archive (no {MANIFEST} first)")
    if first.size > _MANIFEST_LIMIT:
        raise BundleArchiveError(f"{archive.name}: {MANIFEST} is implausibly large")
    handle = tar.extractfile(first)
    assert handle is not None  # a regular file
    data = handle.read()
    try:
        manifest = json.loads(data)
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
    return data, manifest


def _signature(tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path) -> bytes:
    if not member.isreg() or member.size > _SIGNATURE_LIMIT:
        raise BundleArchiveError(f"{archive.name}: {SIGNATURE} is not a signature")
    handle = tar.extractfile(member)
    assert handle is not None  # a regular file
    return handle.read()


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
