from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import Config, ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cytoedge.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_live_under_the_data_directory(isolated_data_dir: Path) -> None:
    config = load_config()
    assert config.source is None
    assert config.inbox == isolated_data_dir / "inbox"
    assert config.outbox == isolated_data_dir / "outbox"
    assert config.bundle_dir == isolated_data_dir / "bundles" / "demo"
    config.ensure_dirs()
    assert config.inbox.is_dir() and config.outbox.is_dir() and config.log_dir.is_dir()


def test_a_valid_file_overrides_defaults(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    path = write(
        tmp_path,
        f'[paths]\ninbox = "{inbox}"\n[runtime]\nbackend = "ort-cpu"\nthreads = 2\n'
        "[watch]\nquiet_seconds = 3\npolling = true\n",
    )
    config = load_config(path)
    assert config.source == path
    assert config.inbox == inbox
    assert config.runtime.backend == "ort-cpu" and config.runtime.threads == 2
    assert config.watch.quiet_seconds == 3.0 and isinstance(config.watch.quiet_seconds, float)
    assert config.watch.polling is True


def test_config_file_found_through_environment(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path, '[logging]\nlevel = "DEBUG"\n')
    monkeypatch.setenv("CYTOEDGE_CONFIG", str(path))
    assert load_config().logging.level == "DEBUG"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[paths]\ninboxx = 'x'\n", "unknown key paths.inboxx"),
        ("[nonsense]\na = 1\n", "unknown section [nonsense]"),
        ("[runtime]\nthreads = 'two'\n", "runtime.threads must be an integer"),
        ("[watch]\npolling = 1\n", "watch.polling must be true or false"),
        ("[runtime]\nbackend = 'cuda'\n", "runtime.backend must be one of"),
        ("[watch]\nquiet_seconds = -1\n", "watch.quiet_seconds must not be negative"),
        ("[paths]\ninbox = '/no/such/dir/here'\n", "paths.inbox: directory /no/such/dir/here"),
        ("[paths\n", "not valid TOML"),
        ("paths = 3\n", "[paths] must be a table"),
    ],
)
def test_bad_files_give_one_line_naming_file_and_key(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert fragment in message
    assert str(path) in message
    assert "\n" not in message


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_config_is_immutable() -> None:
    with pytest.raises(AttributeError):
        Config().runtime.threads = 3  # type: ignore[misc]


def test_named_cameras_are_checked_and_become_the_readers_calibration(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[scan]\ncamera = "bench1-100x"\n'
        '[cameras.bench1-100x]\npixel_size_um = 0.075\ndescription = "Olympus CX43, 100x oil"\n'
        "[cameras.bench2-40x]\npixel_size_um = 0.18\n",
    )
    config = load_config(path)
    assert config.cameras["bench1-100x"].description == "Olympus CX43, 100x oil"
    calibration = config.calibration
    assert calibration.camera == "bench1-100x" and calibration.pixel_size_um == 0.0
    assert dict(calibration.cameras) == {"bench1-100x": 0.075, "bench2-40x": 0.18}
    assert Config().calibration.cameras == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[scan]\ncamera = "nowhere"\n', r"scan.camera names 'nowhere'.*\[cameras.nowhere\]"),
        ("[cameras.x]\npixel_size_um = 75\n", "cameras.x.pixel_size_um must be the measured"),
        ("[cameras.x]\nmagnification = 100\n", "unknown key cameras.x.magnification"),
        ("[cameras]\nx = 0.075\n", r"\[cameras.x\] must be a table"),
        ('[cameras."a b"]\npixel_size_um = 0.1\n', "a camera name is letters"),
    ],
)
def test_a_bad_camera_section_stops_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(write(tmp_path, text))
    assert "\n" not in str(caught.value)


def test_the_training_folder_of_relabelled_cells(tmp_path: Path, isolated_data_dir: Path) -> None:
    assert load_config().training_cells_dir == isolated_data_dir / "training" / "cells"
    folder = tmp_path / "labels"
    folder.mkdir()
    config = load_config(write(tmp_path, f'[paths]\ntraining_cells = "{folder}"\n'))
    assert config.training_cells_dir == folder
    with pytest.raises(ConfigError, match=r"paths\.training_cells: directory /no/such/dir"):
        load_config(write(tmp_path, '[paths]\ntraining_cells = "/no/such/dir"\n'))
