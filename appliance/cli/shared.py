"""What every ``cytoedge`` command shares: the ``--config`` option, one-line failures,
and loading the configuration with logging started.

Command groups from other distributions (``cytoedge-demo``: ``demo``, ``bench``)
import these too, so that every command treats a bad configuration the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from appliance.config import Config, ConfigError, load_config
from appliance.logs import setup_logging

if TYPE_CHECKING:
    from runtime.bundle_format import Bundle

USAGE_EXIT = 2  # bad configuration, nothing to score with, a missing part

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML configuration file (default: $CYTOEDGE_CONFIG).",
        envvar="CYTOEDGE_CONFIG",
        show_envvar=False,
        dir_okay=False,
    ),
]


def fail(message: str, code: int = USAGE_EXIT) -> typer.Exit:
    """Print one line on stderr and return the Exit to raise."""
    sys.stderr.write(f"cytoedge: {message}\n")
    return typer.Exit(code)


def setup(config_path: Path | None, *, log_to_file: bool = True) -> Config:
    """Load the configuration and start logging; a bad file exits 2 with one line."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    try:
        config.ensure_dirs()
    except OSError as exc:
        raise fail(f"cannot create the data directories: {exc}") from None
    setup_logging(
        config.log_dir if log_to_file else None,
        config.logging.level,
        config.logging.max_bytes,
        config.logging.backups,
    )
    return config


def check_signing_key(config: Config) -> None:
    """Open the site's signing key (``bundles.signing_key``) before a command that writes
    a version spends its time; a key that cannot be used exits 2 with one line."""
    from appliance.site.bundle_trust import TrustError, site_signing_key

    try:
        site_signing_key(config)
    except TrustError as exc:
        raise fail(str(exc)) from None


def sign_written_version(config: Config, bundle: Bundle) -> str:
    """Sign a version this site wrote (``train``, ``validate --recalibrate``) with the
    site's key when it has one, as ``bundle install`` would record it; the line to print."""
    from appliance.site.bundle_trust import TrustError, sign_new_version

    try:
        verdict = sign_new_version(bundle, config)
    except TrustError as exc:
        raise fail(f"{bundle.path} written but not signed: {exc}", 1) from None
    if verdict is None:
        return f"Not signed: this site has no key (bundles.signing_key in {config.source})"
    if verdict.signer is not None:
        return f"Signed by this site's key {verdict.signer}"
    return f"Signed with bundles.signing_key, but {verdict.reason} ({config.trusted_keys_dir})"
