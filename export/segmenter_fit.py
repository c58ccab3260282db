"""Fitting a StarDist2D on a site's annotated fields, with StarDist's own training API.

The recipe is the paper's (METHOD.md): Adam at 3e-4, batch 8, 50 epochs, flips,
quarter turns and intensity jitter as augmentation, and early stopping on StarDist's
own validation loss over the held-out fields (the 20 % the caller set aside, by
image), whose best weights are the ones kept. Training starts from a StarDist model
folder (fine-tuning the bundle's current segmenter) or from a new network.

Everything lives in one work folder: ``model/`` (the StarDist folder, with
``weights_now.h5`` written after every epoch by StarDist's checkpoint callback) and
``state.json`` (epochs done, the best validation loss, epochs since it improved, and
the key of the fields and recipe). A run interrupted at any point resumes from the
last finished epoch when called again with the same fields and recipe; with other
ones the folder is refused rather than mixed.

TensorFlow is imported inside the functions. The fields are normalised by
``appliance.pipeline.segmentation.network_input``, the function serving runs, so
training and scoring see the same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.pipeline.segmentation import network_input
from export.segmenter import NORMALISATION_FILE, SegmenterExportError, _quiet_tensorflow
from export.segmenter_fields import AnnotatedField
from runtime.bundle_format import SegmenterSpec
from runtime.files import sha256_file, write_bytes_atomic

MODEL_NAME = "model"
STATE_FILE = "state.json"
EPOCH_WEIGHTS = "weights_now.h5"  # StarDist's per-epoch checkpoint (Config2D default)
BEST_WEIGHTS = "weights_best.h5"
START_FILES = ("config.json", "thresholds.json", BEST_WEIGHTS)

# progress(epochs done, epochs planned, {"loss": ..., "val_loss": ...})
EpochProgress = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True)
class FitRecipe:
    """How the network is trained; the network's shape matters only from scratch."""

    epochs: int = 50
    batch_size: int = 8
    learning_rate: float = 3e-4
    steps_per_epoch: int = 100
    patch_px: int = 256  # random training crops (smaller fields make it smaller)
    patience: int = 10  # epochs without a lower validation loss before stopping
    seed: int = 0
    nms_threshs: tuple[float, ...] = (0.3, 0.4, 0.5)  # StarDist's threshold search
    # From scratch: the network (StarDist's defaults, 2x2 grid as the demo's).
    n_rays: int = 32
    unet_depth: int = 3
    unet_filters: int = 32

    @classmethod
    def from_json(cls, path: Path) -> FitRecipe:
        """A recipe file: a JSON object of some of the fields above."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SegmenterExportError(f"{path}: not a readable JSON recipe ({exc})") from None
        known = set(cls.__dataclass_fields__)
        if not isinstance(data, dict) or set(data) - known:
            unknown = sorted(set(data) - known) if isinstance(data, dict) else "not an object"
            raise SegmenterExportError(f"{path}: unknown recipe keys {unknown}")
        if "nms_threshs" in data:
            data["nms_threshs"] = tuple(data["nms_threshs"])
        recipe = cls(**{**asdict(cls()), **data})
        if min(recipe.epochs, recipe.batch_size, recipe.steps_per_epoch, recipe.patience) < 1:
            raise SegmenterExportError(f"{path}: epochs, batch, steps and patience must be >= 1")
        return recipe


@dataclass(frozen=True)
class FitResult:
    model_dir: Path  # a StarDist model folder: config.json, weights_best.h5, thresholds.json
    epochs_run: int
    best_val_loss: float
    stopped_early: bool
    resumed_at: int  # the epoch this call began from (0: a fresh run)
    patch_px: int


def fit_segmenter(
    work: Path,
    train: Sequence[AnnotatedField],
    held_out: Sequence[AnnotatedField],
    spec: SegmenterSpec,
    *,
    start: Path | None,
    recipe: FitRecipe,
    progress: EpochProgress | None = None,
    threads: int = 0,
) -> FitResult:
    """Train (or go on training) in ``work``; ``start``: the StarDist folder to fine-tune,
    None for a new network. ``spec`` gives the input channels and normalisation."""
    work = Path(work)
    key = _run_key(train, held_out, spec, start, recipe)
    state = _load_state(work, key)
    model_dir = work / MODEL_NAME
    x_train = [network_input(f.rgb, spec) for f in train]
    x_held = [network_input(f.rgb, spec) for f in held_out]
    y_train = [f.labels for f in train]
    y_held = [f.labels for f in held_out]
    # The network's divisor: the bundle's for its own network, grid x 2^depth for a new one.
    div_by = spec.div_by if start is not None else (2 * 2**recipe.unet_depth,) * 2
    patch = _patch_px(recipe, [*x_train, *x_held], div_by)
    _quiet_tensorflow(threads)
    import keras

    resumed_at = state["epochs_done"]
    if not state["finished"]:  # a finished run (refused, then asked to --adopt) is kept as is
        keras.utils.set_random_seed(recipe.seed + resumed_at)
        model = _open_model(work, state, spec, start, recipe, patch)
        if resumed_at < recipe.epochs and state["wait"] < recipe.patience:
            _train(model, work, state, recipe, (x_train, y_train), (x_held, y_held), progress)
        model.load_weights(BEST_WEIGHTS)  # the best epoch's, wherever the run stopped
        keras.config.disable_interactive_logging()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                model.optimize_thresholds(
                    x_held,
                    y_held,
                    nms_threshs=list(recipe.nms_threshs),
                    predict_kwargs={"verbose": 0},
                    optimize_kwargs={"verbose": 0},
                )
        finally:
            keras.config.enable_interactive_logging()
        (model_dir / NORMALISATION_FILE).write_text(
            json.dumps(dict(spec.normalisation)), encoding="utf-8"
        )
        state["finished"] = True
        _save_state(work, state)
    return FitResult(
        model_dir,
        state["epochs_done"],
        state["best"],
        state["wait"] >= recipe.patience,
        resumed_at,
        patch,
    )


def _train(
    model: Any,
    work: Path,
    state: dict[str, Any],
    recipe: FitRecipe,
    train: tuple[list[np.ndarray], list[np.ndarray]],
    held_out: tuple[list[np.ndarray], list[np.ndarray]],
    progress: EpochProgress | None,
) -> None:
    """StarDist's ``train`` for the epochs left, with the state kept after each one."""
    import keras

    model.prepare_for_training()
    for callback in model.callbacks:  # StarDist's best-weights checkpoint: the run's best so far
        if isinstance(callback, keras.callbacks.ModelCheckpoint) and callback.save_best_only:
            callback.best = state["best"]
    model.callbacks.append(_epoch_state(work, state, recipe, progress))
    keras.config.disable_interactive_logging()
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # StarDist feeds Keras a generator that shuffles itself; Keras says so each run.
            warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
            model.train(
                train[0],
                train[1],
                validation_data=held_out,
                augmenter=_augmenter(recipe.seed + state["epochs_done"]),
                epochs=recipe.epochs - state["epochs_done"],
                steps_per_epoch=recipe.steps_per_epoch,
            )
    finally:
        keras.config.enable_interactive_logging()


def _epoch_state(
    work: Path, state: dict[str, Any], recipe: FitRecipe, progress: EpochProgress | None
) -> Any:
    """A Keras callback keeping ``state`` (and the file) after each epoch."""
    import keras

    class EpochState(keras.callbacks.Callback):
        """After each epoch: the state file, early stopping, then the caller's progress
        (the state is on disk before anything can interrupt the run)."""

        def __init__(
            self,
            work: Path,
            state: dict[str, Any],
            recipe: FitRecipe,
            progress: EpochProgress | None,
        ) -> None:
            super().__init__()
            self.work, self.state, self.recipe, self.progress = work, state, recipe, progress

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = {k: float(v) for k, v in (logs or {}).items() if k in ("loss", "val_loss")}
            state = self.state
            state["epochs_done"] += 1
            val_loss = logs.get("val_loss", float("inf"))
            if val_loss < state["best"]:
                state["best"], state["wait"] = val_loss, 0
            else:
                state["wait"] += 1
            state["history"].append({"epoch": state["epochs_done"], **logs})
            _save_state(self.work, state)
            if state["wait"] >= self.recipe.patience:
                self.model.stop_training = True
            if self.progress is not None:
                self.progress(state["epochs_done"], self.recipe.epochs, logs)

    return EpochState(work, state, recipe, progress)


def _augmenter(seed: int) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Flips and quarter turns (image and labels alike), and intensity jitter (image)."""
    rng = np.random.default_rng(seed)

    def augment(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        turns = int(rng.integers(4))
        x, y = np.rot90(x, turns, axes=(0, 1)), np.rot90(y, turns, axes=(0, 1))
        for axis in (0, 1):
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
        x = x * np.float32(rng.uniform(0.8, 1.2)) + np.float32(rng.uniform(-0.1, 0.1))
        return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y)

    return augment


def epochs_done(work: Path) -> int:
    """Epochs a run in ``work`` has finished (0 for none, or an unreadable state)."""
    try:
        return int(json.loads((Path(work) / STATE_FILE).read_text(encoding="utf-8"))["epochs_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _open_model(
    work: Path,
    state: dict[str, Any],
    spec: SegmenterSpec,
    start: Path | None,
    recipe: FitRecipe,
    patch: int,
) -> Any:
    """The StarDist model in ``work``: made from ``start`` or anew on the first call,
    at its last epoch's weights on a resumed one."""
    from stardist.models import Config2D, StarDist2D

    model_dir = work / MODEL_NAME
    fresh = not (model_dir / "config.json").is_file()
    if fresh and start is not None:
        model_dir.mkdir(parents=True, exist_ok=True)
        for name in START_FILES:
            if (start / name).is_file():
                shutil.copyfile(start / name, model_dir / name)
    if fresh and start is None:
        config = Config2D(
            n_rays=recipe.n_rays,
            grid=(2, 2),
            n_channel_in=spec.input_channels,
            unet_n_depth=recipe.unet_depth,
            unet_n_filter_base=recipe.unet_filters,
            train_tensorboard=False,  # TensorBoard is not installed
            use_gpu=False,
        )
        with contextlib.redirect_stdout(io.StringIO()):
            model = StarDist2D(config, name=MODEL_NAME, basedir=str(work))
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            model = StarDist2D(None, name=MODEL_NAME, basedir=str(work))
        if model.config.n_channel_in != spec.input_channels:
            raise SegmenterExportError(
                f"{start}: the network takes {model.config.n_channel_in} channel(s), the "
                f"bundle's segmenter {spec.input_channels}"
            )
        if (model_dir / EPOCH_WEIGHTS).is_file() and state["epochs_done"]:
            model.load_weights(EPOCH_WEIGHTS)
    config = model.config
    config.train_learning_rate = recipe.learning_rate
    config.train_batch_size = recipe.batch_size
    config.train_patch_size = (patch, patch)
    config.train_epochs = recipe.epochs
    config.train_steps_per_epoch = recipe.steps_per_epoch
    config.train_tensorboard = False
    config.train_checkpoint_epoch = EPOCH_WEIGHTS
    config.train_checkpoint = BEST_WEIGHTS
    return model


def _patch_px(recipe: FitRecipe, images: Sequence[np.ndarray], div_by: Sequence[int]) -> int:
    """The recipe's patch, cut to the smallest field and to a multiple of the network's
    divisor (StarDist's requirement)."""
    step = max(div_by)
    side = min(recipe.patch_px, *(min(x.shape[:2]) for x in images))
    patch = side - side % step
    if patch < 2 * step:
        raise SegmenterExportError(
            f"a field of {side} px at 0.25 um/px is too small to train on (at least {2 * step} px)"
        )
    return patch


def _run_key(
    train: Sequence[AnnotatedField],
    held_out: Sequence[AnnotatedField],
    spec: SegmenterSpec,
    start: Path | None,
    recipe: FitRecipe,
) -> str:
    """What a run depends on: a resumed run must have the same."""
    digest = hashlib.sha256()
    for part, fields in (("train", train), ("held_out", held_out)):
        for item in fields:
            digest.update(f"{part}:{item.name}".encode())
            digest.update(hashlib.sha256(item.rgb.tobytes()).digest())
            digest.update(hashlib.sha256(item.labels.tobytes()).digest())
    digest.update(json.dumps(asdict(recipe), sort_keys=True).encode())
    digest.update(json.dumps(dict(spec.normalisation), sort_keys=True).encode())
    if start is not None and (start / BEST_WEIGHTS).is_file():
        digest.update(sha256_file(start / BEST_WEIGHTS).encode())
    return digest.hexdigest()


def _load_state(work: Path, key: str) -> dict[str, Any]:
    path = work / STATE_FILE
    if not path.is_file():
        if work.exists() and any(work.iterdir()):
            raise SegmenterExportError(f"{work}: not empty and holds no training run; remove it")
        work.mkdir(parents=True, exist_ok=True)
        state = {
            "key": key,
            "epochs_done": 0,
            "best": float("inf"),
            "wait": 0,
            "finished": False,
            "history": [],
        }
        _save_state(work, state)
        return state
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SegmenterExportError(f"{path}: unreadable ({exc}); remove {work}") from None
    if state.get("key") != key:
        raise SegmenterExportError(
            f"{work}: holds a run of other fields, recipe or start; remove it to start anew"
        )
    return state


def _save_state(work: Path, state: dict[str, Any]) -> None:
    write_bytes_atomic(work / STATE_FILE, json.dumps(state, indent=2).encode("utf-8"))
