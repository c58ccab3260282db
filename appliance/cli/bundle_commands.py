"""``cytoedge bundle ...``: a bundle as one file, carried to a site, installed and switched.

``pack`` (the model owner) writes the archive; ``install`` (the site) verifies it,
unpacks it beside the installed versions and switches to it once every network
loads and runs here; ``use`` goes back (or forward) to an installed version;
``list`` shows them. A running service takes up the switch between jobs.
"""

from __future__ import annotations

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


@bundle_app.command()
def install(
    archive: Annotated[Path, typer.Argument(help="A .bundle.tar written by `bundle pack`.")],
    config: ConfigOption = None,
) -> None:
    """Verify an archive, install it beside the installed versions, and use it once every
    network loads and runs here; the version in use before stays for `bundle use`."""
    from appliance.site.installed_bundles import InstallError, install_archive, switchable_root

    cfg = setup(config, log_to_file=False)
    try:
        root = switchable_root(cfg)
        previous = _in_use(root)
        installed, new = install_archive(archive, root, _checks(cfg))
    except InstallError as exc:
        raise fail(str(exc), REFUSED_EXIT) from None
    what = "installed" if new else "already installed"
    print(f"{installed.name} {installed.version} {what} in {installed.folder}; now in use")
    if previous and previous != installed.folder.name:
        print(f"previous version kept: {previous} (`cytoedge bundle use {previous}` goes back)")


@bundle_app.command()
def use(
    version: Annotated[str, typer.Argument(help="An installed version (`cytoedge bundle list`).")],
    config: ConfigOption = None,
) -> None:
    """Switch to an installed version, after verifying it again and loading its networks."""
    from appliance.site.installed_bundles import InstallError, switchable_root, use_version

    cfg = setup(config, log_to_file=False)
    try:
        installed = use_version(switchable_root(cfg), version, _checks(cfg))
    except InstallError as exc:
        raise fail(str(exc), REFUSED_EXIT) from None
    print(f"{installed.name} {installed.version} ({installed.folder.name}) now in use")


@bundle_app.command(name="list")
def list_versions(config: ConfigOption = None) -> None:
    """The installed versions; the one in use is marked."""
    from rich.console import Console
    from rich.table import Table

    from appliance.site.installed_bundles import installed_versions

    cfg = setup(config, log_to_file=False)
    versions = installed_versions(cfg.bundles_root)
    if not versions:
        print(f"no bundle installed in {cfg.bundles_root} (`cytoedge bundle install FILE`)")
        return
    table = Table(title=f"Bundles in {cfg.bundles_root}")
    for column in ("in use", "version (`bundle use`)", "name", "bundle version", "use", "sha256"):
        table.add_column(column)
    for item in versions:
        table.add_row(
            "*" if item.in_use else "",
            item.folder.name,
            item.name,
            item.version,
            item.intended_use,
            item.sha256[:12],
        )
    Console().print(table)


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
