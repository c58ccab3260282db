"""Build the wheelhouse a site installs from with no network (``make wheelhouse``).

Run on a connected machine with the site's Python (3.11) on the site's kind of
system (same architecture, a C library no newer than the site's: the same OS
release, or an older one, is safe). It resolves the role's requirements, builds
cytoedge's own wheels from this source tree, and writes one folder:

    wheels/*.whl       every wheel the role needs, nothing else
    requirements.txt   each of them pinned: what install.sh installs (--no-index --no-deps)
    manifest.json      role, Python, architecture, the newest C library a wheel needs,
                       every package's version, every file's sha256 and size
    SHA256SUMS         the same hashes for `sha256sum -c`
    install.sh and the files it installs (unit, environment, configuration, launcher)
    INSTALL.md         docs/install.md

Standard library only: it must run before anything is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "packaging"
FORMAT = "cytoedge-wheelhouse"
FORMAT_VERSION = 1
# Installed from the wheelhouse folder by install.sh, beside the wheels.
SITE_FILES = (
    "install.sh",
    "cytoedge.service",
    "cytoedge.env",
    "cytoedge.toml",
    "cytoedge.desktop",
)
_WHEEL = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-(?P<plat>.+)\.whl$"
)
_GLIBC = re.compile(r"manylinux_(\d+)_(\d+)_")
_LEGACY_GLIBC = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


@dataclasses.dataclass(frozen=True)
class Role:
    """What one kind of installation needs."""

    extras: tuple[str, ...] = ()
    # Wheels left out although cytoedge's metadata asks for them: onnxruntime-gpu
    # provides the same `onnxruntime` module, and both installed shadow each other.
    leave_out: tuple[str, ...] = ()
    demo: bool = False  # the cytoedge-demo distribution (a model owner builds bundles)
    window: bool = False  # the technician's window: a launcher and an autostart entry
    appliance: bool = True  # install.sh sets up the service


ROLES = {
    # OpenVINO: the CPU path the site's own measurement may choose (doctor --self-test);
    # tritonclient: a workstation whose networks run on the lab's server (docs/triton.md).
    "cpu": Role(extras=("openvino", "triton")),
    "gui": Role(extras=("gui", "openvino", "triton"), window=True),
    "gpu": Role(extras=("gui", "gpu"), leave_out=("onnxruntime",), window=True),
    "model-owner": Role(extras=("export",), demo=True, appliance=False),
}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel(filename: str) -> tuple[str, str, str]:
    """(normalised name, version, platform tag) of a wheel file name."""
    match = _WHEEL.match(filename)
    if match is None:
        raise ValueError(f"not a wheel file name: {filename}")
    return normalise(match["name"]), match["version"], match["plat"]


def glibc_needed(platform_tag: str) -> tuple[int, int] | None:
    """The oldest C library a wheel with this platform tag runs on (None: pure Python).
    A wheel with several tags (manylinux_2_27.manylinux_2_28) runs on the oldest."""
    if platform_tag == "any":
        return None
    versions = [(int(m[0]), int(m[1])) for m in _GLIBC.findall(platform_tag)]
    versions += [v for tag, v in _LEGACY_GLIBC.items() if f"{tag}_" in platform_tag]
    return min(versions) if versions else None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def resolve(role: Role, wheels: Path) -> None:
    """cytoedge's wheels built from this tree, then every wheel the role needs."""
    with tempfile.TemporaryDirectory() as own:
        pip("wheel", "--quiet", "--no-deps", "--wheel-dir", own, str(ROOT))
        (cytoedge,) = Path(own).glob("*.whl")
        extras = f"[{','.join(role.extras)}]" if role.extras else ""
        # The wheel file itself is the requirement: never a same-named project on an index.
        wanted = [f"{cytoedge}{extras}"]
        if role.demo:
            pip("wheel", "--quiet", "--no-deps", "--wheel-dir", own, str(ROOT / "demo"))
            wanted += [str(p) for p in Path(own).glob("*.whl") if p != cytoedge]
        pip("wheel", "--quiet", "--find-links", own, "--wheel-dir", str(wheels), *wanted)
    for name in role.leave_out:
        for path in wheels.glob("*.whl"):
            if parse_wheel(path.name)[0] == normalise(name):
                path.unlink()


def write_manifest(folder: Path, role_name: str, role: Role) -> dict[str, object]:
    """requirements.txt, manifest.json and SHA256SUMS for what ``folder`` holds."""
    packages, glibc = {}, (0, 0)
    for path in sorted((folder / "wheels").glob("*.whl")):
        name, version, plat = parse_wheel(path.name)
        packages[name] = version
        glibc = max(glibc, glibc_needed(plat) or (0, 0))
    lines = [f"{name}=={version}" for name, version in sorted(packages.items())]
    (folder / "requirements.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    files = {
        str(path.relative_to(folder)): {"sha256": sha256(path), "bytes": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in ("manifest.json", "SHA256SUMS")
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "role": role_name,
        "extras": list(role.extras),
        "window": role.window,
        "appliance": role.appliance,
        "cytoedge_version": packages.get("cytoedge", ""),
        "python": "{}.{}".format(*sys.version_info[:2]),
        "machine": platform.machine(),
        "glibc_min": "{}.{}".format(*glibc) if glibc != (0, 0) else "",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "packages": packages,
        "files": files,
        "total_bytes": sum(entry["bytes"] for entry in files.values()),
    }
    text = json.dumps(manifest, indent=2) + "\n"
    (folder / "manifest.json").write_text(text, encoding="utf-8")
    sums = {name: entry["sha256"] for name, entry in files.items()}
    sums["manifest.json"] = sha256(folder / "manifest.json")
    (folder / "SHA256SUMS").write_text(
        "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())), encoding="utf-8"
    )
    return manifest


def build(role_name: str, out: Path) -> dict[str, object]:
    role = ROLES[role_name]
    if sys.version_info[:2] != (3, 11):
        raise SystemExit("cytoedge: build the wheelhouse with Python 3.11, the site's Python")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "wheels").mkdir(parents=True)
    resolve(role, staging / "wheels")
    for name in SITE_FILES:
        shutil.copy2(HERE / name, staging / name)
    shutil.copy2(ROOT / "docs" / "install.md", staging / "INSTALL.md")
    manifest = write_manifest(staging, role_name, role)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=sorted(ROLES), default="cpu")
    parser.add_argument("--out", type=Path, help="folder to write (default dist/wheelhouse-ROLE)")
    args = parser.parse_args()
    out = args.out or ROOT / "dist" / f"wheelhouse-{args.role}"
    manifest = build(args.role, out)
    wheels = len(manifest["packages"])  # type: ignore[arg-type]
    size = int(manifest["total_bytes"]) / 1e6  # type: ignore[call-overload]
    print(
        f"{out}: role {args.role}, {wheels} wheels, {size:.0f} MB, Python "
        f"{manifest['python']} on {manifest['machine']}, C library >= "
        f"{manifest['glibc_min'] or 'any'}"
    )


if __name__ == "__main__":
    main()
