"""A Triton Inference Server model repository written from a bundle, and the names the
``triton`` backend looks its networks up by.

A lab with several workstations can run the networks on one GPU server
(docs/triton.md). Each network of a bundle becomes one Triton model, named after the
bundle and the network's file (``model_name``): its ``model.onnx`` in a numbered
version folder and a ``config.pbtxt`` with the ONNX file's inputs and outputs,
dynamic batching where the first axis is a batch, and the instances to run.

Triton numbers versions with integers; a bundle's version is a string. The
repository keeps ``cytoedge-repository.json`` at its root (Triton reads only the
model folders) with the number each bundle version was given, and every model's
``parameters`` name, per number, the bundle version and its sha256. Writing a newer
bundle into the same repository adds version folders beside the old ones, and the
server serves all of them (``version_policy: { all { } }``): each workstation
asks for the number whose sha256 is its own bundle's, so a site rolls its
workstations forward and back one by one as it does locally.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle_format import Bundle
from runtime.files import write_bytes_atomic

RECORD = "cytoedge-repository.json"
# parameters keys: the bundle's name, and per version number its version and sha256.
BUNDLE_KEY = "cytoedge.bundle"
VERSION_KEY = "cytoedge.{number}.version"
SHA256_KEY = "cytoedge.{number}.sha256"
# Triton's data types by numpy dtype, as config.pbtxt (TYPE_*) and the wire ("FP32") say them.
WIRE_TYPES = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float64): "FP64",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.bool_): "BOOL",
}
# Dynamic batching: the sizes the scheduler tries to form, and how long a request may
# wait for others to join it (microseconds: a batch of cells takes tens of ms on a GPU).
PREFERRED_BATCHES = (16, 64)
MAX_BATCH = 256  # the encoder's largest engine profile (runtime.engines.BATCH_PROFILES)
MAX_QUEUE_DELAY_US = 2000
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class RepositoryError(ValueError):
    """A repository that cannot be written; the message is one line."""


@dataclass(frozen=True)
class Tensor:
    """One input or output as Triton sees it: ``dims`` without the batch axis when the
    model batches; -1 where a dimension is free."""

    name: str
    dtype: np.dtype
    dims: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype.name, "dims": list(self.dims)}


@dataclass(frozen=True)
class Network:
    """One network of a bundle as one Triton model."""

    name: str  # the Triton model's name
    relative: str  # the fp32 ONNX file below the bundle folder
    batched: bool  # the first axis of every input and output is a batch
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @property
    def max_batch_size(self) -> int:
        return MAX_BATCH if self.batched else 0

    def signature(self) -> dict[str, Any]:
        """What must stay the same for two bundle versions to share one model."""
        return {
            "batched": self.batched,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }


def model_name(bundle_name: str, relative: str) -> str:
    """The Triton model of a bundle's network: ``<bundle>__<file without .onnx>``, '/'
    as '__' (``heads/cells.0.onnx`` of cytoedge-demo: ``cytoedge-demo__heads__cells.0``)."""
    stem = relative.removesuffix(".onnx").replace("/", "__")
    return _UNSAFE.sub("_", f"{bundle_name}__{stem}")


def network_files(bundle: Bundle) -> list[str]:
    """The fp32 file of every network a bundle runs: encoder, segmenter, cell head and
    case head members (the server's GPU runs fp32 or its own fp16 engine, never int8)."""
    files = [bundle.encoder.variants["fp32"]]
    if bundle.segmenter is not None:
        files.append(bundle.segmenter.file)
    heads = [bundle.cell_head] if bundle.cell_head is not None else []
    files += [relative for head in [*heads, *bundle.heads] for relative in head.files]
    return list(dict.fromkeys(files))


def describe_network(bundle: Bundle, relative: str) -> Network:
    """The network's tensors read from its ONNX file (names, dtypes, shapes)."""
    import onnxruntime as ort

    from runtime.backends.ort import _spec

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            str(bundle.file(relative)), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # ORT raises its own pybind error types
        raise RepositoryError(f"{relative}: onnxruntime cannot read it: {exc}") from None
    specs = (
        [_spec(node) for node in session.get_inputs()],
        [_spec(node) for node in session.get_outputs()],
    )
    batched = all(
        spec.shape and not isinstance(spec.shape[0], int) for group in specs for spec in group
    )
    inputs, outputs = (
        tuple(
            Tensor(
                spec.name,
                spec.dtype,
                tuple(d if isinstance(d, int) else -1 for d in spec.shape[1 if batched else 0 :]),
            )
            for spec in group
        )
        for group in specs
    )
    for tensor in (*inputs, *outputs):
        if tensor.dtype not in WIRE_TYPES:
            raise RepositoryError(f"{relative}: tensor {tensor.name} is {tensor.dtype}")
    return Network(model_name(bundle.name, relative), relative, batched, inputs, outputs)


def config_text(network: Network, versions: list[dict[str, Any]], instances: int, gpu: bool) -> str:
    """``config.pbtxt`` of one model; ``versions``: the record's entries that hold it."""

    def tensors(kind: str, group: tuple[Tensor, ...]) -> list[str]:
        rows = [
            f"  {{ name: {_quote(t.name)} data_type: TYPE_{WIRE_TYPES[t.dtype]} "
            f"dims: [ {', '.join(map(str, t.dims))} ] }}"
            for t in group
        ]
        return [f"{kind} [", ",\n".join(rows), "]"]

    lines = [
        f"name: {_quote(network.name)}",
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {network.max_batch_size}",
        *tensors("input", network.inputs),
        *tensors("output", network.outputs),
        "version_policy: { all { } }",
        f"instance_group [ {{ count: {instances} kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]",
    ]
    if network.batched:
        sizes = ", ".join(str(size) for size in PREFERRED_BATCHES)
        lines.append(
            f"dynamic_batching {{ preferred_batch_size: [ {sizes} ] "
            f"max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US} }}"
        )
    bundle_name = versions[0]["bundle"]
    parameters = [(BUNDLE_KEY, bundle_name)]
    for entry in versions:
        number = entry["number"]
        parameters += [
            (VERSION_KEY.format(number=number), entry["version"]),
            (SHA256_KEY.format(number=number), entry["sha256"]),
        ]
    lines += [
        f"parameters {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}"
        for key, value in parameters
    ]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """A string in protobuf's text format (its escapes are JSON's for these)."""
    return json.dumps(text, ensure_ascii=False)


def read_record(out: Path) -> dict[str, Any]:
    path = out / RECORD
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise RepositoryError(f"{out}: not empty and not a cytoedge repository (no {RECORD})")
        return {"versions": []}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"{path}: cannot read it: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("versions"), list):
        raise RepositoryError(f"{path}: not a cytoedge repository record")
    return record


def write_repository(bundle: Bundle, out: Path, *, instances: int = 1, gpu: bool = True) -> int:
    """Add ``bundle`` to the repository ``out`` (created when missing) and return the
    version number it was given (its existing number when it is there already).

    Every check comes before the first write; each version folder is written beside
    its model and renamed into place, the configs atomically, the record last, so an
    interrupted run leaves the repository as it was or with unrecorded extra folders
    Triton serves under no sha256 a workstation asks for.
    """
    record = read_record(out)
    for entry in record["versions"]:
        if entry["sha256"] == bundle.sha256:
            return int(entry["number"])
    networks = [describe_network(bundle, relative) for relative in network_files(bundle)]
    known: dict[str, dict[str, Any]] = record.setdefault("models", {})
    for network in networks:
        before = known.get(network.name)
        if before is not None and before != network.signature():
            raise RepositoryError(
                f"{out}: {network.relative} of {bundle.name} {bundle.version} takes or gives "
                f"other tensors than the versions of model {network.name} already there; "
                "write it into a new repository"
            )
    number = 1 + max((int(e["number"]) for e in record["versions"]), default=0)
    entry = {
        "number": number,
        "bundle": bundle.name,
        "version": bundle.version,
        "sha256": bundle.sha256,
        "models": [network.name for network in networks],
    }
    out.mkdir(parents=True, exist_ok=True)
    for network in networks:
        _write_version(bundle.file(network.relative), out / network.name, number)
    record["versions"].append(entry)
    for network in networks:
        known[network.name] = network.signature()
        holding = [e for e in record["versions"] if network.name in e["models"]]
        text = config_text(network, holding, instances, gpu)
        write_bytes_atomic(out / network.name / "config.pbtxt", text.encode("utf-8"))
    write_bytes_atomic(out / RECORD, json.dumps(record, indent=2).encode("utf-8"))
    return number


def _write_version(onnx: Path, model_dir: Path, number: int) -> None:
    target = model_dir / str(number)
    if target.exists():
        shutil.rmtree(target)  # an earlier interrupted run's folder, never recorded
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{number}-", dir=model_dir))
    try:
        shutil.copyfile(onnx, staging / "model.onnx")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def served_versions(parameters: dict[str, str]) -> dict[int, tuple[str, str]]:
    """{number: (bundle version, sha256)} from a model config's ``parameters``."""
    found: dict[int, tuple[str, str]] = {}
    for key, value in parameters.items():
        match = re.fullmatch(r"cytoedge\.(\d+)\.version", key)
        if match:
            number = int(match.group(1))
            found[number] = (value, parameters.get(SHA256_KEY.format(number=number), ""))
    return found
