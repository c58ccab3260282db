"""int8 StarDist network for CPU-only sites, accepted only if it finds what fp32 finds.

Static QDQ quantisation (ONNX Runtime): int8 weights per output channel, uint8
activations with MinMax ranges calibrated on tiles the gate never sees, at the slide
pipeline's tile size (928 px with margins); every Conv, ReLU, MaxPool and Concat is
quantised except the first Conv, which reads the normalised image. The choices are
measured (docs/BENCHMARKS.md, ``cytoedge bench segmentation --variants``): quantising
the first Conv as well, or calibrating on 512 px tiles, lost an fp32 detection on the
held-out tiles; leaving ReLU, MaxPool and Concat in float gave back most of the speed.

The gate (limits in runtime.parity): on the gate tiles, every fp32 detection is
matched one-to-one by an int8 detection at polygon IoU >= 0.5, int8's extra
detections are at most 1 % of fp32's, and, when the tiles come with instance masks,
F1 at IoU 0.5 moves by at most 0.01. Otherwise nothing is written and the result
says why, so the bundle keeps fp32 alone and records the reason.

The gate tiles are synthetic stained fields unless the model owner gives a folder of
the site's own held-out field photos (``export segmenter --int8 --gate-tiles DIR``):
an int8 network passed 196 of 196 on synthetic tiles and lost about 5 % of the fp32
detections on real photos (docs/BENCHMARKS.md). Each photo is read as a field folder's
photo is served, at the working grid of 0.25 um/px with its pixel size from its
sidecar, its metadata or ``--gate-pixel-size`` (``appliance.readers.pixel_size``), and
goes to the network without stain normalisation (that needs a bundle's stain
reference, which an export folder has not). Calibration stays on the synthetic tiles,
so the photos remain held out.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.pipeline.segmentation import (
    INPUT_NAME,
    MatchCounts,
    Segmenter,
    match_detections,
    match_instances,
    network_input,
    segmenter_spec,
)
from export.int8 import Int8Result, quantize_static_qdq
from runtime.backends.ort_cpu import OrtCpuBackend
from runtime.files import write_bytes_atomic
from runtime.parity import (
    SEGMENTER_INT8_MAX_EXTRA,
    SEGMENTER_INT8_MAX_F1_CHANGE,
    SEGMENTER_INT8_MIN_IOU,
    stained_field,
)

INT8_FILE = "segmenter.int8.onnx"
CALIBRATION_PX = 928  # the slide pipeline's tile with its margins
QUANTISED_OPS = ("Conv", "Relu", "MaxPool", "Concat")
# Without tiles from the caller: stained fields of nuclei (runtime.parity.stained_field),
# calibration and gate on different seeds.
DEFAULT_CALIBRATION = (4, CALIBRATION_PX, 4100)  # tiles, px, first seed
DEFAULT_GATE = (8, 512, 4200)


class GateTilesError(ValueError):
    """A ``--gate-tiles`` folder that gives no photo to gate on; one line."""


@dataclass(frozen=True)
class GateTiles:
    """Real field photos for the gate, at the working grid, and what was left out."""

    tiles: list[np.ndarray]
    names: list[str]
    skipped: list[str]  # "name (reason)" of each image that could not be read
    description: str  # for the provenance


def read_gate_tiles(folder: Path, pixel_size_um: float = 0.0) -> GateTiles:
    """The field photos of ``folder`` (JPEG / PNG / BMP / single-image TIFF) at the
    working grid (module docstring); unreadable ones are skipped and named. Raises
    GateTilesError when the folder gives none."""
    from appliance.pipeline.fields import read_field
    from appliance.readers.errors import ScanError
    from appliance.readers.field_folder import single_field
    from appliance.readers.formats import FIELD_EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        raise GateTilesError(f"{folder}: not a folder of field photos to gate int8 on")
    tiles, names, skipped = [], [], []
    paths = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FIELD_EXTENSIONS
    )
    for path in paths:
        try:
            rgb, _ = read_field(single_field(path, pixel_size_um), 0)
        except ScanError as error:
            skipped.append(f"{path.name} ({error.reason})")
            continue
        tiles.append(rgb)
        names.append(path.name)
    if not tiles:
        found = f"{len(paths)} image file(s), none readable" if paths else "no image files"
        hint = f": {skipped[0]}" if skipped else ""
        raise GateTilesError(
            f"{folder}: no field photo to gate int8 on ({found}{hint}); give a folder of "
            "JPEG / PNG / BMP / TIFF fields with their pixel size (sidecar or --gate-pixel-size)"
        )
    pixels = sum(t.shape[0] * t.shape[1] for t in tiles) / 1e6
    description = f"{len(tiles)} field photos of {folder.name} at 0.25 um/px ({pixels:.2f} MP)" + (
        f", {len(skipped)} unreadable left out: " + "; ".join(skipped) if skipped else ""
    )
    return GateTiles(tiles, names, skipped, description)


def stained_tiles(n: int, size: int, seed: int) -> list[np.ndarray]:
    """``n`` stained fields of ``size`` px with about 25 nuclei per 512 x 512 px."""
    cells = max(4, round(25 * (size / 512) ** 2))
    return [stained_field(size, size, cells, seed + i) for i in range(n)]


def quantize_segmenter(
    fp32_path: str | Path,
    out_path: str | Path,
    section: Mapping[str, Any],
    *,
    calibration: Sequence[np.ndarray] | None = None,
    gate_tiles: Sequence[np.ndarray] | None = None,
    gate_truth: Sequence[np.ndarray] | None = None,
    threads: int = 0,
) -> Int8Result:
    """Quantise, gate, and write ``out_path`` only for an accepted network.

    ``calibration`` and ``gate_tiles``: RGB uint8 tiles (different ones); ``gate_truth``:
    instance masks of the gate tiles, for the F1 condition.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    calibration = calibration if calibration is not None else stained_tiles(*DEFAULT_CALIBRATION)
    gate_tiles = gate_tiles if gate_tiles is not None else stained_tiles(*DEFAULT_GATE)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        candidate = staging / "candidate.onnx"
        quantise_candidate(fp32_path, candidate, section, calibration)
        metrics = gate_figures(fp32_path, candidate, section, gate_tiles, gate_truth, threads)
        failures = _failures(metrics)
        if failures:
            return Int8Result(
                False,
                "int8 rejected, bundle keeps fp32: " + "; ".join(failures),
                None,
                metrics,
            )
        shutil.move(str(candidate), out_path)
        reason = (
            f"static-qdq int8 accepted: {metrics['matched']:.0f} of "
            f"{metrics['reference_detections']:.0f} fp32 detections matched at IoU "
            f">= {SEGMENTER_INT8_MIN_IOU} on {len(gate_tiles)} tiles, "
            f"{metrics['extra']:.0f} extra (<= {SEGMENTER_INT8_MAX_EXTRA:.0%})"
        )
        if "f1_change" in metrics:
            reason += (
                f", F1 {metrics['f1_fp32']:.3f} -> {metrics['f1_int8']:.3f} "
                f"(change <= {SEGMENTER_INT8_MAX_F1_CHANGE})"
            )
        return Int8Result(True, reason, "static-qdq", metrics, out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gate_figures(
    fp32_path: Path,
    candidate_path: Path,
    section: Mapping[str, Any],
    tiles: Sequence[np.ndarray],
    truth: Sequence[np.ndarray] | None = None,
    threads: int = 0,
) -> dict[str, float]:
    """Detection parity (and F1 with ``truth``) of a candidate network against fp32."""
    reference = Segmenter(OrtCpuBackend(Path(fp32_path), "fp32", threads=threads), section)
    candidate = Segmenter(OrtCpuBackend(Path(candidate_path), "int8", threads=threads), section)
    parity, f1_ref, f1_cand = MatchCounts(0, 0, 0), MatchCounts(0, 0, 0), MatchCounts(0, 0, 0)
    for index, tile in enumerate(tiles):
        found, got = reference.detect(tile), candidate.detect(tile)
        shape = (tile.shape[0], tile.shape[1])
        parity = parity + match_detections(found, got, shape, SEGMENTER_INT8_MIN_IOU)
        if truth is not None:
            f1_ref = f1_ref + match_instances(truth[index], found.labels(shape), 0.5)
            f1_cand = f1_cand + match_instances(truth[index], got.labels(shape), 0.5)
    metrics = {
        "reference_detections": float(parity.true_positives + parity.false_negatives),
        "matched": float(parity.true_positives),
        "missing": float(parity.false_negatives),
        "extra": float(parity.false_positives),
    }
    if truth is not None:
        metrics |= {
            "f1_fp32": f1_ref.f1,
            "f1_int8": f1_cand.f1,
            "f1_change": abs(f1_cand.f1 - f1_ref.f1),
        }
    return metrics


def _failures(metrics: dict[str, float]) -> list[str]:
    failures = []
    if metrics["reference_detections"] == 0:
        failures.append("no fp32 detection on the gate tiles to compare")
    if metrics["missing"]:
        failures.append(
            f"{metrics['missing']:.0f} of {metrics['reference_detections']:.0f} fp32 "
            f"detections unmatched at IoU {SEGMENTER_INT8_MIN_IOU}"
        )
    if metrics["extra"] > SEGMENTER_INT8_MAX_EXTRA * metrics["reference_detections"]:
        failures.append(
            f"{metrics['extra']:.0f} extra detections (limit "
            f"{SEGMENTER_INT8_MAX_EXTRA:.0%} of {metrics['reference_detections']:.0f})"
        )
    if metrics.get("f1_change", 0.0) > SEGMENTER_INT8_MAX_F1_CHANGE:
        failures.append(
            f"F1 {metrics['f1_fp32']:.3f} -> {metrics['f1_int8']:.3f} "
            f"(limit {SEGMENTER_INT8_MAX_F1_CHANGE})"
        )
    return failures


def _padded(tile: np.ndarray, spec: Any) -> np.ndarray:
    """The network's input for ``tile`` as ``pipeline.segmentation.Segmenter.predict`` makes it."""
    x = network_input(tile, spec)
    pad = [(0, (-s) % d) for s, d in zip(x.shape[:2], spec.div_by, strict=True)]
    return np.pad(x, [*pad, (0, 0)], mode="reflect")[None]


def quantise_candidate(
    fp32_path: Path,
    out_path: Path,
    section: Mapping[str, Any],
    calibration: Sequence[np.ndarray],
    *,
    ops: Sequence[str] = QUANTISED_OPS,
    keep_first_conv: bool = True,
) -> None:
    """Write the static QDQ int8 network (module docstring), ungated. ``ops`` and
    ``keep_first_conv`` let the bench measure the alternatives."""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    spec = segmenter_spec(section)
    inputs = [_padded(tile, spec) for tile in calibration]
    prepared = Path(out_path).with_suffix(".prepared.onnx")
    # StarDist's graph has dynamic height and width: ONNX shape inference only.
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared), load_external_data=False).graph
    first_conv = next(node.name for node in graph.node if node.op_type == "Conv")
    try:
        quantize_static_qdq(
            prepared,
            Path(out_path),
            INPUT_NAME,
            inputs,
            op_types_to_quantize=list(ops),
            nodes_to_exclude=[first_conv] if keep_first_conv else [],
        )
    finally:
        prepared.unlink(missing_ok=True)


def add_int8_to_export(folder: Path, threads: int = 0, gate: GateTiles | None = None) -> Int8Result:
    """``cytoedge export segmenter --int8``: try int8 on the folder ``export_segmenter``
    wrote, calibrated on stained fields and gated on ``gate``'s photos (stained fields
    without), and record the outcome in its ``export.json`` and ``segmenter.json`` (the
    section's ``variants`` and ``int8_note``, the provenance's ``int8``)."""
    folder = Path(folder)
    documents = {
        name: json.loads((folder / name).read_text(encoding="utf-8"))
        for name in ("export.json", "segmenter.json")
    }
    section = dict(documents["segmenter.json"]["segmenter"])
    outcome = quantize_segmenter(
        folder / section["file"],
        folder / INT8_FILE,
        section,
        gate_tiles=gate.tiles if gate is not None else None,
        threads=threads,
    )
    section["int8_note"] = outcome.reason
    section.pop("variants", None)
    if outcome.accepted:
        section["variants"] = {"int8": INT8_FILE}
    record = {
        "accepted": outcome.accepted,
        "reason": outcome.reason,
        "gate": outcome.metrics,
        "calibration": "{} stained fields of {} px, seeds from {}".format(*DEFAULT_CALIBRATION),
        "gate_tiles": gate.description
        if gate is not None
        else "{} stained fields of {} px, seeds from {}".format(*DEFAULT_GATE),
    }
    documents["export.json"]["section"] = section
    documents["segmenter.json"]["segmenter"] = section
    for document in documents.values():
        document.setdefault("provenance", {})["int8"] = record
    for name, document in documents.items():
        write_bytes_atomic(folder / name, json.dumps(document, indent=2).encode("utf-8"))
    return outcome
