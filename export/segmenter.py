"""StarDist2D model folder -> ``segmenter.onnx`` and the bundle's ``segmenter`` section.

TensorFlow, Keras, StarDist's model classes and tf2onnx are imported inside the
functions: importing this module costs nothing. The ONNX file is written only
after a parity gate (ONNX Runtime against TensorFlow on fixed, image-like
inputs of two shapes) passes; a failed gate writes nothing.

``train_segmenter`` trains a small StarDist2D on annotated tiles (the demo
gives it synthetic ones) normalised by the very function the appliance runs
before inference (appliance.pipeline.segmentation.normalise), so training and scoring
cannot drift apart.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.pipeline.segmentation import (
    DEFAULT_NORMALISATION,
    SEGMENTER_FILE,
    SegmentationError,
    normalise,
    segmenter_spec,
)
from runtime.files import sha256_file, write_bytes_atomic
from runtime.parity import SEGMENTER_DIST_TOLERANCE, SEGMENTER_PROB_TOLERANCE

INPUT_NAME = "input"
OPSET = 17
# ONNX Runtime vs TensorFlow, float32 both sides: seen here at 2.5e-6 (prob) and
# 2.5e-5 px (dist); the tolerances leave two orders of magnitude of headroom.
PARITY_SHAPES = ((256, 256), (192, 320))
PARITY_SEED = 20261127
# Written beside a model trained here: how its tiles were normalised (export reads it back).
NORMALISATION_FILE = "cytoedge_normalisation.json"
log = logging.getLogger(__name__)


class SegmenterExportError(RuntimeError):
    """A model folder that cannot be exported; the message is one line."""


@dataclass(frozen=True)
class ParityReport:
    """Largest absolute difference per output between ONNX Runtime and TensorFlow."""

    max_abs_diff: dict[str, float]
    tolerance: dict[str, float]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def passed(self) -> bool:
        return all(self.max_abs_diff[k] <= self.tolerance[k] for k in self.tolerance)

    def summary(self) -> str:
        parts = [
            f"{name} max |diff| {self.max_abs_diff[name]:.2e} "
            f"(tolerance {self.tolerance[name]:.0e})"
            for name in self.tolerance
        ]
        shapes = ", ".join("x".join(str(s) for s in shape) for shape in self.shapes)
        return f"{'; '.join(parts)} on inputs {shapes}"


class ParityError(SegmenterExportError):
    """The exported network does not reproduce TensorFlow's outputs."""

    def __init__(self, report: ParityReport) -> None:
        super().__init__(f"parity gate failed: {report.summary()}")
        self.report = report


@dataclass(frozen=True)
class ExportedSegmenter:
    onnx_path: Path
    section: dict[str, Any]  # the bundle's "segmenter" section
    parity: ParityReport
    provenance: dict[str, Any] = field(default_factory=dict)


def _quiet_tensorflow(threads: int) -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # already initialised in this process: keep its setting
            pass
    return tf


def load_stardist(model_dir: Path, threads: int = 0) -> Any:
    """Load a StarDist2D model folder (config.json, weights_*.h5, thresholds.json)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SegmenterExportError(f"{model_dir}: not a StarDist model folder (no config.json)")
    if not any(model_dir.glob("weights*.h5")):
        raise SegmenterExportError(f"{model_dir}: no weights*.h5 file")
    _quiet_tensorflow(threads)
    from stardist.models import StarDist2D

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SegmenterExportError(f"{model_dir}/config.json: unreadable: {exc}") from None
    if config.get("n_dim", 2) != 2:
        raise SegmenterExportError(f"{model_dir}: a {config.get('n_dim')}D model; need 2D")
    if config.get("n_classes") not in (None, 0):
        raise SegmenterExportError(f"{model_dir}: multi-class StarDist is not supported")
    chatter = io.StringIO()  # StarDist prints what it loads; keep it for the log
    try:
        with contextlib.redirect_stdout(chatter):
            model = StarDist2D(None, name=model_dir.name, basedir=str(model_dir.parent))
    except Exception as exc:  # StarDist raises many kinds on a broken folder
        raise SegmenterExportError(f"{model_dir}: cannot load: {exc}") from None
    log.debug("StarDist: %s", " ".join(chatter.getvalue().split()))
    return model


def segmenter_section(
    model: Any, normalisation: dict[str, Any] | None = None, file: str = SEGMENTER_FILE
) -> dict[str, Any]:
    """The bundle's ``segmenter`` section for a loaded StarDist2D model."""
    config = model.config
    if config.backbone != "unet":
        raise SegmenterExportError(f"backbone {config.backbone!r} is not supported (unet only)")
    div_by = [
        int(p**config.unet_n_depth * g) for p, g in zip(config.unet_pool, config.grid, strict=True)
    ]
    section = {
        "file": file,
        "n_rays": int(config.n_rays),
        "grid": [int(g) for g in config.grid],
        "div_by": div_by,
        "prob_thresh": float(model.thresholds.prob),
        "nms_thresh": float(model.thresholds.nms),
        "input_channels": int(config.n_channel_in),
        "normalisation": dict(normalisation or DEFAULT_NORMALISATION),
    }
    segmenter_spec(section)  # the appliance must accept what we write
    return section


def convert_to_onnx(keras_model: Any, n_channels: int) -> bytes:
    """Keras model -> serialized ONNX with input ``input`` (N, H, W, C) and outputs prob, dist."""
    tf = _quiet_tensorflow(0)
    import tf2onnx

    signature = (tf.TensorSpec((None, None, None, n_channels), tf.float32, name=INPUT_NAME),)
    try:
        proto, _ = tf2onnx.convert.from_keras(keras_model, input_signature=signature, opset=OPSET)
    except Exception as exc:  # tf2onnx raises bare Exceptions on unsupported graphs
        raise SegmenterExportError(f"tf2onnx could not convert the network: {exc}") from None
    outputs = [o.name for o in proto.graph.output]
    if len(outputs) != 2:
        raise SegmenterExportError(f"expected 2 outputs (prob, dist), got {outputs}")
    # Name the outputs as the appliance reads them, whatever Keras called its layers.
    renames = dict(zip(outputs, ("prob", "dist"), strict=True))
    for node in proto.graph.node:
        node.output[:] = [renames.get(n, n) for n in node.output]
    for output in proto.graph.output:
        output.name = renames[output.name]
    return proto.SerializeToString()


def parity_inputs(n_channels: int, div_by: Sequence[int]) -> list[np.ndarray]:
    """Fixed image-like inputs: seeded blobs on a smooth background, in [0, 1]."""
    rng = np.random.default_rng(PARITY_SEED)
    inputs = []
    for height, width in PARITY_SHAPES:
        h = -(-height // div_by[0]) * div_by[0]
        w = -(-width // div_by[1]) * div_by[1]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        image = np.zeros((h, w, n_channels), np.float32) + 0.2 * rng.random(n_channels)
        for _ in range(24):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(6, 24, size=2)
            blob = np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))
            image += blob[..., None] * rng.uniform(0.3, 0.9, size=n_channels)
        image += 0.03 * rng.standard_normal(image.shape).astype(np.float32)
        inputs.append(np.clip(image, 0, 1.5)[None].astype(np.float32))
    return inputs


def parity_gate(
    keras_model: Any, onnx_bytes: bytes, inputs: Sequence[np.ndarray], threads: int = 0
) -> ParityReport:
    """Run both on the same inputs; the report holds the largest difference per output."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    diffs = {"prob": 0.0, "dist": 0.0}
    for x in inputs:
        reference = [np.asarray(t) for t in keras_model([x], training=False)]
        outputs = session.run(["prob", "dist"], {INPUT_NAME: x})
        got = dict(zip(("prob", "dist"), outputs, strict=True))
        for name, ref in zip(("prob", "dist"), reference, strict=True):
            if got[name].shape != ref.shape:
                raise SegmenterExportError(
                    f"{name}: ONNX shape {got[name].shape} != TensorFlow {ref.shape}"
                )
            diffs[name] = max(diffs[name], float(np.max(np.abs(got[name] - ref))))
    return ParityReport(
        max_abs_diff=diffs,
        tolerance={"prob": SEGMENTER_PROB_TOLERANCE, "dist": SEGMENTER_DIST_TOLERANCE},
        shapes=tuple(tuple(x.shape) for x in inputs),
    )


def export_segmenter(
    model_dir: Path,
    out_dir: Path,
    normalisation: dict[str, Any] | None = None,
    threads: int = 0,
) -> ExportedSegmenter:
    """Convert, gate, then write ``segmenter.onnx``, ``export.json`` and ``segmenter.json``.

    ``normalisation`` None: the one recorded beside a model trained here, else
    StarDist's usual 1-99.8 percentiles. Raises ``ParityError`` (nothing written)
    when ONNX Runtime and TensorFlow disagree.
    """
    model = load_stardist(model_dir, threads)
    if normalisation is None and (Path(model_dir) / NORMALISATION_FILE).is_file():
        normalisation = json.loads((Path(model_dir) / NORMALISATION_FILE).read_text("utf-8"))
    section = segmenter_section(model, normalisation)
    onnx_bytes = convert_to_onnx(model.keras_model, section["input_channels"])
    report = parity_gate(
        model.keras_model,
        onnx_bytes,
        parity_inputs(section["input_channels"], section["div_by"]),
        threads,
    )
    log.info("segmenter parity: %s", report.summary())
    if not report.passed:
        raise ParityError(report)

    import tensorflow as tf
    import tf2onnx

    weights = sorted(Path(model_dir).glob("weights*.h5"))
    provenance = {
        "source": str(Path(model_dir).resolve()),
        "source_sha256": {p.name: sha256_file(p) for p in weights},
        "parity_max_abs_diff": report.max_abs_diff,
        "parity_tolerance": report.tolerance,
        "exporter": {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "opset": OPSET},
    }
    thresholds_file = Path(model_dir) / "thresholds.json"
    if thresholds_file.is_file():
        provenance["thresholds_source"] = "thresholds.json"
    else:
        provenance["thresholds_source"] = "StarDist defaults (no thresholds.json)"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / section["file"]
    write_bytes_atomic(onnx_path, onnx_bytes)
    # export.json is what `cytoedge export bundle` reads (docs/DESIGN.md); segmenter.json
    # is the section alone with its provenance, as the demo builder reads it.
    gate = {"passed": True, "max_abs_diff": report.max_abs_diff, "tolerance": report.tolerance}
    export_document = {
        "kind": "segmenter",
        "section": section,
        "parity": {section["file"]: gate},
        "provenance": provenance,
    }
    write_bytes_atomic(out_dir / "export.json", json.dumps(export_document, indent=2).encode())
    document = {"segmenter": section, "provenance": provenance}
    write_bytes_atomic(out_dir / "segmenter.json", json.dumps(document, indent=2).encode("utf-8"))
    return ExportedSegmenter(onnx_path, section, report, provenance)


# --- training a small network on annotated tiles ----------------------------------


@dataclass(frozen=True)
class TrainingRecipe:
    """A small StarDist2D: n_rays 32, grid 2x2, U-Net depth 3 with 16 base filters.

    Trained from scratch, hence Adam at 1e-3 rather than METHOD.md's 3e-4 (a
    fine-tuning rate); 240 steps already gave F1 0.93 at IoU 0.5 on held-out fields.
    """

    n_tiles: int = 40  # tiles asked of the tile source; 1 in 5 held out for validation
    tile_px: int = 256
    patch_px: int = 128  # random training crops; cells are at most ~80 px across
    epochs: int = 10
    steps_per_epoch: int = 40
    batch_size: int = 4
    n_rays: int = 32
    unet_depth: int = 3
    unet_filters: int = 16
    learning_rate: float = 1e-3
    seed: int = 0
    nms_threshs: tuple[float, ...] = (0.3, 0.4, 0.5)  # tried by StarDist's threshold search


TileSource = Callable[[int, int, int], tuple[list[np.ndarray], list[np.ndarray]]]


def train_segmenter(
    model_dir: Path,
    tiles: TileSource,
    recipe: TrainingRecipe | None = None,
    threads: int = 0,
    progress: Callable[[int, int], None] | None = None,
    normalisation: dict[str, Any] | None = None,
) -> Path:
    """Train a StarDist2D into ``model_dir`` (a new folder) and return it.

    ``tiles(n, size, seed)`` gives (RGB uint8 tiles, instance masks of the nucleated cells).
    """
    normalisation = dict(normalisation or DEFAULT_NORMALISATION)
    recipe = recipe or TrainingRecipe()
    model_dir = Path(model_dir)
    if model_dir.exists() and any(model_dir.iterdir()):
        raise SegmenterExportError(f"{model_dir}: exists and is not empty")
    _quiet_tensorflow(threads)
    import keras
    from stardist.models import Config2D, StarDist2D

    keras.utils.set_random_seed(recipe.seed)
    images, masks = tiles(recipe.n_tiles, recipe.tile_px, recipe.seed)
    if not images:
        raise SegmenterExportError("the tile source returned no tiles")
    x = [normalise(image, normalisation) for image in images]
    y = [mask.astype(np.int32) for mask in masks]
    n_val = max(1, len(x) // 5)
    config = Config2D(
        n_rays=recipe.n_rays,
        grid=(2, 2),
        n_channel_in=int(x[0].shape[-1]),
        unet_n_depth=recipe.unet_depth,
        unet_n_filter_base=recipe.unet_filters,
        train_patch_size=(min(recipe.tile_px, recipe.patch_px),) * 2,
        train_batch_size=recipe.batch_size,
        train_epochs=recipe.epochs,
        train_steps_per_epoch=recipe.steps_per_epoch,
        train_learning_rate=recipe.learning_rate,
        train_tensorboard=False,  # TensorBoard is not installed
        use_gpu=False,
    )
    model = StarDist2D(config, name=model_dir.name, basedir=str(model_dir.parent))
    model.prepare_for_training()
    if progress is not None:
        model.callbacks.append(_epoch_callback(recipe.epochs, progress, sys.stdout))
    # StarDist trains with Keras' progress bar on stdout; the caller shows its own progress.
    keras.config.disable_interactive_logging()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model.train(
                x[n_val:], y[n_val:], validation_data=(x[:n_val], y[:n_val]), epochs=recipe.epochs
            )
            model.optimize_thresholds(
                x[:n_val],
                y[:n_val],
                nms_threshs=list(recipe.nms_threshs),
                predict_kwargs={"verbose": 0},
                optimize_kwargs={"verbose": 0},
            )
    finally:
        keras.config.enable_interactive_logging()
    (model_dir / NORMALISATION_FILE).write_text(json.dumps(normalisation), encoding="utf-8")
    return model_dir


def _epoch_callback(total: int, progress: Callable[[int, int], None], stdout: Any) -> Any:
    """A Keras callback forwarding epoch ends to ``progress(done, total)``, with the
    caller's stdout (training itself is kept quiet)."""
    import keras

    class EpochProgress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            with contextlib.redirect_stdout(stdout):
                progress(epoch + 1, total)

    return EpochProgress()


def run_export_command(
    model_dir: Path, out: Path, *, normalisation: dict[str, Any] | None, threads: int
) -> int:
    """``cytoedge export segmenter``: progress on the terminal; the exit status."""
    from rich.console import Console

    console = Console(stderr=True)
    try:
        with console.status("Converting to ONNX and checking parity against TensorFlow..."):
            made = export_segmenter(model_dir, out, normalisation, threads)
    except ParityError as exc:
        _say(console, f"cytoedge: {exc}; nothing written")
        return 1
    except (SegmenterExportError, SegmentationError) as exc:
        _say(console, f"cytoedge: {exc}")
        return 1
    section = made.section
    _say(console, f"parity passed: {made.parity.summary()}")
    _say(
        console,
        f"{made.onnx_path} + segmenter.json: n_rays {section['n_rays']}, grid {section['grid']}, "
        f"div_by {section['div_by']}, prob_thresh {section['prob_thresh']:.3f}, "
        f"nms_thresh {section['nms_thresh']:.3f}, {section['input_channels']} input channel(s)",
    )
    return 0


def _say(console: Any, text: str) -> None:
    """One unwrapped line, no rich markup (paths may hold brackets)."""
    console.print(text, soft_wrap=True, markup=False, highlight=False)
