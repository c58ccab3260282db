"""The new segmenter against the current one on the held-out fields, and its bundle version.

Both networks are scored by the appliance's own segmentation (``appliance.pipeline.
segmentation.Segmenter``: ONNX Runtime and StarDist's NMS, no TensorFlow), each at
fp32, on the held-out fields at the working grid: detection F1 at IoU 0.5, precision,
recall and the mean IoU of the matched cells, pooled over the fields by StarDist's
``matching_dataset``. The new one becomes a new bundle version when the caller asks
for it or when it is no worse on every one of the four figures.

The version holds the base's files with the new ``segmenter.onnx`` in place of the
old network (the old int8 network is dropped: it was gated against the old fp32 one)
and the StarDist model folder it was exported from (``segmenter-stardist/``), which
the next ``cytoedge train segmenter`` fine-tunes. Its ``provenance.segmenter_training``
holds the figures; ``report.md`` and ``report.json`` say the same for a person.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.pipeline.segmentation import Segmenter
from export.segmenter import NORMALISATION_FILE
from export.segmenter_fields import AnnotatedField
from export.segmenter_fit import BEST_WEIGHTS
from runtime.backends import RuntimeSettings
from runtime.bundle_format import Bundle, SegmenterSpec, write_bundle
from runtime.files import write_bytes_atomic

STARDIST_DIR = "segmenter-stardist"  # the StarDist folder a version keeps for fine-tuning
STARDIST_FILES = ("config.json", "thresholds.json", BEST_WEIGHTS, NORMALISATION_FILE)
IOU = 0.5
PROVENANCE_KEY = "segmenter_training"  # replaces the base's record of an earlier run
FIGURES = ("f1", "precision", "recall", "mean_matched_iou")
FIGURE_NAMES = {
    "f1": "detection F1 at IoU 0.5",
    "precision": "precision",
    "recall": "recall",
    "mean_matched_iou": "mean IoU of matched cells",
}


@dataclass(frozen=True)
class Figures:
    """One segmenter on the held-out fields."""

    f1: float
    precision: float
    recall: float
    mean_matched_iou: float
    true_positives: int
    false_positives: int
    false_negatives: int
    fields: int


def score(segmenter: Segmenter, fields: Sequence[AnnotatedField]) -> Figures:
    """Detect on every field and match against its annotation (StarDist's matching)."""
    from stardist.matching import matching_dataset

    truths = [item.labels for item in fields]
    found = [segmenter.segment(item.rgb)[0] for item in fields]
    stats = matching_dataset(truths, found, thresh=IOU, show_progress=False)
    return Figures(
        f1=float(stats.f1),
        precision=float(stats.precision),
        recall=float(stats.recall),
        mean_matched_iou=float(stats.mean_matched_score),
        true_positives=int(stats.tp),
        false_positives=int(stats.fp),
        false_negatives=int(stats.fn),
        fields=len(fields),
    )


def open_fp32(folder: Path, section: SegmenterSpec | Mapping[str, Any], threads: int) -> Segmenter:
    """A segmenter's fp32 network on ONNX Runtime's CPU, as scoring runs it there."""
    if isinstance(section, SegmenterSpec):
        section = dataclasses.replace(section, variants={}, int8_note="")
    settings = RuntimeSettings(backend="ort-cpu", threads=threads)
    return Segmenter.open(folder, section, settings)


def worse_on(new: Figures, current: Figures) -> list[str]:
    """The figures on which the new segmenter is below the current one (none: adopt it)."""
    return [name for name in FIGURES if getattr(new, name) < getattr(current, name)]


def write_version(
    base: Bundle,
    destination: Path,
    *,
    version: str,
    section: SegmenterSpec,
    onnx_path: Path,
    model_dir: Path,
    training: Mapping[str, Any],
    intended_use: str | None = None,
) -> Bundle:
    """``base`` with the new segmenter, as ``version`` at ``destination``."""
    old = set()
    if base.segmenter is not None:
        old = {base.segmenter.file, *base.segmenter.variants.values()}
    sources = {
        rel: base.file(rel)
        for rel in base.files
        if rel not in old and not rel.startswith(f"{STARDIST_DIR}/")
    }
    sources[section.file] = onnx_path
    for name in STARDIST_FILES:
        if (model_dir / name).is_file():
            sources[f"{STARDIST_DIR}/{name}"] = model_dir / name
    provenance = {**base.provenance, PROVENANCE_KEY: dict(training)}
    return write_bundle(
        destination,
        name=base.name,
        version=version,
        intended_use=intended_use or base.intended_use,
        sources=sources,
        encoder=base.encoder,
        heads=base.heads,
        segmenter=section,
        cell_head=base.cell_head,
        stain_reference=base.stain_reference,
        qc=base.qc,
        cells=base.cells,
        provenance=provenance,
    )


def kept_stardist(bundle: Bundle) -> Path | None:
    """The StarDist folder a version made here keeps for fine-tuning, if it has one."""
    folder = bundle.path / STARDIST_DIR
    if f"{STARDIST_DIR}/{BEST_WEIGHTS}" in bundle.files and (folder / "config.json").is_file():
        return folder
    return None


def write_report(folder: Path, training: Mapping[str, Any], title: str) -> Path:
    """``report.md`` (for a person) and ``report.json`` (the same, whole) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(folder / "report.json", json.dumps(training, indent=2).encode("utf-8"))
    path = folder / "report.md"
    write_bytes_atomic(path, markdown(training, title).encode("utf-8"))
    return path


def markdown(training: Mapping[str, Any], title: str) -> str:
    new, current = training["held_out"]["new"], training["held_out"]["current"]
    data = training["fields"]
    lines = [
        f"# {title}",
        "",
        f"Decision: **{training['decision']}**.",
        "",
        f"## Held-out fields ({new['fields']}, never trained on)",
        "",
        "| figure | current | new | change |",
        "|---|---|---|---|",
    ]
    for name in FIGURES:
        was, now = current[name], new[name]
        lines.append(f"| {FIGURE_NAMES[name]} | {was:.3f} | {now:.3f} | {now - was:+.3f} |")
    lines += [
        "",
        "Matched cells (true positives, false positives, false negatives): new "
        f"{new['true_positives']}, {new['false_positives']}, {new['false_negatives']}; current "
        f"{current['true_positives']}, {current['false_positives']}, {current['false_negatives']}.",
    ]
    layouts = ", ".join(f"{n} {name}" for name, n in data["layouts"].items())
    lines += [
        "",
        "## Annotated fields",
        "",
        f"- {data['folder']}: {data['count']} fields ({layouts}), {data['cells']} cells, at "
        "0.25 um/px (each photo resampled as serving reads it).",
        f"- Held out: {', '.join(data['held_out'])}.",
    ]
    if data["mask_cells"]:
        lines.append(
            f"- Binary masks: {data['merged']} of {data['mask_cells']} components look like "
            "touching cells merged into one (a neck narrower than half their widest); "
            "they were trained on as one."
        )
    fit = training["fit"]
    start = training["start"]
    lines += [
        "",
        "## Training",
        "",
        f"- Start: {start}.",
        f"- {fit['epochs_run']} of {fit['recipe']['epochs']} epochs"
        + (" (stopped early: no better validation loss)" if fit["stopped_early"] else "")
        + f", best validation loss {fit['best_val_loss']:.4f}, patches of {fit['patch_px']} px.",
        f"- Adam {fit['recipe']['learning_rate']:g}, batch {fit['recipe']['batch_size']}, "
        f"{fit['recipe']['steps_per_epoch']} steps per epoch, flips, quarter turns and "
        "intensity jitter.",
        f"- Thresholds chosen on the held-out fields: prob {training['thresholds']['prob']:.3f}, "
        f"nms {training['thresholds']['nms']:.3f}.",
        "",
    ]
    return "\n".join(lines)
