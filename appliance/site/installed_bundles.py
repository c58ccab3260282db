"""Installed bundle versions side by side, and the one in use.

Each version lives in ``<data_dir>/bundles/<name>-<version>/``; ``current`` beside
them is a symbolic link to the one in use, replaced in one rename, so every
reader (the service between jobs, ``cytoedge score``, the window, ``doctor``)
sees either the old bundle or the new one, never a mix. The configuration
names that link (``paths.bundle`` empty, or set to it). A version is only
switched to once it verified and every network loaded and ran a test input on
this machine; the versions before stay for ``cytoedge bundle use``. Before anything
is unpacked, the archive's signature is checked against the keys this site trusts
and the site's policy applied (appliance.site.bundle_trust); ``use`` checks an
installed version's signature again under the policy of the day, and both keep the
verdict in the version's folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.config import CURRENT_BUNDLE, Config
from appliance.site.bundle_trust import Trust, TrustError, check_folder, write_record
from runtime.bundle_archive import (
    folder_name,
    manifest_bytes,
    read_signed_manifest,
    unpack_bundle,
)
from runtime.bundle_format import Bundle, BundleError, load_bundle

STAGING_PREFIX = ".incoming-"
# Problems that stop a switch, one line each ("" when none): doctor's network checks.
CheckFn = Callable[[Bundle], list[str]]


class InstallError(ValueError):
    """A bundle that cannot be installed or used; the message is one line."""


@dataclass(frozen=True)
class Installed:
    """One installed version: ``folder``'s name is what ``cytoedge bundle use`` takes."""

    folder: Path
    name: str
    version: str
    intended_use: str
    sha256: str
    in_use: bool


def switchable_root(config: Config) -> Path:
    """The folder of installed versions, when the configuration follows its ``current``
    link; InstallError naming the key when it names another bundle."""
    root = config.bundles_root
    current = root / CURRENT_BUNDLE
    if config.paths.bundle and Path(config.paths.bundle).expanduser() != current:
        raise InstallError(
            f"paths.bundle in {config.source} names {config.paths.bundle}; set it to {current} "
            "(or leave it empty) so that installed bundles can be switched"
        )
    return root


def installed_versions(root: Path) -> list[Installed]:
    """Every installed version (its files not re-hashed), by folder name."""
    in_use = _current_target(root)
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".") or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            bundle = load_bundle(folder, verify_files=False)
        except BundleError:
            continue
        found.append(_installed(bundle, folder, folder == in_use))
    return found


def install_archive(
    archive: Path, root: Path, check: CheckFn, trust: Trust
) -> tuple[Installed, bool]:
    """Check ``archive``'s signature against ``trust``, verify and unpack it beside the
    installed versions and switch to it once ``check`` finds nothing wrong; (the
    version now in use, whether it was new).

    Anything wrong raises InstallError and leaves the installed versions and the one
    in use exactly as they were.
    """
    with _locked(root):
        try:
            manifest, signature = read_signed_manifest(archive)
            verdict = trust.check(manifest, signature)
            trust.admit(verdict, archive.name)
        except (BundleError, TrustError) as exc:
            raise InstallError(str(exc)) from None
        staging = Path(tempfile.mkdtemp(dir=root, prefix=STAGING_PREFIX))
        try:
            try:
                bundle = unpack_bundle(archive, staging)
            except BundleError as exc:
                raise InstallError(str(exc)) from None
            if verdict.signer is not None and manifest_bytes(bundle) != manifest:
                # What was unpacked is what was signed, and `use` can check it again.
                raise InstallError(
                    f"{archive.name}: the signed manifest is not the unpacked bundle's "
                    "(the file changed while it was read, or was not packed by `bundle pack`)"
                )
            target = root / folder_name(bundle)
            new = not target.exists()
            if not new:
                _same_bundle(target, bundle)
                bundle = _verified(target)
            _require_checks(bundle, check)
            write_record(bundle.path, verdict, trust)
            if new:
                os.rename(bundle.path, target)
            _switch(root, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return _installed(load_bundle(target, verify_files=False), target, True), new


def use_version(root: Path, handle: str, check: CheckFn, trust: Trust) -> Installed:
    """Switch to an installed version (its folder name, or its version when only one
    has it) after verifying it again, checking its signature under ``trust`` and
    running ``check``."""
    with _locked(root):
        versions = installed_versions(root)
        matches = [v for v in versions if handle == v.folder.name] or [
            v for v in versions if handle == v.version
        ]
        if len(matches) != 1:
            names = ", ".join(v.folder.name for v in versions) or "none"
            what = "more than one" if matches else "no"
            raise InstallError(f"{what} installed bundle is called {handle!r} (installed: {names})")
        target = matches[0].folder
        bundle = _verified(target)
        verdict = check_folder(bundle, trust)
        try:
            trust.admit(verdict, f"installed version {target.name}")
        except TrustError as exc:
            raise InstallError(str(exc)) from None
        _require_checks(bundle, check)
        write_record(target, verdict, trust)
        _switch(root, target)
        return _installed(bundle, target, True)


def _installed(bundle: Bundle, folder: Path, in_use: bool) -> Installed:
    return Installed(
        folder, bundle.name, bundle.version, bundle.intended_use, bundle.sha256, in_use
    )


def _current_target(root: Path) -> Path | None:
    link = root / CURRENT_BUNDLE
    return root / os.readlink(link) if link.is_symlink() else None


def _verified(folder: Path) -> Bundle:
    try:
        return load_bundle(folder)
    except BundleError as exc:
        raise InstallError(f"installed version {folder.name} no longer verifies: {exc}") from None


def _same_bundle(target: Path, bundle: Bundle) -> None:
    try:
        installed = load_bundle(target, verify_files=False)
    except BundleError:
        installed = None
    if installed is None or installed.sha256 != bundle.sha256:
        raise InstallError(
            f"{target.name} is installed already with other content; a changed bundle "
            "needs a new version (or remove that folder first)"
        )


def _require_checks(bundle: Bundle, check: CheckFn) -> None:
    problems = check(bundle)
    if problems:
        raise InstallError(
            f"{bundle.name} {bundle.version} cannot run here ({'; '.join(problems)}); "
            "the bundle in use is unchanged"
        )


def _switch(root: Path, target: Path) -> None:
    """Point ``current`` at ``target`` in one rename (a relative link: the data
    directory may move)."""
    link = root / CURRENT_BUNDLE
    temporary = root / f".{CURRENT_BUNDLE}.{os.getpid()}"
    temporary.unlink(missing_ok=True)
    os.symlink(target.name, temporary)
    os.replace(temporary, link)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One install or switch at a time; staging left by an interrupted one is removed."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in root.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
