"""``cytoedge bundle ...``: a bundle as one file, carried to a site, installed and switched.

``keygen`` writes the model owner's key pair and ``pack`` and ``sign`` the archive;
``install`` (the site) checks its signature against the keys the site trusts, verifies
it, unpacks it beside the installed versions and switches to it once every network
loads and runs here; ``use`` goes back (or forward) to an installed version;
``list`` shows them. A running service takes up the switch between jobs.
``triton-repo`` writes a bundle's networks for a Triton inference server (docs/triton.md).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from appliance.cli.shared import ConfigOption, fail, setup

if TYPE_CHECKING:
    from appliance.config import Config
    from appliance.site.installed_bundles import CheckFn
    from runtime.bundle_format import Bundle

REFUSED_EXIT = 1

bundle_app = typer.Typer(
    help="Model bundles as one file: pack, install, switch between installed versions.",
    no_args_is_help=True,
)


@bundle_app.command()
def pack(
    bundle: Annotated[Path, typer.Argument(help="The bundle folder (holds bundle.json).")],
    out: Annotated[
        Path,
        typer.Option(help="Archive file, or a folder to write <name>-<version>.bundle.tar in."),
    ] = Path("."),
) -> None:
    """Verify a bundle folder and write it as one archive with its checksums."""
    from runtime.bundle_archive import pack_bundle
    from runtime.bundle_format import BundleError
    from runtime.files import sha256_file

    try:
        written = pack_bundle(bundle, out)
    except BundleError as exc:
        raise fail(f"cannot pack: {exc}", REFUSED_EXIT) from None
    size = written.stat().st_size / 1e6
    print(f"{written}  {size:.1f} MB  sha256 {sha256_file(written)}")


@bundle_app.command("triton-repo")
def triton_repo(
    bundle: Annotated[Path, typer.Argument(help="The bundle folder (holds bundle.json).")],
    out: Annotated[
        Path, typer.Argument(help="The Triton model repository (created, or added to).")
    ],
    instances: Annotated[int, typer.Option(min=1, help="Instances of each model.")] = 1,
    cpu: Annotated[bool, typer.Option("--cpu", help="Instances on the server's CPU.")] = False,
) -> None:
    """Write a bundle's networks as a Triton Inference Server model repository (one model
    per network; a newer bundle adds version folders beside the ones there)."""
    from runtime.bundle_format import BundleError, load_bundle
    from runtime.triton_repo import RepositoryError, write_repository

    try:
        loaded = load_bundle(bundle)
        number = write_repository(loaded, out, instances=instances, gpu=not cpu)
    except (BundleError, RepositoryError) as exc:
        raise fail(f"cannot write the Triton repository: {exc}", REFUSED_EXIT) from None
    except OSError as exc:
        raise fail(f"cannot write the Triton repository {out}: {exc}", REFUSED_EXIT) from None
    print(f"{loaded.name} {loaded.version} is version {number} of the models in {out}")


@bundle_app.command()
def keygen(
    name: Annotated[str, typer.Argument(help="The key's name (letters, digits, _ . -).")],
    out: Annotated[Path, typer.Option(help="Folder for <name>.key and <name>.pub.")] = Path("."),
    passphrase: Annotated[
        bool, typer.Option("--passphrase", help="Encrypt the private key; asks for it.")
    ] = False,
    expires: Annotated[
        str | None, typer.Option(help="Last day a site trusts it (YYYY-MM-DD), in <name>.pub.")
    ] = None,
) -> None:
    """Write an Ed25519 key pair for signing bundles: <name>.key (mode 0600; keep it
    secret) and <name>.pub (for the sites' trusted-keys folders)."""
    from appliance.site.signing_keys import SigningKeyError, generate_key_pair, read_trusted_key

    try:
        last_day = datetime.date.fromisoformat(expires) if expires else None
    except ValueError:
        raise fail(f"--expires {expires!r}: give a date as YYYY-MM-DD") from None
    secret = (
        typer.prompt("Passphrase", hide_input=True, confirmation_prompt=True).encode()
        if passphrase
        else None
    )
    try:
        private, public = generate_key_pair(out, name, secret, last_day)
    except (SigningKeyError, OSError) as exc:
        raise fail(f"cannot write the key pair: {exc}", REFUSED_EXIT) from None
    print(f"{private} (private, mode 0600)\n{public} (public)")
    print(f"fingerprint {read_trusted_key(public).fingerprint}")


@bundle_app.command()
def sign(
    archive: Annotated[Path, typer.Argument(help="A .bundle.tar written by `bundle pack`.")],
    key: Annotated[Path, typer.Option(help="The private key (`bundle keygen`).")],
) -> None:
    """Sign an archive's manifest (which holds every file's sha256) with a private key;
    the archive is rewritten in place with the signature after its manifest. An
    encrypted key's passphrase is asked for, or read from $CYTOEDGE_KEY_PASSPHRASE."""
    from appliance.site.bundle_trust import PASSPHRASE_ENV, signature_document
    from appliance.site.signing_keys import (
        SigningKeyError,
        fingerprint,
        is_encrypted,
        load_private_key,
    )
    from runtime.bundle_archive import read_signed_manifest, sign_archive
    from runtime.bundle_format import BundleError
    from runtime.files import sha256_file

    try:
        secret = None
        if is_encrypted(key):
            secret = os.environ.get(PASSPHRASE_ENV) or typer.prompt("Passphrase", hide_input=True)
        private = load_private_key(key, secret.encode() if secret else None)
        manifest, _ = read_signed_manifest(archive)
        sign_archive(archive, signature_document(private, manifest))
    except (SigningKeyError, BundleError) as exc:
        raise fail(f"cannot sign: {exc}", REFUSED_EXIT) from None
    print(f"{archive}  signed by key {fingerprint(private.public_key())}")
    print(f"sha256 {sha256_file(archive)}")


@bundle_app.command()
def install(
    archive: Annotated[Path, typer.Argument(help="A .bundle.tar written by `bundle pack`.")],
    config: ConfigOption = None,
) -> None:
    """Check an archive's signature (bundles.policy), verify it, install it beside the
    installed versions, and use it once every network loads and runs here; the version
    in use before stays for `bundle use`."""
    from appliance.site.bundle_trust import Trust, TrustError
    from appliance.site.installed_bundles import InstallError, install_archive, switchable_root

    cfg = setup(config, log_to_file=False)
    try:
        root = switchable_root(cfg)
        previous = _in_use(root)
        installed, new = install_archive(archive, root, _checks(cfg), Trust.of(cfg))
    except (InstallError, TrustError) as exc:
        raise fail(str(exc), REFUSED_EXIT) from None
    what = "installed" if new else "already installed"
    print(f"{installed.name} {installed.version} {what} in {installed.folder}; now in use")
    print(_signed_line(installed.folder))
    if previous and previous != installed.folder.name:
        print(f"previous version kept: {previous} (`cytoedge bundle use {previous}` goes back)")


@bundle_app.command()
def use(
    version: Annotated[str, typer.Argument(help="An installed version (`cytoedge bundle list`).")],
    config: ConfigOption = None,
) -> None:
    """Switch to an installed version, after verifying it again, checking its signature
    under today's policy and loading its networks."""
    from appliance.site.bundle_trust import Trust, TrustError
    from appliance.site.installed_bundles import InstallError, switchable_root, use_version

    cfg = setup(config, log_to_file=False)
    try:
        installed = use_version(switchable_root(cfg), version, _checks(cfg), Trust.of(cfg))
    except (InstallError, TrustError) as exc:
        raise fail(str(exc), REFUSED_EXIT) from None
    print(f"{installed.name} {installed.version} ({installed.folder.name}) now in use")
    print(_signed_line(installed.folder))


@bundle_app.command(name="list")
def list_versions(config: ConfigOption = None) -> None:
    """The installed versions; the one in use is marked."""
    from rich.console import Console
    from rich.table import Table

    from appliance.site.installed_bundles import installed_versions
    from runtime.bundle_signer import read_record

    cfg = setup(config, log_to_file=False)
    versions = installed_versions(cfg.bundles_root)
    if not versions:
        print(f"no bundle installed in {cfg.bundles_root} (`cytoedge bundle install FILE`)")
        return
    table = Table(title=f"Bundles in {cfg.bundles_root}")
    columns = ("in use", "version (`bundle use`)", "name", "bundle version", "use", "sha256")
    for column in (*columns, "signed by"):
        table.add_column(column)
    for item in versions:
        signed = read_record(item.folder)
        table.add_row(
            "*" if item.in_use else "",
            item.folder.name,
            item.name,
            item.version,
            item.intended_use,
            item.sha256[:12],
            str(signed.signer) if signed.signer else f"- ({signed.reason})",
        )
    Console().print(table)


def _signed_line(folder: Path) -> str:
    from runtime.bundle_signer import read_record

    signed = read_record(folder)
    if signed.signer is not None:
        return f"signed by {signed.signer}"
    return f"{signed.warning or 'signature not checked'}: {signed.reason}"


def _in_use(root: Path) -> str | None:
    from appliance.site.installed_bundles import installed_versions

    return next((v.folder.name for v in installed_versions(root) if v.in_use), None)


def _checks(config: Config) -> CheckFn:
    """doctor's network checks with the site's runtime settings, as problems to list."""
    from appliance.site.doctor import check_networks

    def problems(bundle: Bundle) -> list[str]:
        checks = check_networks(bundle, config.runtime.settings)
        return [f"{check.label}: {check.problem}" for check in checks if check.problem]

    return problems
