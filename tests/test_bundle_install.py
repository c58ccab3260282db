"""``cytoedge bundle install / use / list``: a version is switched to only once it verified
and runs here; anything refused changes nothing; the version before stays for rollback."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest

from appliance.config import Config, PathsConfig, load_config
from appliance.site.bundle_trust import Trust
from appliance.site.installed_bundles import (
    InstallError,
    install_archive,
    installed_versions,
    use_version,
)
from runtime.bundle_archive import pack_bundle
from tests.runtime_models import TinyBundle
from tests.test_cli import cytoedge


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archives")
    made = {}
    for version in ("1.0", "2.0"):
        bundle = TinyBundle(root / version).write(version=version)
        made[version] = pack_bundle(bundle.path, root)
    other = TinyBundle(root / "other").write(version="1.0", intended_use="research")
    made["1.0-other-content"] = pack_bundle(other.path, root / "other" / "x.bundle.tar")
    broken = TinyBundle(root / "broken")
    garbage = root / "broken" / "not-onnx.bin"
    garbage.write_bytes(b"these bytes hash fine but are no network")
    broken.sources["heads/mm_risk.1.onnx"] = garbage
    bundle = broken.write(version="3.0")
    made["3.0-broken"] = pack_bundle(bundle.path, root)
    return made


def tree(root: Path) -> dict[str, str]:
    """Every path under the bundles folder, with a link's target or a file's size."""
    if not root.exists():
        return {}
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = str(path.stat().st_size)
        else:
            found[key] = "dir"
    return found


def no_problems(bundle: object) -> list[str]:
    return []


# A site's trust under the built-in policy with no trusted key: signatures are not
# these tests' subject (tests/test_bundle_signing.py).
WARN = Trust("warn", (), (), datetime.date(2026, 1, 1), "tests")


def test_install_switch_and_roll_back_from_the_command_line(
    archives: dict[str, Path], isolated_data_dir: Path
) -> None:
    root = isolated_data_dir / "bundles"
    first = cytoedge("bundle", "install", str(archives["1.0"]))
    assert first.returncode == 0, first.stderr
    assert "tiny 1.0 installed" in first.stdout and "now in use" in first.stdout
    second = cytoedge("bundle", "install", str(archives["2.0"]))
    assert second.returncode == 0, second.stderr
    assert "previous version kept: tiny-1.0 (`cytoedge bundle use tiny-1.0` goes back)" in (
        second.stdout
    )
    assert os.readlink(root / "current") == "tiny-2.0"
    # The default configuration follows the link: what doctor and the service use.
    assert load_config().bundle_dir == root / "current"
    doctor = cytoedge("doctor", env={"COLUMNS": "200"})
    assert "tiny 2.0, intended use demo" in doctor.stdout and doctor.returncode == 0
    back = cytoedge("bundle", "use", "tiny-1.0")
    assert back.returncode == 0, back.stderr
    assert os.readlink(root / "current") == "tiny-1.0"
    listed = cytoedge("bundle", "list", env={"COLUMNS": "200"})
    rows = [line for line in listed.stdout.splitlines() if "tiny-" in line]
    assert len(rows) == 2 and "*" in rows[0] and "*" not in rows[1], listed.stdout


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_damaged_archive_is_refused_in_one_line_and_changes_nothing(
    archives: dict[str, Path], isolated_data_dir: Path, tmp_path: Path, damage: str
) -> None:
    root = isolated_data_dir / "bundles"
    assert cytoedge("bundle", "install", str(archives["1.0"])).returncode == 0
    before = tree(root)
    data = bytearray(archives["2.0"].read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF
    bad = tmp_path / "tiny-2.0.bundle.tar"
    bad.write_bytes(bytes(data))
    refused = cytoedge("bundle", "install", str(bad))
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cytoedge: tiny-2.0.bundle.tar: "), lines
    assert "Traceback" not in refused.stderr
    assert tree(root) == before


def test_a_bundle_that_cannot_run_here_is_not_switched_to(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    from appliance.cli.bundle_commands import _checks

    root = tmp_path / "bundles"
    install_archive(archives["1.0"], root, no_problems, WARN)
    before = tree(root)
    with pytest.raises(InstallError) as refused:
        install_archive(archives["3.0-broken"], root, _checks(Config()), WARN)
    message = str(refused.value)
    assert "tiny 3.0 cannot run here (head mm_risk [1]:" in message
    assert message.endswith("the bundle in use is unchanged")
    assert tree(root) == before


def test_the_same_version_with_other_content_is_refused(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "bundles"
    install_archive(archives["1.0"], root, no_problems, WARN)
    before = tree(root)
    with pytest.raises(InstallError, match=r"tiny-1\.0 is installed already with other content"):
        install_archive(archives["1.0-other-content"], root, no_problems, WARN)
    assert tree(root) == before


def test_installing_the_same_archive_again_changes_nothing(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "bundles"
    first, new = install_archive(archives["1.0"], root, no_problems, WARN)
    before = tree(root)
    again, new_again = install_archive(archives["1.0"], root, no_problems, WARN)
    assert (new, new_again) == (True, False) and first == again
    assert tree(root) == before


def test_use_refuses_an_unknown_or_changed_version(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "bundles"
    install_archive(archives["1.0"], root, no_problems, WARN)
    install_archive(archives["2.0"], root, no_problems, WARN)
    with pytest.raises(InstallError, match=r"no installed bundle is called '9\.9'"):
        use_version(root, "9.9", no_problems, WARN)
    onnx = root / "tiny-1.0" / "encoder.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    with pytest.raises(InstallError, match=r"installed version tiny-1\.0 no longer verifies"):
        use_version(root, "1.0", no_problems, WARN)
    assert [v.folder.name for v in installed_versions(root) if v.in_use] == ["tiny-2.0"]


def test_a_configuration_that_names_another_bundle_is_not_switched(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    config = tmp_path / "cytoedge.toml"
    config.write_text(f'[paths]\nbundle = "{tmp_path / "pinned"}"\n', encoding="utf-8")
    refused = cytoedge("bundle", "install", str(archives["1.0"]), "--config", str(config))
    assert refused.returncode == 1
    assert "paths.bundle in" in refused.stderr and "set it to" in refused.stderr
    assert not (Config(paths=PathsConfig()).bundles_root / "current").exists()
