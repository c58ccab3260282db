"""A bundle as one archive: packed reproducibly, unpacked only when every byte checks out."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from runtime.bundle_archive import (
    MANIFEST,
    BundleArchiveError,
    archive_name,
    pack_bundle,
    unpack_bundle,
)
from runtime.bundle_format import load_bundle
from tests.runtime_models import TinyBundle


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("packed")
    bundle = TinyBundle(root, with_int8=True).write()
    return pack_bundle(bundle.path, root)


def members(archive: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return tar.getmembers()


def rewritten(archive: Path, target: Path, change: object) -> Path:
    """A copy of ``archive`` with ``change(name, data) -> (name, data) | None`` applied to
    each member (None drops it), written as a well-formed tar."""
    with tarfile.open(archive) as source, tarfile.open(target, "w") as out:
        for member in source.getmembers():
            handle = source.extractfile(member)
            data = handle.read() if handle else b""
            changed = change(member.name, data)  # type: ignore[operator]
            if changed is None:
                continue
            info = tarfile.TarInfo(changed[0])
            info.size = len(changed[1])
            out.addfile(info, io.BytesIO(changed[1]))
    return target


def test_pack_writes_the_manifest_first_and_every_listed_file(packed: Path) -> None:
    bundle = load_bundle(packed.parent / "bundle")
    assert packed.name == archive_name(bundle) == "tiny-1.0.bundle.tar"
    names = [m.name for m in members(packed)]
    assert names[0] == MANIFEST
    assert sorted(names[1:]) == sorted(
        ["bundle/bundle.json", *(f"bundle/{rel}" for rel in bundle.files)]
    )
    with tarfile.open(packed) as tar:
        manifest = json.loads(tar.extractfile(MANIFEST).read())  # type: ignore[union-attr]
    assert manifest["bundle"]["sha256"] == bundle.sha256
    assert manifest["files"]["bundle/encoder.onnx"]["sha256"] == bundle.files["encoder.onnx"].sha256


def test_packing_is_reproducible_and_leaves_out_engines(packed: Path, tmp_path: Path) -> None:
    engines = packed.parent / "bundle" / "engines"
    engines.mkdir(exist_ok=True)
    (engines / "encoder.engine").write_bytes(b"built on one GPU")
    again = pack_bundle(packed.parent / "bundle", tmp_path / "again.tar")
    assert again.read_bytes() == packed.read_bytes()
    assert not any("engines" in m.name for m in members(again))


def test_pack_refuses_a_bundle_that_does_not_verify(tmp_path: Path) -> None:
    bundle = TinyBundle(tmp_path).write()
    target = bundle.path / "heads" / "mm_risk.0.onnx"
    target.write_bytes(target.read_bytes() + b"\0")
    with pytest.raises(Exception, match=r"mm_risk\.0\.onnx: \d+ bytes, bundle.json records"):
        pack_bundle(bundle.path, tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()


def test_unpack_round_trip(packed: Path, tmp_path: Path) -> None:
    bundle = unpack_bundle(packed, tmp_path)
    original = load_bundle(packed.parent / "bundle")
    assert (bundle.sha256, bundle.path) == (original.sha256, tmp_path / "bundle")


def flip_last_byte(suffix: str) -> object:
    def change(name: str, data: bytes) -> tuple[str, bytes]:
        return (name, data[:-1] + bytes([data[-1] ^ 1])) if name.endswith(suffix) else (name, data)

    return change


def drop(suffix: str) -> object:
    return lambda name, data: None if name.endswith(suffix) else (name, data)


def grow(suffix: str) -> object:
    return lambda name, data: (name, data + b"\0") if name.endswith(suffix) else (name, data)


def rename(suffix: str, new_name: str) -> object:
    return lambda name, data: (new_name, data) if name.endswith(suffix) else (name, data)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            flip_last_byte("pb_screen.1.onnx"),
            "pb_screen.1.onnx: sha256 does not match the manifest",
        ),
        (flip_last_byte("bundle.json"), "bundle/bundle.json: sha256 does not match the manifest"),
        (
            drop("mm_risk.1.onnx"),
            "1 listed file(s) are missing (first: bundle/heads/mm_risk.1.onnx)",
        ),
        (grow("encoder.onnx"), "bundle/encoder.onnx holds"),
        (rename("encoder.int8.onnx", "bundle/../../escaped.onnx"), "escaped.onnx is not in the"),
        (drop(MANIFEST), "not a bundle archive (no MANIFEST.json first)"),
    ],
    ids=["flipped-byte", "bundle-json-edited", "dropped", "grown", "path-escape", "no-manifest"],
)
def test_a_tampered_archive_is_refused_in_one_line(
    packed: Path, tmp_path: Path, change: object, expected: str
) -> None:
    bad = rewritten(packed, tmp_path / "bad.tar", change)
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(BundleArchiveError) as refused:
        unpack_bundle(bad, into)
    message = str(refused.value)
    assert expected in message and "\n" not in message, message
    assert not (tmp_path / "escaped.onnx").exists()


def test_a_consistently_rewritten_manifest_is_still_caught_by_bundle_json(
    packed: Path, tmp_path: Path
) -> None:
    """Someone edits a network and the manifest's hash of it: bundle.json's own hashes
    still refuse it."""
    state: dict[str, bytes] = {}

    def change(name: str, data: bytes) -> tuple[str, bytes]:
        if name.endswith("mm_risk.0.onnx"):
            state["new"] = data[:-1] + bytes([data[-1] ^ 1])
            return name, state["new"]
        return name, data

    tampered = rewritten(packed, tmp_path / "t.tar", change)

    def fix_manifest(name: str, data: bytes) -> tuple[str, bytes]:
        if name != MANIFEST:
            return name, data
        manifest = json.loads(data)
        manifest["files"]["bundle/heads/mm_risk.0.onnx"]["sha256"] = hashlib.sha256(
            state["new"]
        ).hexdigest()
        return name, json.dumps(manifest).encode()

    consistent = rewritten(tampered, tmp_path / "c.tar", fix_manifest)
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(BundleArchiveError, match=r"heads/mm_risk\.0\.onnx: sha256 does not match"):
        unpack_bundle(consistent, into)


@pytest.mark.parametrize("where", ["in-the-middle", "last-byte", "between-members"])
def test_a_truncated_archive_is_refused(packed: Path, tmp_path: Path, where: str) -> None:
    last = members(packed)[-1]
    cut_at = {
        "in-the-middle": (last.offset_data + last.size) // 2,
        "last-byte": last.offset_data + last.size - 1,
        "between-members": last.offset,  # the last file's header and data never came
    }[where]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(packed.read_bytes()[:cut_at])
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(BundleArchiveError) as refused:
        unpack_bundle(cut, into)
    message = str(refused.value)
    assert any(word in message for word in ("truncated", "incomplete", "cut short")), message


def test_links_and_other_files_are_refused(packed: Path, tmp_path: Path) -> None:
    with tarfile.open(packed) as source:
        manifest = source.extractfile(MANIFEST).read()  # type: ignore[union-attr]
    bad = tmp_path / "link.tar"
    with tarfile.open(bad, "w") as out:
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(manifest)
        out.addfile(info, io.BytesIO(manifest))
        link = tarfile.TarInfo("bundle/encoder.onnx")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        out.addfile(link)
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(BundleArchiveError, match=r"bundle/encoder\.onnx is not a plain file"):
        unpack_bundle(bad, into)
    assert not (into / "bundle" / "encoder.onnx").exists()


def test_not_an_archive_at_all(tmp_path: Path) -> None:
    other = tmp_path / "notes.tar"
    other.write_text("a letter, not an archive\n" * 100)
    with pytest.raises(BundleArchiveError, match="not a readable bundle archive"):
        unpack_bundle(other, tmp_path)
    with pytest.raises(BundleArchiveError, match="no such file"):
        unpack_bundle(tmp_path / "missing.tar", tmp_path)
