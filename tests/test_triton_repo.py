"""``cytoedge bundle triton-repo``: the repository's configs parse as Triton's own
ModelConfig (a field Triton does not know fails), one model per network, and a newer
bundle adds version folders that name their bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli.main import app
from runtime.bundle_format import Bundle
from runtime.triton_repo import (
    RECORD,
    RepositoryError,
    model_name,
    served_versions,
    write_repository,
)
from tests.runtime_models import TinyBundle

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")


def parse_config(path: Path) -> object:
    config = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(encoding="utf-8"), config)
    return config


@pytest.fixture
def tiny(tmp_path: Path) -> TinyBundle:
    return TinyBundle(tmp_path / "tiny")


def test_every_network_is_a_model_whose_config_triton_parses(
    tiny: TinyBundle, tmp_path: Path
) -> None:
    bundle = tiny.write()
    out = tmp_path / "repo"
    result = CliRunner().invoke(app, ["bundle", "triton-repo", str(bundle.path), str(out)])
    assert result.exit_code == 0, result.output
    assert "version 1" in result.output
    files = [bundle.encoder.variants["fp32"], *(f for head in bundle.heads for f in head.files)]
    models = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert models == sorted(model_name(bundle.name, f) for f in files)
    encoder = parse_config(out / model_name(bundle.name, "encoder.onnx") / "config.pbtxt")
    assert encoder.platform == "onnxruntime_onnx"
    assert encoder.max_batch_size > 0
    assert [(t.name, list(t.dims)) for t in encoder.input] == [("pixels", [3, 32, 32])]
    assert model_config_pb2.DataType.Name(encoder.input[0].data_type) == "TYPE_FP32"
    assert [(t.name, list(t.dims)) for t in encoder.output] == [("embedding", [16])]
    assert list(encoder.dynamic_batching.preferred_batch_size) == [16, 64]
    assert encoder.dynamic_batching.max_queue_delay_microseconds > 0
    assert encoder.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert encoder.version_policy.HasField("all")
    head = parse_config(out / model_name(bundle.name, "heads/mm_risk.0.onnx") / "config.pbtxt")
    # A bag is one input, not a batch of them: no batch axis, no dynamic batching.
    assert head.max_batch_size == 0
    assert not head.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in head.input] == [("features", [-1, 16])]
    parameters = {key: value.string_value for key, value in head.parameters.items()}
    assert served_versions(parameters) == {1: (bundle.version, bundle.sha256)}
    onnx_copy = out / model_name(bundle.name, "encoder.onnx") / "1" / "model.onnx"
    assert onnx_copy.read_bytes() == bundle.file("encoder.onnx").read_bytes()


def test_an_unknown_field_fails_the_parse(tiny: TinyBundle, tmp_path: Path) -> None:
    bundle = tiny.write()
    write_repository(bundle, tmp_path / "repo")
    config = tmp_path / "repo" / model_name(bundle.name, "encoder.onnx") / "config.pbtxt"
    config.write_text(config.read_text() + "cytoedge_extra: 1\n")
    with pytest.raises(text_format.ParseError):
        parse_config(config)


def test_a_newer_bundle_adds_a_version_beside_the_old(tiny: TinyBundle, tmp_path: Path) -> None:
    first = tiny.write()
    out = tmp_path / "repo"
    assert write_repository(first, out) == 1
    tiny.path = tmp_path / "tiny-1.1"
    second: Bundle = tiny.write(version="1.1")
    assert write_repository(second, out) == 2
    assert write_repository(first, out) == 1  # already there: nothing new
    model = out / model_name(first.name, "encoder.onnx")
    assert sorted(p.name for p in model.iterdir() if p.is_dir()) == ["1", "2"]
    config = parse_config(model / "config.pbtxt")
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert served_versions(parameters) == {1: ("1.0", first.sha256), 2: ("1.1", second.sha256)}
    record = json.loads((out / RECORD).read_text())
    assert [(v["number"], v["version"]) for v in record["versions"]] == [(1, "1.0"), (2, "1.1")]


def test_a_network_with_other_tensors_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    out = tmp_path / "repo"
    write_repository(TinyBundle(tmp_path / "a").write(), out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    wider = TinyBundle(tmp_path / "b", dim=24).write(version="2.0")
    with pytest.raises(RepositoryError, match="other tensors") as raised:
        write_repository(wider, out)
    assert "\n" not in str(raised.value)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_a_folder_that_is_not_a_repository_is_refused(tiny: TinyBundle, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "notes.txt").write_text("someone's files")
    result = CliRunner().invoke(app, ["bundle", "triton-repo", str(tiny.write().path), str(out)])
    assert result.exit_code == 1
    assert "not a cytoedge repository" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
