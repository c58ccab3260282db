"""packaging/install.sh and packaging/wheelhouse.py, without root and without PyPI.

The wheelhouse here is real in form (manifest, SHA256SUMS, pinned requirements,
the site files) but holds one small stand-in ``cytoedge`` wheel whose command only
records how it was called; `make offline-check` (.ci/offline-install) runs the same
script on the CPU role's real wheelhouse and scores a scan from it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def wheelhouse_module() -> ModuleType:
    path = ROOT / "packaging" / "wheelhouse.py"
    spec = importlib.util.spec_from_file_location("cytoedge_wheelhouse", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


WHEELHOUSE = wheelhouse_module()


def stand_in_wheel(folder: Path, calls: Path) -> Path:
    """A wheel named cytoedge whose ``cytoedge`` command appends its arguments to ``calls``."""
    module = (
        "import sys\n"
        "def main():\n"
        f"    with open({str(calls)!r}, 'a') as log:\n"
        "        log.write(' '.join(sys.argv[1:]) + '\\n')\n"
        "    print('Ready to score.')\n"
    )
    info = "cytoedge-0.1.0.dist-info"
    files = {
        "stand_in_cytoedge.py": module,
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: cytoedge\nVersion: 0.1.0\n",
        f"{info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        f"{info}/entry_points.txt": "[console_scripts]\ncytoedge = stand_in_cytoedge:main\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    path = folder / "cytoedge-0.1.0-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def make_wheelhouse(folder: Path, calls: Path, role: str = "gui") -> Path:
    stand_in_wheel(folder / "wheels", calls)
    for name in WHEELHOUSE.SITE_FILES:
        shutil.copy2(ROOT / "packaging" / name, folder / name)
    shutil.copy2(ROOT / "docs" / "install.md", folder / "INSTALL.md")
    WHEELHOUSE.write_manifest(folder, role, WHEELHOUSE.ROLES[role])
    return folder


def install(wheelhouse: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CYTOEDGE"))}
    return subprocess.run(
        ["bash", str(wheelhouse / "install.sh"), "--python", sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=wheelhouse.parent,
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every path: its type, mode and content (or link target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        mode = oct(path.lstat().st_mode)
        if path.is_symlink():
            found[str(path.relative_to(root))] = f"{mode} -> {os.readlink(path)}"
        elif path.is_file():
            found[str(path.relative_to(root))] = (
                f"{mode} {hashlib.sha256(path.read_bytes()).hexdigest()}"
            )
        else:
            found[str(path.relative_to(root))] = mode
    return found


def test_the_manifest_names_every_file_its_hash_and_the_platform(tmp_path: Path) -> None:
    folder = make_wheelhouse(tmp_path / "wh", tmp_path / "calls.log")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["role"] == "gui" and manifest["window"] is True
    assert manifest["python"] == "{}.{}".format(*sys.version_info[:2])
    assert manifest["packages"] == {"cytoedge": "0.1.0"}
    assert "wheels/cytoedge-0.1.0-py3-none-any.whl" in manifest["files"]
    assert set(WHEELHOUSE.SITE_FILES) <= set(manifest["files"])
    assert (folder / "requirements.txt").read_text() == "cytoedge==0.1.0\n"
    check = subprocess.run(["sha256sum", "--check", "SHA256SUMS"], cwd=folder, capture_output=True)
    assert check.returncode == 0, check.stdout


def test_platform_tags_say_which_c_library_a_wheel_needs() -> None:
    assert WHEELHOUSE.glibc_needed("any") is None
    assert WHEELHOUSE.glibc_needed("manylinux_2_27_x86_64.manylinux_2_28_x86_64") == (2, 27)
    assert WHEELHOUSE.glibc_needed("manylinux2014_x86_64.manylinux_2_17_x86_64") == (2, 17)
    assert WHEELHOUSE.glibc_needed("manylinux1_x86_64.manylinux_2_5_x86_64") == (2, 5)
    assert WHEELHOUSE.parse_wheel("openslide_bin-4.0.1.2-py3-none-manylinux_2_28_x86_64.whl") == (
        "openslide-bin",
        "4.0.1.2",
        "manylinux_2_28_x86_64",
    )


@pytest.mark.slow  # a virtual environment is made
def test_install_twice_changes_nothing_and_uninstall_keeps_the_data(tmp_path: Path) -> None:
    calls = tmp_path / "calls.log"
    wheelhouse = make_wheelhouse(tmp_path / "wh", calls)
    site = tmp_path / "site"
    archive = tmp_path / "model-1.0.bundle.tar"
    archive.write_bytes(b"a bundle archive")
    first = install(
        wheelhouse, "--root", str(site), "--technician", "alice", "--bundle", str(archive)
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "every file's sha256 checked" in first.stdout
    # The pieces, with the paths inside them below the root.
    venv_command = site / "opt/cytoedge/.venv/bin/cytoedge"
    wrapper = (site / "usr/local/bin/cytoedge").read_text()
    assert f"CYTOEDGE_CONFIG:-{site}/etc/cytoedge/cytoedge.toml" in wrapper
    assert str(venv_command) in wrapper and "runuser" not in wrapper
    unit = (site / "etc/systemd/system/cytoedge.service").read_text()
    assert f"ExecStart={venv_command} run" in unit
    config = (site / "etc/cytoedge/cytoedge.toml").read_text()
    assert f'data_dir = "{site}/var/lib/cytoedge"' in config
    for folder, mode in (("inbox", 0o2770), ("outbox", 0o2750), ("state", 0o2770)):
        assert (site / "var/lib/cytoedge" / folder).stat().st_mode & 0o7777 == mode, folder
    launcher = site / "usr/share/applications/cytoedge.desktop"
    autostart = site / "home/alice/.config/autostart/cytoedge.desktop"
    assert f"Exec={site}/usr/local/bin/cytoedge gui" in launcher.read_text()
    assert autostart.read_text() == launcher.read_text()
    # It installed the bundle, then ended with doctor, through the installed command.
    assert calls.read_text().splitlines() == [f"bundle install {archive}", "doctor"]

    before = snapshot(site)
    second = install(
        wheelhouse, "--root", str(site), "--technician", "alice", "--bundle", str(archive)
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert snapshot(site) == before
    assert "wrote" not in second.stdout and "created" not in second.stdout, second.stdout

    # A site's own configuration is never overwritten; patient data an earlier release
    # left world-readable is made the service's and its group's only.
    edited = config.replace("quiet_seconds = 10.0", "quiet_seconds = 30.0")
    (site / "etc/cytoedge/cytoedge.toml").write_text(edited)
    result = site / "var/lib/cytoedge/outbox/CASE-1/v1/result.json"
    result.parent.mkdir(parents=True, mode=0o755)
    result.write_text("{}")
    result.chmod(0o644)
    result.parent.chmod(0o777)
    assert install(wheelhouse, "--root", str(site)).returncode == 0
    assert (site / "etc/cytoedge/cytoedge.toml").read_text() == edited
    assert (result.stat().st_mode & 0o7777, result.parent.stat().st_mode & 0o7777) == (
        0o640,
        0o770,
    )
    removed = install(wheelhouse, "--root", str(site), "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert "kept" in removed.stdout
    for gone in ("opt/cytoedge", "usr/local/bin/cytoedge", "etc/systemd/system/cytoedge.service"):
        assert not (site / gone).exists(), gone
    assert not launcher.exists() and not autostart.exists()
    assert result.read_text() == "{}" and (site / "etc/cytoedge/cytoedge.toml").is_file()
    purged = install(wheelhouse, "--root", str(site), "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not (site / "var/lib/cytoedge").exists() and not (site / "etc/cytoedge").exists()


def rewrite_manifest(folder: Path, **changes: object) -> None:
    """Change manifest.json and keep SHA256SUMS consistent with it (a wheelhouse built
    elsewhere, not a damaged one)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, **changes}))
    digest = WHEELHOUSE.sha256(folder / "manifest.json")
    lines = [
        f"{digest}  manifest.json" if line.endswith("  manifest.json") else line
        for line in (folder / "SHA256SUMS").read_text().splitlines()
    ]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (
            "flipped byte",
            "damaged or incomplete (wheels/cytoedge-0.1.0-py3-none-any.whl: FAILED)",
        ),
        ("other python", "the wheelhouse is for Python 3.9"),
        ("other machine", "the wheelhouse is for riscv64"),
        ("model owner", "this is a model-owner wheelhouse, not an appliance"),
    ],
)
def test_a_wheelhouse_that_does_not_fit_is_refused_in_one_line_before_anything_changes(
    tmp_path: Path, damage: str, expected: str
) -> None:
    wheelhouse = make_wheelhouse(tmp_path / "wh", tmp_path / "calls.log")
    if damage == "flipped byte":
        wheel = wheelhouse / "wheels/cytoedge-0.1.0-py3-none-any.whl"
        data = bytearray(wheel.read_bytes())
        data[100] ^= 0xFF
        wheel.write_bytes(bytes(data))
    elif damage == "other python":
        rewrite_manifest(wheelhouse, python="3.9")
    elif damage == "other machine":
        rewrite_manifest(wheelhouse, machine="riscv64")
    else:
        rewrite_manifest(wheelhouse, role="model-owner", appliance=False)
    site = tmp_path / "site"
    refused = install(wheelhouse, "--root", str(site))
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], refused.stderr
    assert not site.exists()
