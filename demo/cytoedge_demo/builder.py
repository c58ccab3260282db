"""The demo bundle: real architectures, weights made here, trained on synthetic smears.

Built once and cached (``cytoedge demo`` reuses a bundle that loads and verifies):

1. StarDist trained on synthetic smear tiles, exported to ONNX behind its
   parity gate. TensorFlow runs in a child process so that it never shares a
   process (and an OpenMP runtime) with torch.
2. Encoder: the DinoBloom architecture (ViT-S/14 at 224 px for CPU speed) with
   seeded random weights. timm initialises LayerScale at 1e-5, which makes
   every block nearly the identity; it is re-drawn in [0.2, 1.0] so that all
   blocks shape the embedding (docs/ENVIRONMENT.md). Exported to ONNX (+ int8
   when export.int8 accepts it).
3. Synthetic slides with hidden marker labels go through the appliance's own
   slide pipeline (``appliance.slides.process_slide``: QC, stain, StarDist,
   cells, encoder) with a first bundle that holds an untrained head; the
   gated-attention MIL head is trained on those embeddings
   (export.train_heads), thresholds by Youden on a validation split, and its
   AUC measured on held-out test slides: the proof that the signal flows from
   pixels to calls. ``intended_use`` is "demo".
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import Config
from cytoedge_demo import synthetic
from runtime.bundle import Bundle, BundleError, load_bundle

DEMO_NAME = "cytoedge-demo"
DEMO_VERSION = "1"
HEAD_NAME = "myeloma"
HIGH_RISK = ("del(17p)", "t(4;14)")
INDETERMINATE_BAND = 0.05
log = logging.getLogger(__name__)
Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class DemoRecipe:
    """Sizes chosen so that the whole build takes about a quarter of an hour on a 2-core CPU."""

    encoder_arch: str = "vit_small"
    encoder_depth: int = 0  # 0: the architecture's own; fewer blocks only for test fixtures
    seed: int = 20261127
    train_slides: int = 32
    val_slides: int = 12
    test_slides: int = 16
    slide_px: int = 768  # a square field at 0.25 um/px (~65 cells kept when dense)
    nucleated_per_mm2: float = 2400.0  # dense, so that a small field holds enough cells
    plasma_fraction: float = 0.6
    segmenter_tiles: int = 40
    segmenter_epochs: int = 16  # at 10 its detection confidence can stay below the cells filter
    segmenter_steps: int = 40
    head_epochs: int = 60
    head_bags_per_step: int = 4  # a few dozen bags: more, smaller steps than the paper's 16
    int8: bool = True
    threads: int = 0
    tags: dict[str, str] = field(default_factory=dict)


def _noop(stage: str, fraction: float) -> None:
    """Ignore progress."""


def demo_bundle_is_current(path: Path) -> Bundle | None:
    """The cached demo bundle when it loads, verifies and is a demo bundle; else None."""
    try:
        bundle = load_bundle(path)
    except BundleError as exc:
        if (path / "bundle.json").exists():
            log.warning("demo bundle at %s is unusable, rebuilding: %s", path, exc)
        return None
    return bundle if bundle.is_demo and bundle.name == DEMO_NAME else None


def build_demo_bundle(
    destination: Path,
    recipe: DemoRecipe | None = None,
    progress: Progress = _noop,
    *,
    segmenter: Path | None = None,
) -> Bundle:
    """Build the demo bundle into ``destination`` (replacing what is there).

    ``segmenter``: a folder ``cytoedge export segmenter`` wrote (segmenter.json and
    its ONNX file) to use instead of training one with the recipe.
    """
    recipe = recipe or DemoRecipe()
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=destination.parent))
    started = time.perf_counter()
    try:
        if segmenter is None:
            seg = train_segmenter(work / "segmenter", recipe, progress)
        else:
            seg = exported_segmenter(Path(segmenter))
        encoder_info = export_demo_encoder(work / "encoder", recipe, progress)
        stain = stain_reference(recipe)
        untrained = _untrained_head(work / "untrained", encoder_info["embed_dim"], recipe)
        stage1 = _write(
            work / "stage1", recipe, seg, encoder_info, stain, untrained, {"stage": "features"}
        )
        bags, labels = embed_synthetic_slides(work / "slides", stage1, recipe, progress)
        trained = train_demo_head(bags, labels, recipe, progress)
        heads_dir = work / "heads"
        from export.onnx_export import export_heads

        paths, reports = export_heads([trained["model"]], heads_dir, HEAD_NAME)
        head = {
            "files": {f"heads/{p.name}": p for p in paths},
            "thresholds": trained["thresholds"],
            "parity": [r.metrics for r in reports],
        }
        provenance = {
            "demo": "weights made here from seeded random initialisation and synthetic smears",
            "recipe": asdict(recipe),
            "segmenter": seg["provenance"],
            "encoder": encoder_info["provenance"],
            "heads": {
                "validation_auc": trained["validation_auc"],
                "test_auc": trained["test_auc"],
                "test_slides": len(labels["test"]),
                "epochs_run": trained["epochs_run"],
                "parity": head["parity"],
            },
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        bundle = _write(destination, recipe, seg, encoder_info, stain, head, provenance)
        progress("bundle", 1.0)
        return bundle
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- 1. segmenter ---------------------------------------------------------------------


def train_segmenter(out_dir: Path, recipe: DemoRecipe, progress: Progress) -> dict[str, Any]:
    """Train + export StarDist in a child process; returns the section, file and provenance."""
    progress("segmenter", 0.0)
    out_dir.mkdir(parents=True)
    args = {
        "model_dir": str(out_dir / "model"),
        "out_dir": str(out_dir / "onnx"),
        "n_tiles": recipe.segmenter_tiles,
        "epochs": recipe.segmenter_epochs,
        "steps": recipe.segmenter_steps,
        "seed": recipe.seed % 10_000,
        "threads": recipe.threads,
    }
    code = (
        "import json, sys; from cytoedge_demo.builder import _segmenter_child; "
        "_segmenter_child(json.loads(sys.argv[1]))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    tail: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        epoch = re.search(r"EPOCH (\d+)/(\d+)", line)
        if epoch:
            progress("segmenter", 0.9 * int(epoch.group(1)) / int(epoch.group(2)))
        else:
            tail = [*tail[-30:], line.rstrip()]
    if process.wait() != 0:
        raise RuntimeError("segmenter training failed:\n" + "\n".join(tail[-15:]))
    progress("segmenter", 1.0)
    return exported_segmenter(out_dir / "onnx")


def exported_segmenter(folder: Path) -> dict[str, Any]:
    """The section, file and provenance of a folder ``cytoedge export segmenter`` wrote."""
    document = json.loads((folder / "segmenter.json").read_text(encoding="utf-8"))
    return {
        "file": folder / document["segmenter"]["file"],
        "section": document["segmenter"],
        "provenance": document["provenance"],
    }


def _segmenter_child(args: dict[str, Any]) -> None:
    """Runs in the child process: TensorFlow lives and dies here."""
    from export.segmenter import TrainingRecipe, export_segmenter, train_segmenter

    recipe = TrainingRecipe(
        n_tiles=args["n_tiles"],
        epochs=args["epochs"],
        steps_per_epoch=args["steps"],
        seed=args["seed"],
    )

    def report(done: int, total: int) -> None:
        print(f"EPOCH {done}/{total}", flush=True)

    model_dir = train_segmenter(
        Path(args["model_dir"]),
        synthetic.segmentation_tiles,
        recipe,
        threads=args["threads"],
        progress=report,
    )
    export_segmenter(model_dir, Path(args["out_dir"]), threads=args["threads"])


# --- 2. encoder -----------------------------------------------------------------------


def demo_encoder(arch: str, seed: int, depth: int = 0) -> Any:
    """The DinoBloom architecture with seeded random weights and LayerScale in [0.2, 1]."""
    import torch

    from export.encoder import build_encoder

    torch.manual_seed(seed)
    model = build_encoder(arch)
    if depth:  # a shallower copy for fast test fixtures; the bundle names the depth
        model.blocks = model.blocks[:depth]
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                parameter.copy_(0.2 + 0.8 * torch.rand(parameter.shape, generator=generator))
    return model.eval()


def export_demo_encoder(out_dir: Path, recipe: DemoRecipe, progress: Progress) -> dict[str, Any]:
    from export.encoder import ARCHITECTURES
    from export.onnx_export import export_encoder

    progress("encoder", 0.0)
    out_dir.mkdir(parents=True)
    model = demo_encoder(recipe.encoder_arch, recipe.seed, recipe.encoder_depth)
    fp32 = out_dir / "encoder.onnx"
    report = export_encoder(model, fp32)
    progress("encoder", 0.5)
    files = {"fp32": fp32}
    int8_note = "int8 not attempted"
    if recipe.int8:
        files, int8_note = _try_int8(fp32, out_dir, files)
    progress("encoder", 1.0)
    spec = ARCHITECTURES[recipe.encoder_arch]
    depth = f" (first {recipe.encoder_depth} blocks)" if recipe.encoder_depth else ""
    return {
        "files": files,
        "architecture": spec.timm_name + depth,
        "embed_dim": spec.embed_dim,
        "int8_note": int8_note,
        "provenance": {
            "weights": f"seeded random (seed {recipe.seed}), LayerScale drawn in [0.2, 1.0]",
            "parity": report.metrics,
        },
    }


def _try_int8(fp32: Path, out_dir: Path, files: dict[str, Path]) -> tuple[dict[str, Path], str]:
    """Add the int8 model when its fidelity gate (export.int8) accepts it."""
    from export.int8 import quantize_encoder

    target = out_dir / "encoder.int8.onnx"
    outcome = quantize_encoder(fp32, target)
    if outcome.accepted and target.is_file():
        return {**files, "int8": target}, outcome.reason
    return files, outcome.reason


# --- stain reference --------------------------------------------------------------------


def stain_reference(recipe: DemoRecipe) -> dict[str, Any]:
    """Macenko reference and QC intensity range from synthetic fields.

    The fields span the stain jitter and the cell densities the demo meets, at the
    recipe's plasma-cell share (training slides and demo scans have it; plasma
    cells carry the darkest cytoplasm), so that the reference's 5th-95th
    percentile of tile intensity is the range of good synthetic slides, not of
    one image.
    """
    from appliance import stain

    images = [
        synthetic.render_field(
            synthetic.SmearSpec(
                width=800,
                height=800,
                seed=recipe.seed + i,
                nucleated_per_mm2=d,
                plasma_fraction=recipe.plasma_fraction,
            )
        ).image
        for i, d in enumerate(np.linspace(300.0, recipe.nucleated_per_mm2 * 1.5, 16))
    ]
    # Intensity percentiles over 100-um sub-tiles: their spread covers the partial
    # tiles at the edge of small fields, which QC judges like whole ones.
    # Relative to each field's glass, as the bundle's QC (QcSpec.current) judges tiles.
    values = stain.derive_reference(images, tile_px=400, relative_to_glass=True).to_dict()
    background = values.pop("background")
    return {**values, "extra": {"background": background}}


# --- 3. heads -------------------------------------------------------------------------


def _untrained_head(out_dir: Path, dim: int, recipe: DemoRecipe) -> dict[str, Any]:
    """A head with random weights: only so the feature-extraction bundle is complete."""
    import torch

    from export.heads import build_head
    from export.onnx_export import export_heads

    torch.manual_seed(recipe.seed)
    model = build_head("gated_attention_mil", {"in_dim": dim, "tasks": list(synthetic.MARKERS)})
    paths, _ = export_heads([model], out_dir, HEAD_NAME, bag_lengths=(1, 7))
    return {
        "files": {f"heads/{p.name}": p for p in paths},
        "thresholds": dict.fromkeys(synthetic.MARKERS, 0.5),
    }


def synthetic_specs(recipe: DemoRecipe) -> dict[str, list[synthetic.SmearSpec]]:
    """Balanced hidden labels per split: each marker positive on about half the slides."""
    rng = np.random.default_rng(recipe.seed)
    specs: dict[str, list[synthetic.SmearSpec]] = {}
    counts = {"train": recipe.train_slides, "val": recipe.val_slides, "test": recipe.test_slides}
    seed = recipe.seed * 1000
    for split, count in counts.items():
        columns = [rng.permutation(np.arange(count) % 2 == 0) for _ in synthetic.MARKERS]
        specs[split] = []
        for i in range(count):
            seed += 1
            labels = {m: bool(columns[t][i]) for t, m in enumerate(synthetic.MARKERS)}
            specs[split].append(
                synthetic.SmearSpec(
                    width=recipe.slide_px,
                    height=recipe.slide_px,
                    seed=seed,
                    labels=labels,
                    nucleated_per_mm2=recipe.nucleated_per_mm2,
                    plasma_fraction=recipe.plasma_fraction,
                )
            )
    return specs


def embed_synthetic_slides(
    folder: Path, bundle: Bundle, recipe: DemoRecipe, progress: Progress
) -> tuple[dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    """Write each synthetic slide and run the appliance's slide pipeline on it."""
    from appliance.networks import SlideNetworks
    from appliance.slides import process_slide
    from runtime.backends import RuntimeSettings

    folder.mkdir(parents=True)
    specs = synthetic_specs(recipe)
    total = sum(len(v) for v in specs.values())
    done = 0
    bags: dict[str, list[np.ndarray]] = {}
    labels: dict[str, np.ndarray] = {}
    # One encoder and one segmenter session for every slide.
    with SlideNetworks(bundle, RuntimeSettings(threads=recipe.threads)) as networks:
        for split, split_specs in specs.items():
            bags[split], rows = [], []
            for spec in split_specs:
                path = folder / f"{split}-{spec.seed}.tif"
                synthetic.write_smear(path, spec)
                slide = process_slide(path, networks, cache_dir=folder / "cache")
                if slide.n_cells == 0:
                    log.warning("synthetic slide %s gave no cells; left out", path.name)
                else:
                    bags[split].append(slide.cells().embeddings)
                    rows.append([float(spec.labels[m]) for m in synthetic.MARKERS])  # type: ignore[index]
                path.unlink()
                done += 1
                progress("synthetic slides", done / total)
            labels[split] = np.asarray(rows, np.float32)
    return bags, labels


def train_demo_head(
    bags: dict[str, list[np.ndarray]],
    labels: dict[str, np.ndarray],
    recipe: DemoRecipe,
    progress: Progress,
) -> dict[str, Any]:
    from export.train_heads import HeadRecipe, auc, predict_bags, train_gated_mil

    empty = [split for split in ("train", "val", "test") if not bags[split]]
    if empty:
        raise RuntimeError(
            f"no {'/'.join(empty)} slide gave cells: the segmenter found none it trusts"
        )
    # Every demo slide is dense: slides without cells mean the segmenter's detections
    # fail the cells filters (typically its confidence), and AUCs on what is left mislead.
    total = recipe.train_slides + recipe.val_slides + recipe.test_slides
    missing = total - sum(len(bags[split]) for split in ("train", "val", "test"))
    if missing > max(2, total // 10):
        raise RuntimeError(
            f"{missing} of {total} synthetic slides gave no cells: the segmenter's detections "
            "do not pass the cells filters (e.g. min_confidence); train it longer"
        )
    head_recipe = HeadRecipe(
        epochs=recipe.head_epochs,
        bags_per_step=recipe.head_bags_per_step,
        seed=recipe.seed % 10_000,
    )
    trained = train_gated_mil(
        bags["train"],
        labels["train"],
        bags["val"],
        labels["val"],
        synthetic.MARKERS,
        head_recipe,
        progress=lambda done, total: progress("heads", done / total),
    )
    test = predict_bags(trained.model, bags["test"])
    test_auc = {
        task: auc(test[:, t], labels["test"][:, t]) for t, task in enumerate(synthetic.MARKERS)
    }
    log.info("demo head: validation AUC %s, test AUC %s", trained.validation_auc, test_auc)
    return {
        "model": trained.model,
        "thresholds": _open_interval(trained.thresholds),
        "validation_auc": trained.validation_auc,
        "test_auc": test_auc,
        "epochs_run": trained.epochs_run,
    }


def _open_interval(thresholds: dict[str, float]) -> dict[str, float]:
    """Bundle thresholds must lie strictly inside (0, 1)."""
    return {k: float(np.clip(v, 1e-3, 1 - 1e-3)) for k, v in thresholds.items()}


# --- bundle ---------------------------------------------------------------------------


def _write(
    destination: Path,
    recipe: DemoRecipe,
    seg: dict[str, Any],
    encoder_info: dict[str, Any],
    stain: dict[str, Any],
    head: dict[str, Any],
    provenance: dict[str, Any],
) -> Bundle:
    from runtime.bundle import (
        EncoderSpec,
        HeadSpec,
        SegmenterSpec,
        StainReference,
        write_bundle,
    )

    sources: dict[str, Path] = {"segmenter.onnx": seg["file"], **head["files"]}
    variants = {}
    for variant, path in encoder_info["files"].items():
        name = "encoder.onnx" if variant == "fp32" else f"encoder.{variant}.onnx"
        sources[name] = path
        variants[variant] = name
    section = dict(seg["section"])
    section["file"] = "segmenter.onnx"
    return write_bundle(
        destination,
        name=DEMO_NAME,
        version=DEMO_VERSION,
        intended_use="demo",
        sources=sources,
        encoder=EncoderSpec(
            architecture=encoder_info["architecture"],
            embed_dim=encoder_info["embed_dim"],
            variants=variants,
            int8_note=encoder_info["int8_note"],
        ),
        heads=[
            HeadSpec(
                name=HEAD_NAME,
                kind="gated_attention_mil",
                files=tuple(head["files"]),
                thresholds=head["thresholds"],
                indeterminate_band=INDETERMINATE_BAND,
                extra={"tasks": list(synthetic.MARKERS), "high_risk": list(HIGH_RISK)},
            )
        ],
        segmenter=_segmenter_spec(SegmenterSpec, section),
        stain_reference=StainReference(**stain),
        provenance=provenance,
        overwrite=True,
    )


def _segmenter_spec(spec_type: type, section: dict[str, Any]) -> Any:
    known = {"file", "n_rays", "grid", "div_by", "prob_thresh", "nms_thresh", "input_channels"}
    values = {k: v for k, v in section.items() if k in known}
    values["grid"] = tuple(values["grid"])
    values["normalisation"] = section.get("normalisation", {})
    return spec_type(**values)


def write_demo_scans(folder: Path, seed: int = 7, size: int = 1280) -> dict[str, list[Path]]:
    """Demo scans: three smears of one patient (a case) and a blurred one QC rejects."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = {"del(17p)": True, "t(4;14)": False, "t(11;14)": False, "gain(1q)": True}
    case_dir = folder / "patient-001"
    case_dir.mkdir(exist_ok=True)
    written: dict[str, list[Path]] = {"case": [], "blurred": []}
    for index in range(3):
        path = case_dir / f"smear-{index + 1}.tif"
        if not path.is_file():
            spec = synthetic.SmearSpec(
                width=size,
                height=size,
                seed=seed + index,
                labels=labels,
                nucleated_per_mm2=DemoRecipe.nucleated_per_mm2,  # as the head was trained on
                plasma_fraction=DemoRecipe.plasma_fraction,
            )
            synthetic.write_smear(path, spec)
        written["case"].append(path)
    blurred = folder / "blurred-smear.tif"
    if not blurred.is_file():
        spec = synthetic.SmearSpec(width=size, height=size, seed=seed + 10, variant="blurred")
        synthetic.write_smear(blurred, spec)
    written["blurred"].append(blurred)
    return written


# --- cytoedge demo ----------------------------------------------------------------------


def _demo_target(config: Config) -> Path:
    """Where the demo bundle goes: the configured bundle folder unless a real bundle is there."""
    target = config.bundle_dir
    try:
        existing = load_bundle(target, verify_files=False)
    except BundleError:
        return target  # nothing usable there
    if existing.is_demo and existing.name == DEMO_NAME:
        return target
    fallback = config.data_dir / "bundles" / "demo"
    return fallback if fallback != target else config.data_dir / "bundles" / DEMO_NAME


def run_demo(config: Config, *, rebuild: bool = False) -> int:
    """Build (once) the demo bundle and scans, score them, say where the results are."""
    from rich.console import Console

    from appliance.score_cli import StageBars, new_progress, print_table, score_inputs

    console = Console(stderr=True)
    target = _demo_target(config)
    bundle = None if rebuild else demo_bundle_is_current(target)
    if bundle is None:
        console.print(f"Building the demo bundle in {target} (once; about 15 min on 2 cores)")
        with new_progress(console) as progress:
            bundle = build_demo_bundle(target, progress=StageBars(progress, "build: "))
    metrics = bundle.provenance.get("heads", {})
    console.print(
        f"Demo bundle {bundle.path}: held-out test AUC per marker "
        + ", ".join(f"{k} {v:.3f}" for k, v in metrics.get("test_auc", {}).items())
        + f" on {metrics.get('test_slides', '?')} synthetic slides"
    )
    scans = write_demo_scans(config.data_dir / "demo")
    groups = [("demo-patient-001", scans["case"]), ("demo-blurred", scans["blurred"])]
    run = score_inputs(groups, bundle, config, console)
    print_table(run, Console())
    for case in run.cases:
        console.print(f"{case.case_id}: {case.folder.path / 'report.html'}")
    console.print("Demo model, not for diagnosis.")
    return 1 if run.rejected else 0
