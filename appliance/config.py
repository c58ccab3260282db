"""One TOML configuration file, validated on load.

The file is found from ``--config``, else ``$CYTOEDGE_CONFIG``, else
``<data_dir>/cytoedge.toml`` when it exists; with none, the defaults apply.
Every section is a frozen dataclass: its fields are the only keys allowed, and
their annotations are the types checked. A bad file raises ``ConfigError``
whose message is one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.backends import AUTO, RuntimeSettings, TritonSettings, backend_names

if TYPE_CHECKING:  # the readers' package loads tifffile: not for every command's start
    from appliance.readers.pixel_size import Calibration

CONFIG_ENV = "CYTOEDGE_CONFIG"
DATA_ENV = "CYTOEDGE_DATA"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The link to the installed bundle in use, beside the installed versions
# (appliance.site.installed_bundles).
CURRENT_BUNDLE = "current"
CAMERA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# What `bundle install` and `bundle use` do with a bundle no trusted key signed
# (appliance.site.bundle_trust): refuse it, take it with a warning on every result, or
# not check signatures at all. An installed site's file sets "require".
SIGNATURE_POLICIES = ("require", "warn", "off")
TRUSTED_KEYS = "trusted-keys"
# What a workstation does when the Triton server cannot run a network (runtime.backends.triton).
TRITON_FALLBACKS = ("none", "local")
FINGERPRINT = re.compile(r"[0-9a-f]{16}|[0-9a-f]{64}")


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message is one line."""


def default_data_dir() -> Path:
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "cytoedge"


@dataclass(frozen=True)
class PathsConfig:
    # Empty means "derive from data_dir"; see Config.resolved().
    data_dir: str = ""
    inbox: str = ""
    outbox: str = ""
    bundle: str = ""
    archive: str = ""
    fhir_outbox: str = ""  # where signed-off results are written as FHIR for the LIS
    training_cells: str = ""  # re-labelled cells, the class folders `cytoedge train` reads


@dataclass(frozen=True)
class RuntimeConfig:
    backend: str = AUTO  # or one of runtime.backends.backend_names()
    threads: int = 0  # 0: one per core
    encoder_batch: int = 0  # 0: the backend's own best batch size
    measure_on_start: bool = True  # time the CPU paths before the first job with a bundle
    # [runtime.triton]: the lab's inference server, for backend = "triton" (docs/triton.md)
    triton: TritonSettings = field(default_factory=TritonSettings)

    @property
    def settings(self) -> RuntimeSettings:
        """What the runtime is given: one value for every network the site runs."""
        return RuntimeSettings(self.backend, self.threads, self.encoder_batch, triton=self.triton)


@dataclass(frozen=True)
class WatchConfig:
    quiet_seconds: float = 10.0
    case_quiet_seconds: float = 300.0
    rescan_seconds: float = 60.0
    polling: bool = False
    case_pattern: str = ""


@dataclass(frozen=True)
class ServiceConfig:
    max_attempts: int = 5  # tries of a job that fails with a transient error
    retry_seconds: float = 10.0  # first retry delay; doubles each attempt, at most 10 min
    stop_grace_seconds: float = 20.0  # on SIGTERM, time for the current job to finish


@dataclass(frozen=True)
class ScanConfig:
    # Pixel size for plain images that carry none and have no sidecar; 0: reject them.
    pixel_size_um: float = 0.0
    # A named [cameras.<name>] calibration for such images instead (before pixel_size_um).
    camera: str = ""


@dataclass(frozen=True)
class CameraConfig:
    """One microscope camera and objective, measured once with a stage micrometer."""

    pixel_size_um: float = 0.0
    description: str = ""


@dataclass(frozen=True)
class BundlesConfig:
    policy: str = "warn"  # SIGNATURE_POLICIES
    revoked_keys: list[str] = field(default_factory=list)  # fingerprints (16 or 64 hex digits)
    signing_key: str = ""  # this site's private key: signs the versions train / validate write


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    max_bytes: int = 10_000_000
    backups: int = 5


@dataclass(frozen=True)
class AuditConfig:
    # audit.jsonl is renamed audit-000001.jsonl (the next number) once this large; 0: never.
    max_bytes: int = 10_000_000


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    bundles: BundlesConfig = field(default_factory=BundlesConfig)
    cameras: dict[str, CameraConfig] = field(default_factory=dict)  # [cameras.<name>]
    source: Path | None = None  # the file it was read from, None for defaults

    @property
    def calibration(self) -> Calibration:
        """What the readers fall back on for files without a pixel size of their own."""
        from appliance.readers.pixel_size import Calibration

        return Calibration(
            pixel_size_um=self.scan.pixel_size_um,
            camera=self.scan.camera,
            cameras={name: camera.pixel_size_um for name, camera in self.cameras.items()},
        )

    @property
    def data_dir(self) -> Path:
        return Path(self.paths.data_dir).expanduser() if self.paths.data_dir else default_data_dir()

    @property
    def inbox(self) -> Path:
        return self._path_or(self.paths.inbox, "inbox")

    @property
    def outbox(self) -> Path:
        return self._path_or(self.paths.outbox, "outbox")

    @property
    def bundles_root(self) -> Path:
        """Where ``cytoedge bundle install`` keeps installed versions side by side."""
        return self.data_dir / "bundles"

    @property
    def config_dir(self) -> Path:
        """The folder of the configuration file; the data directory without one."""
        return self.source.parent if self.source is not None else self.data_dir

    @property
    def trusted_keys_dir(self) -> Path:
        """The public keys whose bundle signatures this site trusts, one ``<name>.pub`` each."""
        return self.config_dir / TRUSTED_KEYS

    @property
    def bundle_dir(self) -> Path:
        """``paths.bundle``; left empty, the installed version in use (the ``current``
        link `cytoedge bundle install / use` switch), else the demo bundle's folder."""
        if self.paths.bundle:
            return Path(self.paths.bundle).expanduser()
        current = self.bundles_root / CURRENT_BUNDLE
        return current if current.is_symlink() else self.bundles_root / "demo"

    @property
    def fhir_outbox(self) -> Path:
        return self._path_or(self.paths.fhir_outbox, "fhir-outbox")

    @property
    def training_cells_dir(self) -> Path:
        """Where the window saves re-labelled cells (appliance.review.relabel)."""
        return self._path_or(self.paths.training_cells, "training/cells")

    @property
    def archive_dir(self) -> Path | None:
        return Path(self.paths.archive).expanduser() if self.paths.archive else None

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def state_dir(self) -> Path:
        return self.data_dir / "state"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    def _path_or(self, value: str, default_below_data: str) -> Path:
        return Path(value).expanduser() if value else self.data_dir / default_below_data

    def ensure_dirs(self) -> None:
        """Create the directories the defaults put under the data directory."""
        for path in (self.data_dir, self.inbox, self.outbox, self.log_dir, self.state_dir):
            path.mkdir(parents=True, exist_ok=True)


# Values checked beyond their type: (section, key) -> allowed values.
_CHOICES: dict[tuple[str, str], Callable[[], tuple[str, ...]]] = {
    ("runtime", "backend"): lambda: (AUTO, *backend_names()),
    ("logging", "level"): lambda: LOG_LEVELS,
    ("bundles", "policy"): lambda: SIGNATURE_POLICIES,
    ("runtime.triton", "fallback"): lambda: TRITON_FALLBACKS,
}
# Paths that, when set in the file, must already exist (defaults are created).
_MUST_EXIST = {
    ("paths", "data_dir"),
    ("paths", "inbox"),
    ("paths", "outbox"),
    ("paths", "archive"),
    ("paths", "fhir_outbox"),
    ("paths", "training_cells"),
}


def find_config_file(explicit: Path | None = None) -> Path | None:
    if explicit is not None:
        return explicit
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    candidate = default_data_dir() / "cytoedge.toml"
    return candidate if candidate.is_file() else None


def load_config(path: Path | None = None) -> Config:
    """Load and validate the configuration; defaults when no file is found."""
    source = find_config_file(path)
    if source is None:
        return Config()
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return _build(raw, source)


def _build(raw: dict[str, Any], source: Path) -> Config:
    sections: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for name, value in raw.items():
        if name == "source" or name not in hints:
            raise ConfigError(f"{source}: unknown section [{name}]")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        if name == "cameras":
            sections[name] = _build_cameras(value, source)
        else:
            sections[name] = _build_section(name, hints[name], value, source)
    config = Config(**sections, source=source)
    if config.scan.camera and config.scan.camera not in config.cameras:
        raise ConfigError(
            f"{source}: scan.camera names {config.scan.camera!r}, but there is no "
            f"[cameras.{config.scan.camera}] section"
        )
    for entry in config.bundles.revoked_keys:
        if not FINGERPRINT.fullmatch(entry):
            raise ConfigError(
                f"{source}: bundles.revoked_keys: {entry!r} is not a key fingerprint "
                "(16 or 64 lower-case hex digits, as `cytoedge doctor` shows them)"
            )
    return config


def _build_cameras(tables: dict[str, Any], source: Path) -> dict[str, CameraConfig]:
    """``[cameras.<name>]`` sections: one table per camera, each with a plausible size."""
    from appliance.readers.pixel_size import plausible

    cameras = {}
    for name, table in tables.items():
        where = f"cameras.{name}"
        if not CAMERA_NAME.fullmatch(name):
            raise ConfigError(f"{source}: [{where}]: a camera name is letters, digits, _ . -")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{where}] must be a table with pixel_size_um")
        camera = _build_section(where, CameraConfig, table, source)
        if not plausible(camera.pixel_size_um):
            raise ConfigError(
                f"{source}: {where}.pixel_size_um must be the measured um per pixel "
                f"(a microscope's lies between 0.02 and 10), got {camera.pixel_size_um}"
            )
        cameras[name] = camera
    return cameras


def _build_section(name: str, cls: type, values: dict[str, Any], source: Path) -> Any:
    hints = typing.get_type_hints(cls)
    built = dict(values)
    for key, value in values.items():
        if key not in hints:
            allowed = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ConfigError(f"{source}: unknown key {name}.{key} (allowed: {allowed})")
        expected = hints[key]
        if dataclasses.is_dataclass(expected) and isinstance(expected, type):
            # A table inside the section ([runtime.triton]): its own keys, checked the same way.
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{name}.{key}] must be a table")
            built[key] = _build_section(f"{name}.{key}", expected, value, source)
            continue
        if not _type_ok(value, expected):
            raise ConfigError(
                f"{source}: {name}.{key} must be {_type_name(expected)}, "
                f"got {type(value).__name__} {value!r}"
            )
        allowed = _CHOICES.get((name, key))
        choices = allowed() if allowed else ()
        if choices and value not in choices:
            raise ConfigError(f"{source}: {name}.{key} must be one of {', '.join(choices)}")
        if (name, key) in _MUST_EXIST and value and not Path(value).expanduser().is_dir():
            raise ConfigError(f"{source}: {name}.{key}: directory {value} does not exist")
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{source}: {name}.{key} must not be negative")
    return cls(**{k: float(v) if hints[k] is float else v for k, v in built.items()})


def _type_ok(value: Any, expected: Any) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(expected, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(expected))
    if typing.get_origin(expected) is list:
        (item,) = typing.get_args(expected)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
    names = {bool: "true or false", float: "a number", int: "an integer", str: "a string"}
    if typing.get_origin(expected) is list:
        return f"a list of {_type_name(typing.get_args(expected)[0]).removeprefix('a ')}s"
    return names.get(expected, str(expected))
