"""bundle.json: typed sections, schema errors with the key named, tamper detection."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from runtime.bundle_format import (
    BundleError,
    CellsSpec,
    QcSpec,
    SegmenterSpec,
    StainReference,
    load_bundle,
)
from tests.runtime_models import TinyBundle


@pytest.fixture
def tiny(tmp_path: Path) -> TinyBundle:
    return TinyBundle(tmp_path)


def edit_manifest(bundle_dir: Path, change: object) -> None:
    manifest = bundle_dir / "bundle.json"
    data = json.loads(manifest.read_text())
    change(data)  # type: ignore[operator]
    manifest.write_text(json.dumps(data))


def test_round_trip_keeps_every_section(tiny: TinyBundle) -> None:
    stain = StainReference(
        stain_matrix=((0.65, 0.70, 0.29), (0.07, 0.99, 0.11)),
        max_concentrations=(1.9, 1.0),
        intensity_p5=120.0,
        intensity_p95=230.0,
        extra={"source": "reference smear 12"},
    )
    segmenter_file = tiny.sources["encoder.onnx"]  # any file: the bundle only hashes it
    segmenter = SegmenterSpec(
        file="segmenter.onnx",
        n_rays=32,
        grid=(2, 2),
        div_by=(16, 16),
        prob_thresh=0.5,
        nms_thresh=0.4,
        input_channels=3,
        normalisation={"kind": "percentile", "low": 1.0, "high": 99.8},
        extra={"tile_px": 1024},
    )
    written = tiny.write(
        sources={**tiny.sources, "segmenter.onnx": segmenter_file},
        segmenter=segmenter,
        stain_reference=stain,
        qc=QcSpec(laplacian_min=80.0, extra={"blur_kernel": 3}),
        cells=CellsSpec(min_cells=30),
        provenance={"encoder_source_sha256": "ab" * 32, "metrics": {"auc": 0.81}},
    )
    loaded = load_bundle(tiny.path)
    assert loaded == written
    assert loaded.segmenter == segmenter
    assert loaded.stain_reference == stain
    assert loaded.qc.laplacian_min == 80.0 and loaded.qc.extra == {"blur_kernel": 3}
    assert loaded.cells.min_cells == 30 and loaded.cells.patch_px == 128
    assert loaded.head("mm_risk").thresholds["t4_14"] == 0.4
    assert loaded.head("mm_risk").label("del17p") == "del(17p)"
    assert loaded.head("pb_screen").outputs == ("acute_leukemia", "lymphoma", "mds", "healthy")
    assert loaded.encoder_variants().fp32 == tiny.path / "encoder.onnx"
    assert loaded.engines_dir == tiny.path / "engines"
    assert len(loaded.sha256) == 64 and loaded.is_demo
    assert sorted(loaded.files) == sorted([*tiny.sources, "segmenter.onnx"])
    data = json.loads((tiny.path / "bundle.json").read_text())
    assert data["format_version"] == 1 and data["qc"]["blur_kernel"] == 3


def test_a_flipped_byte_is_refused_naming_the_file(tiny: TinyBundle) -> None:
    tiny.write()
    target = tiny.path / "heads" / "mm_risk.1.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"heads/mm_risk\.1\.onnx: sha256 does not match"):
        load_bundle(tiny.path)


def test_missing_and_resized_files_are_refused(tiny: TinyBundle) -> None:
    tiny.write()
    (tiny.path / "encoder.onnx").write_bytes(b"short")
    with pytest.raises(BundleError, match=r"encoder\.onnx: 5 bytes"):
        load_bundle(tiny.path)
    (tiny.path / "encoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"encoder\.onnx: listed in files but missing"):
        load_bundle(tiny.path)


def test_engines_folder_is_not_hashed(tiny: TinyBundle) -> None:
    tiny.write()
    (tiny.path / "engines").mkdir()
    (tiny.path / "engines" / "encoder.engine").write_bytes(b"any")
    assert load_bundle(tiny.path).name == "tiny"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format_version=2), "format_version 2 is not supported"),
        (lambda d: d.pop("encoder"), "missing encoder"),
        (lambda d: d.update(colour="red"), "unknown key.*colour"),
        (lambda d: d.update(intended_use="diagnosis"), "intended_use must be one of"),
        (lambda d: d["encoder"].update(embed_dim="768"), "encoder.embed_dim must be an integer"),
        (lambda d: d["encoder"]["input"].update(mean=[0.5, 0.5]), r"encoder.input.mean must be"),
        (lambda d: d["encoder"].update(variants={"int8": "encoder.onnx"}), "name the fp32"),
        (lambda d: d["heads"][0].update(kind="mlp"), r"heads\[0\].kind must be one of"),
        (lambda d: d["heads"][0]["thresholds"].pop("gain1q"), "one threshold per task"),
        (lambda d: d["heads"][0]["thresholds"].update(del17p=1.5), "must lie in"),
        (lambda d: d["heads"][0].update(high_risk=["tp53"]), "not tasks of this head"),
        (lambda d: d["heads"][1].update(malignant_classes=["x"]), "not classes of this head"),
        (lambda d: d["heads"][1].update(thresholds={}), "malignancy is needed"),
        (lambda d: d["heads"][0].update(unknown=1), r"heads\[0\]: unknown key"),
        (lambda d: d["heads"][1].update(name="mm_risk"), "appear more than once"),
        (lambda d: d["heads"][0].update(files=["heads/x.onnx"]), "not listed in files"),
        (lambda d: d["files"].update({"../x": d["files"]["encoder.onnx"]}), "relative paths"),
        (lambda d: d["files"]["encoder.onnx"].update(sha256="xyz"), "64 lower-case hex"),
        (lambda d: d["heads"][0].update(calibration={"kind": "temperature"}), "uses platt"),
        (lambda d: d["qc"].update(laplacian_min="high"), "qc.laplacian_min must be a number"),
    ],
)
def test_schema_errors_name_the_key(tiny: TinyBundle, change: object, message: str) -> None:
    tiny.write()
    edit_manifest(tiny.path, change)
    with pytest.raises(BundleError, match=message) as caught:
        load_bundle(tiny.path)
    assert str(tiny.path / "bundle.json") in str(caught.value)
    assert "\n" not in str(caught.value)


def test_not_json_and_no_bundle(tiny: TinyBundle, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"no bundle\.json"):
        load_bundle(tmp_path / "nowhere")
    tiny.write()
    (tiny.path / "bundle.json").write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tiny.path)


def test_writer_refuses_bad_input_and_leaves_nothing_behind(tiny: TinyBundle) -> None:
    with pytest.raises(BundleError, match="intended_use must be one of"):
        tiny.write(intended_use="sale")
    with pytest.raises(BundleError, match=r"source file .* not found"):
        tiny.write(sources={**tiny.sources, "extra.txt": tiny.path / "absent.txt"})
    assert not tiny.path.exists()
    assert [p.name for p in tiny.path.parent.iterdir()] == ["parts"]
    tiny.write()
    with pytest.raises(BundleError, match="exists"):
        tiny.write()
    replaced = tiny.write(version="2.0", overwrite=True)
    assert replaced.version == "2.0" and load_bundle(tiny.path).version == "2.0"


def test_a_bundle_written_before_the_qc_scale_keeps_its_meaning(tmp_path: Path) -> None:
    tiny = TinyBundle(tmp_path)
    assert tiny.write().qc == QcSpec.current(), "new bundles carry the current QC"
    data = json.loads((tiny.path / "bundle.json").read_text())
    for key in ("blur_um_per_px", "intensity_relative_to_glass"):
        del data["qc"][key]
    data["qc"]["laplacian_min"] = 100.0
    (tiny.path / "bundle.json").write_text(json.dumps(data))  # as an older writer left it
    qc = load_bundle(tiny.path).qc
    assert (qc.blur_um_per_px, qc.laplacian_min, qc.intensity_relative_to_glass) == (
        0.25,
        100.0,
        False,
    )
    data["qc"]["blur_um_per_px"] = 5.0
    (tiny.path / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="blur_um_per_px"):
        load_bundle(tiny.path)


def test_heads_say_which_cases_they_score(tiny: TinyBundle) -> None:
    mm, pb = tiny.heads
    bundle = tiny.write(
        heads=[
            dataclasses.replace(mm, inputs=("scans",)),
            dataclasses.replace(pb, inputs=("fields", "cells")),
        ]
    )
    assert [h.name for h in bundle.heads_for({"scans"})] == ["mm_risk"]
    assert [h.name for h in bundle.heads_for({"cells"})] == ["pb_screen"]
    assert [h.name for h in bundle.heads_for({"fields", "cells"})] == ["pb_screen"]
    assert bundle.heads_for({"scans", "cells"}) == ()  # no head takes both
    assert load_bundle(bundle.path).heads[1].inputs == ("fields", "cells")
    edit_manifest(bundle.path, lambda d: d["heads"][0].update(inputs=["slides"]))
    with pytest.raises(BundleError, match=r"heads\[0\]\.inputs\[0\] must be one of scans, fields"):
        load_bundle(bundle.path)
    edit_manifest(bundle.path, lambda d: d["heads"][0].update(inputs=[]))
    with pytest.raises(BundleError, match=r"heads\[0\]\.inputs must list each"):
        load_bundle(bundle.path)


def test_the_slide_part_of_a_bundle_ignores_its_heads(tiny: TinyBundle, tmp_path: Path) -> None:
    first = tiny.write()
    tiny.path = tmp_path / "retrained"
    mm = dataclasses.replace(tiny.heads[0], thresholds=dict.fromkeys(tiny.heads[0].thresholds, 0.3))
    retrained = tiny.write(heads=[mm])
    assert retrained.sha256 != first.sha256
    assert retrained.slide_sha256 == first.slide_sha256  # same networks: same processed slides
    tiny.path = tmp_path / "other-cells"
    other = tiny.write(cells=CellsSpec(min_object_px=300))
    assert other.slide_sha256 != first.slide_sha256


def test_a_bundle_of_networks_without_heads_loads(tiny: TinyBundle) -> None:
    bare = tiny.write(heads=[], sources={"encoder.onnx": tiny.sources["encoder.onnx"]})
    assert bare.heads == () and bare.heads_for("scans") == ()
