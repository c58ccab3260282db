"""Signed bundles: ``cytoedge bundle keygen / sign``, and ``install`` / ``use`` taking only
what a trusted, live, unrevoked key signed under ``bundles.policy = require``.

Every refusal is one line and leaves the bundles folder and its ``current`` link as
they were; ``warn`` installs with a warning that every result carries; the verdict is
kept in the installed folder for the service, doctor and the window.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tomllib
from pathlib import Path

import pytest

from appliance.config import Config, ConfigError, load_config
from appliance.pipeline.cases import bundle_record
from appliance.results import CaseResult, SignerRecord
from appliance.results.report import render_report_html
from appliance.review.fhir import fhir_bundle
from appliance.review.sign_off import SignOff
from appliance.site.bundle_trust import Trust, sign_new_version, signature_document
from appliance.site.installed_bundles import InstallError, install_archive, use_version
from appliance.site.signing_keys import (
    SigningKeyError,
    fingerprint,
    generate_key_pair,
    load_private_key,
    read_trusted_key,
)
from runtime.bundle_archive import (
    MANIFEST,
    SIGNATURE,
    pack_bundle,
    read_signed_manifest,
    sign_archive,
)
from runtime.bundle_format import load_bundle
from runtime.bundle_signer import NOT_TRUSTED, read_record
from tests.runtime_models import TinyBundle
from tests.test_bundle_install import no_problems, tree
from tests.test_cli import cytoedge
from tests.test_review import signed as signed_off_case
from tests.test_review import validated


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``owner``, ``stranger`` and ``site`` key pairs, as ``bundle keygen`` writes them."""
    folder = tmp_path_factory.mktemp("keys")
    for name in ("owner", "stranger", "site"):
        generate_key_pair(folder, name)
    return folder


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Unsigned archives of tiny 1.0 and 2.0."""
    root = tmp_path_factory.mktemp("packed")
    return {
        version: pack_bundle(TinyBundle(root / version).write(version=version).path, root)
        for version in ("1.0", "2.0")
    }


def signed(archive: Path, keys: Path, signer: str, into: Path) -> Path:
    """A copy of ``archive`` in ``into`` signed by ``signer``'s key."""
    into.mkdir(parents=True, exist_ok=True)
    copy = Path(shutil.copy(archive, into / archive.name))
    manifest, _ = read_signed_manifest(copy)
    key = load_private_key(keys / f"{signer}.key")
    sign_archive(copy, signature_document(key, manifest))
    return copy


def site(
    tmp_path: Path,
    keys: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    policy: str = "require",
    trusted: tuple[str, ...] = ("owner",),
    revoked: tuple[str, ...] = (),
    expires: str = "",
    signing_key: str = "",
) -> Path:
    """A site configuration (what install.sh writes: a file beside trusted-keys/), set as
    $CYTOEDGE_CONFIG; the folder of installed versions."""
    etc, data = tmp_path / "etc", tmp_path / "data"
    (etc / "trusted-keys").mkdir(parents=True)
    data.mkdir()
    for name in trusted:
        text = (keys / f"{name}.pub").read_text()
        header = f"Expires: {expires}\n" if expires else ""
        (etc / "trusted-keys" / f"{name}.pub").write_text(header + text)
    config = etc / "cytoedge.toml"
    config.write_text(
        f'[paths]\ndata_dir = "{data}"\n\n[bundles]\npolicy = "{policy}"\n'
        f"revoked_keys = {json.dumps(list(revoked))}\nsigning_key = {json.dumps(signing_key)}\n"
    )
    monkeypatch.setenv("CYTOEDGE_CONFIG", str(config))
    return data / "bundles"


def fingerprint_of(keys: Path, name: str) -> str:
    return read_trusted_key(keys / f"{name}.pub").fingerprint


def refused_in_one_line(archive: Path, root: Path, expect: str) -> None:
    """``bundle install`` refuses ``archive`` with one line holding ``expect`` and changes
    nothing under ``root`` (its lock file aside, made by the first command to look)."""
    before = tree(root)
    refused = cytoedge("bundle", "install", str(archive))
    assert refused.returncode == 1, refused.stdout
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], lines
    after = tree(root)
    after.pop(".lock", None)
    assert after == {k: v for k, v in before.items() if k != ".lock"}


def test_keygen_and_sign_from_the_command_line_then_a_require_site_installs_it(
    packed: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = cytoedge("bundle", "keygen", "owner", "--out", str(tmp_path / "keys"))
    assert made.returncode == 0, made.stderr
    private = tmp_path / "keys" / "owner.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    public = read_trusted_key(tmp_path / "keys" / "owner.pub")
    assert f"fingerprint {public.fingerprint}" in made.stdout
    secret = private.read_bytes()
    again = cytoedge("bundle", "keygen", "owner", "--out", str(tmp_path / "keys"))
    assert again.returncode == 1 and "exists" in again.stderr
    assert private.read_bytes() == secret  # the refusal replaced nothing

    copies = []
    for where in ("a", "b"):
        copy = Path(shutil.copy(packed["1.0"], tmp_path / f"{where}.bundle.tar"))
        done = cytoedge("bundle", "sign", str(copy), "--key", str(private))
        assert done.returncode == 0, done.stderr
        copies.append(copy)
    assert copies[0].read_bytes() == copies[1].read_bytes()  # signing is reproducible
    with tarfile.open(copies[0]) as tar:
        assert tar.getnames()[:2] == [MANIFEST, SIGNATURE]

    root = site(tmp_path / "site", tmp_path / "keys", monkeypatch)
    installed = cytoedge("bundle", "install", str(copies[0]))
    assert installed.returncode == 0, installed.stderr
    assert f"signed by owner ({public.fingerprint[:16]})" in installed.stdout
    assert os.readlink(root / "current") == "tiny-1.0"
    record = read_record(root / "current")
    assert record.signer is not None and record.signer.fingerprint == public.fingerprint
    assert record.warning is None
    listed = cytoedge("bundle", "list", env={"COLUMNS": "250"})
    assert "owner (" in listed.stdout, listed.stdout


def test_a_passphrase_protects_the_private_key(tmp_path: Path) -> None:
    private, _ = generate_key_pair(tmp_path, "locked", b"correct horse")
    with pytest.raises(SigningKeyError, match="encrypted; give its passphrase"):
        load_private_key(private)
    with pytest.raises(SigningKeyError, match="passphrase is wrong"):
        load_private_key(private, b"wrong")
    assert isinstance(
        load_private_key(private, b"correct horse").public_key().public_bytes_raw(), bytes
    )


def test_a_require_site_refuses_an_unsigned_bundle(
    packed: dict[str, Path], keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = site(tmp_path, keys, monkeypatch)
    good = signed(packed["1.0"], keys, "owner", tmp_path / "signed")
    assert cytoedge("bundle", "install", str(good)).returncode == 0
    refused_in_one_line(packed["2.0"], root, "tiny-2.0.bundle.tar: not signed; bundles.policy")
    assert os.readlink(root / "current") == "tiny-1.0"


def members(archive: Path) -> list[tuple[str, int, int]]:
    """(name, offset of its data, size) of every member."""
    with tarfile.open(archive) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar.getmembers()]


def test_one_flipped_byte_in_any_member_is_refused(
    packed: dict[str, Path], keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = site(tmp_path, keys, monkeypatch)
    good = signed(packed["2.0"], keys, "owner", tmp_path / "signed")
    assert (
        cytoedge(
            "bundle", "install", str(signed(packed["1.0"], keys, "owner", tmp_path))
        ).returncode
        == 0
    )
    found = members(good)
    assert {MANIFEST, SIGNATURE, "bundle/bundle.json", "bundle/encoder.onnx"} <= {
        name for name, _, _ in found
    }
    for name, offset, size in found:
        data = bytearray(good.read_bytes())
        data[offset + size // 2] ^= 0x01
        bad = tmp_path / "bad" / name.replace("/", "_") / good.name
        bad.parent.mkdir(parents=True)
        bad.write_bytes(bytes(data))
        refused_in_one_line(bad, root, "tiny-2.0.bundle.tar: ")
    assert os.readlink(root / "current") == "tiny-1.0"


@pytest.mark.parametrize(
    ("signer", "revoked", "expires", "expect"),
    [
        ("stranger", 0, "", "which this site does not trust"),
        ("owner", 64, "", "which is revoked here"),  # by its whole fingerprint
        ("owner", 16, "", "which is revoked here"),  # by the shortened one doctor shows
        ("owner", 0, "2020-01-31", "trusted until 2020-01-31"),
    ],
)
def test_a_signature_the_site_does_not_trust_is_refused(
    packed: dict[str, Path],
    keys: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    signer: str,
    revoked: int,
    expires: str,
    expect: str,
) -> None:
    listed = (fingerprint_of(keys, "owner")[:revoked],) if revoked else ()
    root = site(tmp_path, keys, monkeypatch, revoked=listed, expires=expires)
    refused_in_one_line(signed(packed["1.0"], keys, signer, tmp_path / "s"), root, expect)
    assert not (root / "current").exists()


def tampered(archive: Path, out: Path) -> Path:
    """``archive`` with its bundle.json changed to claim clinical use, and the manifest
    made to match (its sha256 and size, the bundle's sha256): consistent in itself, so
    only a signature can tell. The old signature is kept."""
    contents = read_members(archive)
    described = json.loads(contents["bundle/bundle.json"])
    described["intended_use"] = "clinical"
    changed = (json.dumps(described, indent=2) + "\n").encode()
    contents["bundle/bundle.json"] = changed
    manifest = json.loads(contents[MANIFEST])
    manifest["files"]["bundle/bundle.json"] = {"sha256": sha(changed), "bytes": len(changed)}
    manifest["bundle"].update(sha256=sha(changed), intended_use="clinical")
    contents[MANIFEST] = (json.dumps(manifest, indent=2) + "\n").encode()
    return write_members(contents, out)


def read_members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def write_members(contents: dict[str, bytes], out: Path) -> Path:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in contents.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_tampered_bundle_fails_with_its_old_signature_and_re_signed_by_a_stranger(
    packed: dict[str, Path], keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = site(tmp_path, keys, monkeypatch)
    good = signed(packed["1.0"], keys, "owner", tmp_path / "signed")
    changed = tampered(good, tmp_path / "tiny-1.0.bundle.tar")
    refused_in_one_line(changed, root, "does not match the manifest (changed after signing)")
    manifest, _ = read_signed_manifest(changed)
    sign_archive(changed, signature_document(load_private_key(keys / "stranger.key"), manifest))
    refused_in_one_line(changed, root, "which this site does not trust")
    assert not root.exists() or not (root / "current").exists()


def test_a_signed_manifest_must_be_the_one_the_unpacked_bundle_packs_to(
    packed: dict[str, Path], keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same listing written otherwise, signed by a trusted key: what was unpacked
    could not be checked again against its signature, so it is refused."""
    root = site(tmp_path, keys, monkeypatch)
    contents = read_members(packed["1.0"])
    listing = json.loads(contents[MANIFEST])
    contents[MANIFEST] = json.dumps(listing, indent=1).encode()
    other = write_members(contents, tmp_path / "tiny-1.0.bundle.tar")
    manifest, _ = read_signed_manifest(other)
    sign_archive(other, signature_document(load_private_key(keys / "owner.key"), manifest))
    refused_in_one_line(other, root, "the signed manifest is not the unpacked bundle's")


def test_warn_installs_what_no_trusted_key_signed_and_says_so(
    packed: dict[str, Path], keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = site(tmp_path, keys, monkeypatch, policy="warn")
    done = cytoedge("bundle", "install", str(signed(packed["1.0"], keys, "stranger", tmp_path)))
    assert done.returncode == 0, done.stderr
    assert f"{NOT_TRUSTED}: signed by key" in done.stdout
    record = read_record(root / "current")
    assert record.signer is None and record.warning == NOT_TRUSTED
    doctor = cytoedge("doctor", env={"COLUMNS": "250"})
    assert NOT_TRUSTED in doctor.stdout, doctor.stdout


def test_off_checks_nothing_and_warns_of_nothing(
    packed: dict[str, Path], keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = site(tmp_path, keys, monkeypatch, policy="off")
    assert cytoedge("bundle", "install", str(packed["1.0"])).returncode == 0
    record = read_record(root / "current")
    assert record.signer is None and record.warning is None and "not checked" in record.reason


def test_use_applies_todays_policy_a_revoked_key_cannot_be_switched_to(
    packed: dict[str, Path], keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site(tmp_path, keys, monkeypatch, trusted=("owner", "stranger"))
    root = load_config().bundles_root
    trust = Trust.of(load_config())
    install_archive(
        signed(packed["1.0"], keys, "stranger", tmp_path / "a"), root, no_problems, trust
    )
    install_archive(signed(packed["2.0"], keys, "owner", tmp_path / "b"), root, no_problems, trust)
    toml = tmp_path / "etc" / "cytoedge.toml"
    toml.write_text(
        toml.read_text().replace(
            "revoked_keys = []", f'revoked_keys = ["{fingerprint_of(keys, "stranger")[:16]}"]'
        )
    )
    before = tree(root)
    refused = cytoedge("bundle", "use", "tiny-1.0")
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "installed version tiny-1.0: signed by key" in lines[0], lines
    assert "revoked" in lines[0] and tree(root) == before
    assert os.readlink(root / "current") == "tiny-2.0"


def test_a_changed_installed_folder_no_longer_matches_its_signature(
    packed: dict[str, Path], keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site(tmp_path, keys, monkeypatch)
    cfg = load_config()
    trust = Trust.of(cfg)
    root = cfg.bundles_root
    install_archive(signed(packed["1.0"], keys, "owner", tmp_path / "a"), root, no_problems, trust)
    install_archive(signed(packed["2.0"], keys, "owner", tmp_path / "b"), root, no_problems, trust)
    record = root / "tiny-1.0" / "signature.json"
    other = json.loads((root / "tiny-2.0" / "signature.json").read_text())
    record.write_text(json.dumps(other))  # 2.0's signature does not cover 1.0's manifest
    with pytest.raises(InstallError, match="does not match the manifest"):
        use_version(root, "tiny-1.0", no_problems, trust)
    assert os.readlink(root / "current") == "tiny-2.0"


def test_versions_this_site_writes_are_signed_with_its_own_key(
    packed: dict[str, Path], keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site(tmp_path, keys, monkeypatch, trusted=("site",), signing_key=str(keys / "site.key"))
    cfg = load_config()
    written = TinyBundle(tmp_path / "parts").write(version="1.1")
    local = cfg.bundles_root / "tiny-1.1"
    shutil.copytree(written.path, local)
    verdict = sign_new_version(load_bundle(local), cfg)
    assert verdict is not None and verdict.signer is not None
    assert verdict.signer.fingerprint == fingerprint_of(keys, "site")
    used = use_version(cfg.bundles_root, "tiny-1.1", no_problems, Trust.of(cfg))
    assert used.in_use and read_record(local).signer == verdict.signer
    assert sign_new_version(load_bundle(local), Config()) is None  # no key configured


def test_trusted_key_files_and_revocations_are_checked(keys: Path, tmp_path: Path) -> None:
    bad = tmp_path / "wrong.pub"
    bad.write_text("Expires: soon\n" + (keys / "owner.pub").read_text())
    with pytest.raises(SigningKeyError, match=r"wrong\.pub: Expires: must be a date"):
        read_trusted_key(bad)
    key = read_trusted_key(keys / "owner.pub")
    assert key.fingerprint == fingerprint(load_private_key(keys / "owner.key").public_key())
    config = tmp_path / "cytoedge.toml"
    config.write_text('[bundles]\nrevoked_keys = ["owner"]\n')
    with pytest.raises(ConfigError, match=r"bundles\.revoked_keys: 'owner' is not a key"):
        load_config(config)
    config.write_text('[bundles]\npolicy = "maybe"\n')
    with pytest.raises(ConfigError, match=r"bundles\.policy must be one of require, warn, off"):
        load_config(config)
    assert Config().bundles.policy == "warn"


def test_the_installed_site_configuration_requires_signatures() -> None:
    shipped = Path(__file__).parents[1] / "packaging" / "cytoedge.toml"
    assert tomllib.loads(shipped.read_text())["bundles"]["policy"] == "require"


def test_results_reports_and_fhir_name_the_signer_or_warn(
    packed: dict[str, Path], keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site(tmp_path / "site", keys, monkeypatch, policy="warn")
    cfg = load_config()
    for version, signer in (("1.0", "owner"), ("2.0", "stranger")):
        archive = signed(packed[version], keys, signer, tmp_path / version)
        install_archive(archive, cfg.bundles_root, no_problems, Trust.of(cfg))
    by_owner = bundle_record(load_bundle(cfg.bundles_root / "tiny-1.0"))
    by_stranger = bundle_record(load_bundle(cfg.bundles_root / "tiny-2.0"))
    owner = fingerprint_of(keys, "owner")
    assert by_owner.signer == SignerRecord("owner", owner) and by_owner.signature_warning is None
    assert by_stranger.signer is None and by_stranger.signature_warning == NOT_TRUSTED

    _, done = signed_off_case(tmp_path / "case", "mm_negative", SignOff("accepted", "A. Reviewer"))
    for record, words in (
        (by_owner, f"signed by owner ({owner[:16]})"),
        (by_stranger, NOT_TRUSTED),
    ):
        result = dataclasses.replace(done.result, bundle=record)
        assert CaseResult.from_json(json.loads(json.dumps(result.to_json()))) == result
        assert words in render_report_html(result)
        document = fhir_bundle(result, done.folder.path)
        device, report = validated(document).entry[0].resource, document["entry"][-1]["resource"]
        assert words in device.note[0].text
        assert (NOT_TRUSTED.upper() in report["conclusion"]) == (record is by_stranger)
        keys_named = [i.value for i in device.identifier if i.system.endswith("signer-key")]
        assert keys_named == ([owner] if record is by_owner else [])
    assert NOT_TRUSTED not in render_report_html(done.result)  # an older result says nothing
