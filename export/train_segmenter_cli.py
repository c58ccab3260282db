"""``cytoedge train segmenter FIELDS``: a site's own StarDist, compared before it is adopted.

Reads the annotated fields (export/segmenter_fields.py), holds out 20 % of them by
image, fine-tunes the bundle's segmenter on the rest (or trains a new one), exports it
behind its parity gate, scores it and the current one on the held-out fields and
writes a new bundle version when asked (``--adopt``) or when it is no worse on every
figure (export/segmenter_adopt.py). docs/training.md, "Training the segmenter".
Exit 0 when the version is written, 1 when it is not (worse, or a failed gate), 2
with one line for fields, a bundle or a start that cannot be used.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from appliance.cli.shared import check_signing_key, fail, setup, sign_written_version

if TYPE_CHECKING:
    from rich.console import Console

    from appliance.config import Config
    from export.segmenter_fields import AnnotatedField, AnnotatedSet
    from export.segmenter_fit import FitRecipe
    from runtime.bundle_format import Bundle

HELD_OUT_SHARE = 0.2


@dataclass(frozen=True)
class SegmenterRun:
    """What ``cytoedge train segmenter`` was asked (the options of ``cytoedge train``)."""

    fields: Path
    bundle: Path | None
    version: str | None
    out: Path | None
    report: Path | None
    work: Path | None
    pixel_size: float | None
    from_scratch: bool
    start_from: Path | None
    adopt: bool
    recipe: Path | None
    seed: int
    intended_use: str | None
    config: Path | None


def train_segmenter_command(run: SegmenterRun) -> None:
    """The command; raises ``typer.Exit`` with its status."""
    import dataclasses

    from rich.console import Console

    from appliance.pipeline.cell_finding import SlideParams
    from appliance.site.derived_versions import next_version, version_folder
    from export.segmenter import SegmenterExportError
    from export.segmenter_adopt import write_report
    from export.segmenter_fields import AnnotationError, as_served, read_annotated_fields
    from export.segmenter_fit import FitRecipe
    from runtime.bundle_format import BundleError, load_bundle

    cfg = setup(run.config)
    console = Console(stderr=True)
    try:
        base = load_bundle(run.bundle or cfg.bundle_dir)
        if base.segmenter is None:
            raise BundleError(f"{base.path}: has no segmenter to compare a new one with")
        recipe = FitRecipe.from_json(run.recipe) if run.recipe else FitRecipe()
        recipe = dataclasses.replace(recipe, seed=run.seed)
        start = _start(base, run)
        calibration = cfg.calibration
        if run.pixel_size is not None:
            calibration = dataclasses.replace(calibration, pixel_size_um=run.pixel_size, camera="")
        annotated = as_served(read_annotated_fields(run.fields, calibration), SlideParams.of(base))
        split = split_fields(annotated.fields, recipe.seed)
    except (BundleError, SegmenterExportError, AnnotationError) as exc:
        raise fail(str(exc)) from None
    version = run.version or next_version(base.version)
    destination = run.out or version_folder(cfg.data_dir / "bundles", base.name, version)
    if destination.exists():
        raise fail(f"{destination} exists; choose another --version or --out")
    check_signing_key(cfg)
    work = run.work or cfg.data_dir / "training" / "segmenter" / f"{base.name}-{version}"
    report = run.report or cfg.data_dir / "validation" / f"{base.name}-{version}" / "segmenter"
    _say_fields(annotated, console)
    try:
        training, made = _train_and_compare(base, annotated, split, start, recipe, work, console)
    except SegmenterExportError as exc:
        raise fail(str(exc), code=1) from None
    written = run.adopt or not training["worse_on"]
    worse = ", ".join(training["worse_on"])
    if not training["worse_on"]:
        training["decision"] = "written: no worse than the current segmenter on every figure"
    elif run.adopt:
        training["decision"] = f"written as asked (--adopt), although worse on {worse}"
    else:
        training["decision"] = f"not written: worse than the current segmenter on {worse}"
    training["written"] = written
    title = f"Segmenter for {base.name} {version}" + ("" if written else " (not written)")
    report_file = write_report(report, training, title)
    if not written:
        console.print(f"{training['decision']}; report {report_file}", markup=False)
        raise fail("the new segmenter was not adopted (--adopt writes it anyway)", code=1)
    _write(base, destination, version, made, training, run, cfg, console, report_file)


def _start(base: Bundle, run: SegmenterRun) -> Path | None:
    """The StarDist folder to fine-tune: ``--start-from``, else the one the bundle keeps;
    None with ``--from-scratch``."""
    from export.segmenter import SegmenterExportError
    from export.segmenter_adopt import STARDIST_DIR, kept_stardist
    from export.segmenter_fit import BEST_WEIGHTS

    if run.from_scratch:
        if run.start_from is not None:
            raise SegmenterExportError("--from-scratch and --start-from exclude each other")
        return None
    if run.start_from is not None:
        for name in ("config.json", BEST_WEIGHTS):
            if not (run.start_from / name).is_file():
                raise SegmenterExportError(f"{run.start_from}: no {name}; not a StarDist folder")
        return run.start_from
    kept = kept_stardist(base)
    if kept is None:
        raise SegmenterExportError(
            f"{base.path}: keeps no StarDist weights for its segmenter ({STARDIST_DIR}/); give "
            "--start-from MODEL_DIR (the folder `cytoedge export segmenter` read) or --from-scratch"
        )
    return kept


def split_fields(
    fields: tuple[AnnotatedField, ...], seed: int
) -> tuple[list[AnnotatedField], list[AnnotatedField]]:
    """(training, held-out): 20 % of the fields, at least one, chosen by a seeded shuffle."""
    from export.segmenter_fields import AnnotationError

    if len(fields) < 2:
        raise AnnotationError("at least 2 annotated fields are needed: one is held out")
    order = np.random.default_rng(seed).permutation(len(fields))
    held = max(1, round(HELD_OUT_SHARE * len(fields)))
    held_set = {int(i) for i in order[:held]}
    train = [f for i, f in enumerate(fields) if i not in held_set]
    return train, [f for i, f in enumerate(fields) if i in held_set]


def _say_fields(annotated: AnnotatedSet, console: Console) -> None:
    layouts = ", ".join(f"{n} {name}" for name, n in annotated.layouts().items())
    console.print(
        f"{annotated.folder}: {len(annotated.fields)} fields ({layouts}), {annotated.cells} cells",
        markup=False,
    )
    if annotated.components:
        console.print(
            f"Binary masks: touching cells merge into one component; {annotated.merged} of "
            f"{annotated.components} components look merged (a neck narrower than half "
            "their widest)"
        )


def _train_and_compare(
    base: Bundle,
    annotated: AnnotatedSet,
    split: tuple[list[AnnotatedField], list[AnnotatedField]],
    start: Path | None,
    recipe: FitRecipe,
    work: Path,
    console: Console,
) -> tuple[dict[str, Any], Any]:
    """Fit, export, score both; the training record and the exported segmenter."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from appliance.pipeline.segmentation import segmenter_spec
    from appliance.site.derived_versions import derived_from
    from export.segmenter import export_segmenter
    from export.segmenter_adopt import open_fp32, score, worse_on
    from export.segmenter_fit import epochs_done, fit_segmenter

    assert base.segmenter is not None
    spec = segmenter_spec(base.segmenter)
    train, held_out = split
    began = time.monotonic()
    columns = (
        TextColumn("Epoch"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
    )
    done_before = epochs_done(work)
    if done_before:
        console.print(f"Resuming after epoch {done_before} from {work}", markup=False)
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("epochs", total=recipe.epochs, completed=done_before, loss="")

        def progress(done: int, total: int, logs: dict[str, float]) -> None:
            losses = ", ".join(f"{k} {v:.4f}" for k, v in logs.items())
            bar.update(task, completed=done, total=total, loss=losses)

        fit = fit_segmenter(
            work, train, held_out, spec, start=start, recipe=recipe, progress=progress
        )
    trained = time.monotonic()
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # its steps are not the user's
    with console.status("Converting to ONNX and checking parity against TensorFlow..."):
        made = export_segmenter(fit.model_dir, work / "onnx", dict(spec.normalisation))
    new = score(open_fp32(work / "onnx", made.section, 0), held_out)
    current = score(open_fp32(base.path, base.segmenter, 0), held_out)
    worse = worse_on(new, current)
    training = {
        "derived_from": derived_from(base),
        "start": "from scratch" if start is None else f"fine-tuned from {start}",
        "fields": {
            "folder": str(annotated.folder),
            "count": len(annotated.fields),
            "layouts": annotated.layouts(),
            "cells": annotated.cells,
            "mask_cells": annotated.components,
            "merged": annotated.merged,
            "held_out": [f.name for f in held_out],
            "trained_on": [f.name for f in train],
            "pixel_sizes_um": {f.name: f.pixel_size_um for f in annotated.fields},
        },
        "fit": {
            "recipe": asdict(recipe),
            "epochs_run": fit.epochs_run,
            "best_val_loss": fit.best_val_loss,
            "stopped_early": fit.stopped_early,
            "patch_px": fit.patch_px,
            "resumed_at": fit.resumed_at,
        },
        "thresholds": {"prob": made.section["prob_thresh"], "nms": made.section["nms_thresh"]},
        "parity": made.parity.max_abs_diff,
        "held_out": {"iou": 0.5, "new": asdict(new), "current": asdict(current)},
        "worse_on": worse,
        "seconds": {
            "training": round(trained - began, 1),
            "export_and_scoring": round(time.monotonic() - trained, 1),
        },
    }
    _say_figures(training, console)
    return training, made


def _say_figures(training: dict[str, Any], console: Console) -> None:
    from export.segmenter_adopt import FIGURE_NAMES

    new, current = training["held_out"]["new"], training["held_out"]["current"]
    console.print(f"On {new['fields']} held-out fields, current -> new:")
    for name, label in FIGURE_NAMES.items():
        console.print(f"  {label}: {current[name]:.3f} -> {new[name]:.3f}")


def _write(
    base: Bundle,
    destination: Path,
    version: str,
    made: Any,
    training: dict[str, Any],
    run: SegmenterRun,
    cfg: Config,
    console: Console,
    report_file: Path,
) -> None:
    from appliance.pipeline.segmentation import segmenter_spec
    from export.segmenter_adopt import write_version
    from runtime.bundle_format import BundleError

    try:
        bundle = write_version(
            base,
            destination,
            version=version,
            section=segmenter_spec(made.section),
            onnx_path=made.onnx_path,
            model_dir=Path(made.provenance["source"]),
            training=training,
            intended_use=run.intended_use,
        )
    except BundleError as exc:
        raise fail(str(exc), code=1) from None
    console.print(
        f"Bundle {bundle.name} {bundle.version} ({bundle.intended_use}) at {bundle.path} with "
        f"the new segmenter ({training['decision']}); report {report_file}; "
        f"`cytoedge bundle use {destination.name}` switches to it",
        markup=False,
    )
    console.print(sign_written_version(cfg, bundle))
