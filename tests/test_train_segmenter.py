"""`cytoedge train segmenter`: the three annotation layouts as real files, their refusals,
the working-grid rescaling, fine-tuning and training from scratch, resuming an
interrupted run, and the comparison that decides whether a version is written.

The fields are the synthetic generator's (cytoedge_demo.synthetic.segmentation_tiles)
written as PNG photos with their annotations; the networks are tiny (1-2 epochs of a
few steps) so that CI's two cores can afford them. The current segmenter is the
segmentation tests' trained StarDist (tests/segmenter_model.py, cached).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from export.segmenter_fields import (
    LABELS,
    MASK,
    QUPATH,
    AnnotationError,
    read_annotated_fields,
)
from tests.conftest import SHARED_DATA

TILE = 256
BCCD = SHARED_DATA / "bccd-sample"  # real blood fields, MIT licence, white cells boxed
BCCD_UM = 0.07  # tests/test_fields.py: test_bccd_pixel_size_estimate
TINY_RECIPE = {
    "epochs": 2,
    "steps_per_epoch": 3,
    "batch_size": 2,
    "patch_px": 128,
    "unet_depth": 2,
    "unet_filters": 8,
    "n_rays": 16,
    "nms_threshs": [0.4],
}


def tiles(n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from cytoedge_demo.synthetic import segmentation_tiles

    return segmentation_tiles(n, TILE, seed)


def write_labels(folder: Path, n: int = 5, seed: int = 11) -> Path:
    """Photos with 16-bit instance label PNGs; the folder's manifest gives 0.25 um/px."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (rgb, labels) in enumerate(zip(*tiles(n, seed), strict=True)):
        Image.fromarray(rgb).save(folder / f"field{index}.png")
        Image.fromarray(labels.astype(np.uint16)).save(folder / f"field{index}.labels.png")
    (folder / "manifest.json").write_text(json.dumps({"pixel_size_um": 0.25}), encoding="utf-8")
    return folder


def write_masks(folder: Path, n: int = 5, seed: int = 12) -> Path:
    """Photos at 0.5 um/px (half the working grid; a sidecar each) with binary masks."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (rgb, labels) in enumerate(zip(*tiles(n, seed), strict=True)):
        half = Image.fromarray(rgb).resize((TILE // 2, TILE // 2), Image.Resampling.BILINEAR)
        half.save(folder / f"f{index}.png")
        (folder / f"f{index}.png.json").write_text('{"pixel_size_um": 0.5}', encoding="utf-8")
        mask = Image.fromarray(((labels > 0) * 255).astype(np.uint8))
        mask.resize((TILE // 2, TILE // 2), Image.Resampling.NEAREST).save(
            folder / f"f{index}.mask.png"
        )
    return folder


def write_geojson(folder: Path, n: int = 5, seed: int = 13) -> Path:
    """Photos with QuPath-style GeoJSON exports of each cell's outline (pixel size: the
    command's --pixel-size)."""
    from skimage.measure import find_contours

    folder.mkdir(parents=True, exist_ok=True)
    for index, (rgb, labels) in enumerate(zip(*tiles(n, seed), strict=True)):
        Image.fromarray(rgb).save(folder / f"smear{index}.jpg", quality=95)
        features = []
        for value in np.unique(labels[labels > 0]):
            padded = np.pad(labels == value, 1)
            contour = max(find_contours(padded.astype(float), 0.5), key=len) - 1
            ring = [[float(x), float(y)] for y, x in contour]
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "properties": {"objectType": "detection"},
                }
            )
        collection = {"type": "FeatureCollection", "features": features}
        (folder / f"smear{index}.geojson").write_text(json.dumps(collection), encoding="utf-8")
    return folder


# --- the layouts, read -----------------------------------------------------------------


def test_instance_labels_are_read_as_written(tmp_path: Path) -> None:
    folder = write_labels(tmp_path / "labels", n=2)
    images, labels = tiles(2, 11)
    annotated = read_annotated_fields(folder)
    assert annotated.layouts() == {LABELS: 2}
    for item, rgb, truth in zip(annotated.fields, images, labels, strict=True):
        assert item.pixel_size_source == "manifest"
        assert np.array_equal(item.rgb, rgb)
        assert np.array_equal(item.labels, truth)


def test_masks_at_another_pixel_size_land_on_the_working_grid(tmp_path: Path) -> None:
    from appliance.readers import open_scan

    folder = write_masks(tmp_path / "masks", n=2)
    annotated = read_annotated_fields(folder)
    _, truths = tiles(2, 12)
    for item, truth in zip(annotated.fields, truths, strict=True):
        assert item.layout == MASK and item.pixel_size_um == 0.5
        with open_scan(folder / item.name) as scan:  # what serving reads
            assert np.array_equal(item.rgb, scan.read_region(0, 0, scan.width, scan.height))
        assert item.labels.shape == item.rgb.shape[:2] == (TILE, TILE)
        # Each annotated cell is still one cell where it was (up to the resampling).
        assert abs(item.cells - len(np.unique(truth[truth > 0]))) <= 1
        overlap = np.logical_and(item.labels > 0, truth > 0).sum() / max((truth > 0).sum(), 1)
        assert overlap > 0.9


class SeenSegmenter:
    """Stands in for StarDist in serving's field path: keeps what it is given, finds nothing."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def detect(self, image: np.ndarray, core: tuple[int, int, int, int]) -> object:
        from appliance.pipeline.segmentation import Detections

        self.seen.append(image.copy())
        return Detections(np.zeros((0, 2), np.int64), np.zeros((0, 16), np.float32), np.zeros(0))


def test_training_fields_hold_what_serving_gives_the_segmenter_for_a_colour_cast(
    tmp_path: Path, current_reference: object
) -> None:
    """Photos taken under a yellow cast: the training set holds, pixel for pixel, what
    serving's field path hands StarDist for the same photos (balanced from their glass,
    normalised to the bundle's stains), not the photos as they are."""
    from appliance.pipeline.cell_finding import SlideParams
    from appliance.pipeline.fields import process_fields
    from appliance.pipeline.progress import StageTimer
    from appliance.readers import FieldFolder
    from export.segmenter_fields import as_served
    from tests.runtime_models import TinyBundle

    folder = write_labels(tmp_path / "labels", n=3)
    for photo in sorted(folder.glob("field?.png")):
        rgb = np.asarray(Image.open(photo), np.float32) * np.array([1.0, 0.93, 0.72])
        Image.fromarray(rgb.round().astype(np.uint8)).save(photo)
    bundle = TinyBundle(tmp_path / "bundle").write(stain_reference=current_reference)
    raw = read_annotated_fields(folder)
    annotated = as_served(raw, SlideParams.of(bundle))

    segmenter = SeenSegmenter()

    class Networks:
        def __init__(self) -> None:
            self.bundle = bundle

        def segmenter(self) -> SeenSegmenter:
            return segmenter

    photos = FieldFolder(folder, tuple(folder / item.name for item in raw.fields), raw.calibration)
    process_fields(photos, Networks(), StageTimer(), tmp_path / "spool")  # type: ignore[arg-type]
    assert len(segmenter.seen) == len(annotated.fields) == 3  # one window each: all passed QC
    for item, before, seen in zip(annotated.fields, raw.fields, segmenter.seen, strict=True):
        assert np.array_equal(item.rgb, seen)
        assert not np.array_equal(item.rgb, before.rgb)
        assert np.array_equal(item.labels, before.labels)


def test_touching_cells_in_a_mask_are_counted_as_merged(tmp_path: Path) -> None:
    from skimage.draw import disk

    folder = tmp_path / "touching"
    folder.mkdir()
    rgb = np.full((128, 128, 3), 220, np.uint8)
    mask = np.zeros((128, 128), np.uint8)
    for centre in ((40, 30), (40, 50), (95, 90)):  # the first two touch
        rr, cc = disk(centre, 11, shape=mask.shape)
        mask[rr, cc] = 255
        rgb[rr, cc] = (120, 60, 150)
    Image.fromarray(rgb).save(folder / "a.png")
    Image.fromarray(mask).save(folder / "a.mask.png")
    annotated = read_annotated_fields(folder, 0.25)
    assert annotated.cells == 2 and annotated.merged == 1 and annotated.components == 2


def test_qupath_polygons_become_one_label_each(tmp_path: Path) -> None:
    folder = write_geojson(tmp_path / "qupath", n=2)
    annotated = read_annotated_fields(folder, 0.25)
    _, truths = tiles(2, 13)
    for item, truth in zip(annotated.fields, truths, strict=True):
        assert item.layout == QUPATH and item.pixel_size_source == "config"
        assert item.cells == len(np.unique(truth[truth > 0]))
        agree = np.logical_and(item.labels > 0, truth > 0).sum() / (truth > 0).sum()
        assert agree > 0.9


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("no_annotation", "field0.png: no annotation beside it"),
        ("orphan", "stray.labels.png: no photo of the same name"),
        ("two_annotations", "field0.png: several annotations"),
        ("wrong_size", "field0.labels.png: 100 x 80 px, but field0.png is 256 x 256 px"),
        ("mask_named_labels", "field0.labels.png: one label over"),
        ("labels_named_mask", "field0.mask.png: "),
        ("geojson_point", "field0.geojson feature 1: geometry Point"),
        ("geojson_broken", "field0.geojson: not a readable GeoJSON"),
        ("no_pixel_size", "field0.png: "),
        ("not_an_image", "field0.labels.png: cannot be read as an image"),
    ],
)
def test_bad_inputs_are_refused_with_one_line_naming_the_file(
    tmp_path: Path, damage: str, expected: str
) -> None:
    folder = write_labels(tmp_path / "f", n=1)
    labels = folder / "field0.labels.png"
    truth = np.asarray(Image.open(labels))
    if damage == "no_annotation":
        labels.unlink()
    elif damage == "orphan":
        labels.rename(folder / "stray.labels.png")
        Image.fromarray(truth).save(labels)
    elif damage == "two_annotations":
        Image.fromarray(((truth > 0) * 255).astype(np.uint8)).save(folder / "field0.mask.png")
    elif damage == "wrong_size":
        Image.fromarray(truth[:80, :100]).save(labels)
    elif damage == "mask_named_labels":
        Image.fromarray(((truth > 0) * 255).astype(np.uint8)).save(labels)
    elif damage == "labels_named_mask":
        labels.rename(folder / "field0.mask.png")
    elif damage == "geojson_point":
        labels.unlink()
        point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}}
        (folder / "field0.geojson").write_text(json.dumps([point]), encoding="utf-8")
    elif damage == "geojson_broken":
        labels.unlink()
        (folder / "field0.geojson").write_text('{"type": "FeatureCol', encoding="utf-8")
    elif damage == "no_pixel_size":
        (folder / "manifest.json").unlink()
    elif damage == "not_an_image":
        labels.write_bytes(b"this is not a PNG")
    with pytest.raises(AnnotationError) as caught:
        read_annotated_fields(folder)
    message = str(caught.value)
    assert "\n" not in message and str(folder) in message
    assert expected in message, message


# --- training, comparison, the new version ------------------------------------------------


@pytest.fixture(scope="module")
def current(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle whose segmenter is the tests' trained StarDist, that StarDist's folder)."""
    from tests.fixtures.tiny_bundle import missing_build_dependencies
    from tests.runtime_models import TinyBundle
    from tests.segmenter_model import tensorflow_available, trained_stardist

    if not tensorflow_available() or "stardist" in missing_build_dependencies():
        pytest.skip("training the segmenter needs TensorFlow and StarDist (the export extra)")
    from appliance.pipeline.segmentation import segmenter_spec

    model_dir, onnx_dir, section = trained_stardist()
    tiny = TinyBundle(tmp_path_factory.mktemp("base"))
    tiny.write(
        sources={**tiny.sources, "segmenter.onnx": onnx_dir / "segmenter.onnx"},
        segmenter=segmenter_spec(section),
    )
    return tiny.path, model_dir


def train_command(*args: object) -> tuple[int, str]:
    from appliance.cli.main import app

    result = CliRunner().invoke(app, ["train", "segmenter", *(str(a) for a in args)])
    return result.exit_code, result.output


def recipe_file(folder: Path, **changes: object) -> Path:
    path = folder / "recipe.json"
    path.write_text(json.dumps({**TINY_RECIPE, **changes}), encoding="utf-8")
    return path


def white_cells_found(bundle: Path) -> tuple[int, int]:
    """(white-cell boxes of the BCCD photos, boxes holding a detection of the bundle's
    segmenter): the photos have boxes, not outlines, so finding is all they can tell."""
    from appliance.readers import open_scan
    from appliance.readers.base import TARGET_UM_PER_PX
    from cytoedge_demo.bench.fields import Annotations
    from export.segmenter_adopt import open_fp32
    from runtime.bundle_format import load_bundle

    made = load_bundle(bundle)
    assert made.segmenter is not None
    segmenter = open_fp32(made.path, made.segmenter, 0)
    given = found = 0
    for name, boxes in Annotations.read(BCCD).wbc.items():
        with open_scan(BCCD / name, BCCD_UM) as scan:
            rgb = scan.read_region(0, 0, scan.width, scan.height)
        rows, cols = (segmenter.detect(rgb).points * TARGET_UM_PER_PX / BCCD_UM).T
        for x0, y0, x1, y1 in boxes:
            given += 1
            found += bool(np.any((cols >= x0) & (cols <= x1) & (rows >= y0) & (rows <= y1)))
    return given, found


def test_one_field_or_no_start_is_refused_before_any_training(
    tmp_path: Path, current: tuple[Path, Path]
) -> None:
    base, _ = current
    one = write_labels(tmp_path / "one", n=1)
    code, output = train_command(one, "--bundle", base, "--from-scratch")
    assert code == 2 and "at least 2 annotated fields are needed" in output, output
    # The base was assembled from an export: it keeps no StarDist folder to fine-tune.
    code, output = train_command(write_labels(tmp_path / "two", n=2), "--bundle", base)
    assert code == 2 and "keeps no StarDist weights for its segmenter" in output, output
    assert "--start-from MODEL_DIR" in output


def test_fine_tuning_on_instance_labels_writes_a_version_fine_tuned_again_on_qupath_fields(
    tmp_path: Path, current: tuple[Path, Path], isolated_data_dir: Path
) -> None:
    from runtime.bundle_format import load_bundle

    base, model_dir = current
    fields = write_labels(tmp_path / "labels")
    recipe = recipe_file(tmp_path, epochs=1)
    code, output = train_command(
        fields, "--bundle", base, "--start-from", model_dir, "--recipe", recipe, "--adopt"
    )
    assert code == 0, output
    made = load_bundle(isolated_data_dir / "bundles" / "tiny-1.1")
    training = made.provenance["segmenter_training"]
    assert training["start"] == f"fine-tuned from {model_dir}"
    assert training["fields"]["layouts"] == {LABELS: 5}
    assert len(training["fields"]["held_out"]) == 1 and training["fit"]["epochs_run"] == 1
    for side in ("new", "current"):
        figures = training["held_out"][side]
        assert set(figures) >= {"f1", "precision", "recall", "mean_matched_iou"}
        assert figures["fields"] == 1
    # The current segmenter finds the synthetic cells (it was trained on such tiles).
    assert training["held_out"]["current"]["f1"] > 0.7
    assert made.segmenter is not None and made.segmenter.variants == {}
    assert made.file("segmenter.onnx").read_bytes() != (base / "segmenter.onnx").read_bytes()
    assert "segmenter-stardist/weights_best.h5" in made.files
    if BCCD.is_dir():  # on real blood photos it still finds every white cell the current finds
        given, found_before = white_cells_found(base)
        assert white_cells_found(made.path) == (given, found_before) and found_before == given
    report = (isolated_data_dir / "validation" / "tiny-1.1" / "segmenter" / "report.md").read_text()
    assert "detection F1 at IoU 0.5" in report and "fine-tuned from" in report

    # Its next fine-tuning starts from the StarDist folder it keeps, without --start-from;
    # on QuPath exports (JPEGs), whose pixel size only the flag gives.
    qupath = write_geojson(tmp_path / "qupath")
    args = ["--bundle", made.path, "--recipe", recipe, "--adopt", "--version", "9"]
    code, output = train_command(qupath, *args)
    assert code == 2 and "pixel size" in output  # JPEGs without a size are refused
    code, output = train_command(qupath, *args, "--pixel-size", "0.25")
    assert code == 0, output
    again = load_bundle(isolated_data_dir / "bundles" / "tiny-9").provenance["segmenter_training"]
    assert again["start"] == f"fine-tuned from {made.path / 'segmenter-stardist'}"
    assert again["fields"]["layouts"] == {QUPATH: 5}
    assert set(again["fields"]["pixel_sizes_um"].values()) == {0.25}


def test_from_scratch_on_masks_is_compared_and_not_written_when_worse(
    tmp_path: Path, current: tuple[Path, Path], isolated_data_dir: Path
) -> None:
    from runtime.bundle_format import load_bundle

    base, _ = current
    fields = write_masks(tmp_path / "masks")
    code, output = train_command(
        fields, "--bundle", base, "--from-scratch", "--recipe", recipe_file(tmp_path)
    )
    # Two epochs of three steps cannot match a trained network: compared, and refused.
    assert code == 1, output
    assert "not adopted" in output
    assert not (isolated_data_dir / "bundles" / "tiny-1.1").exists()
    folder = isolated_data_dir / "validation" / "tiny-1.1" / "segmenter"
    record = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    assert record["start"] == "from scratch" and record["fit"]["epochs_run"] == 2
    assert record["decision"].startswith("not written: worse than the current segmenter on f1")
    assert record["held_out"]["new"]["f1"] < record["held_out"]["current"]["f1"]
    assert "(not written)" in (folder / "report.md").read_text(encoding="utf-8")

    # --adopt writes it all the same, from the finished run (no second training).
    code, output = train_command(
        fields, "--bundle", base, "--from-scratch", "--recipe", recipe_file(tmp_path), "--adopt"
    )
    assert code == 0, output
    training = load_bundle(isolated_data_dir / "bundles" / "tiny-1.1").provenance[
        "segmenter_training"
    ]
    assert training["decision"].startswith("written as asked (--adopt), although worse on f1")
    assert training["fit"]["resumed_at"] == 2 and "Resuming after epoch 2" in output


def test_an_interrupted_run_resumes_after_its_last_epoch(tmp_path: Path, current: object) -> None:
    from appliance.pipeline.segmentation import segmenter_spec
    from export.segmenter import SegmenterExportError
    from export.segmenter_fit import STATE_FILE, FitRecipe, epochs_done, fit_segmenter
    from export.train_segmenter_cli import split_fields

    fields = read_annotated_fields(write_labels(tmp_path / "labels", n=3))
    train, held_out = split_fields(fields.fields, 0)
    recipe = FitRecipe(**{**TINY_RECIPE, "epochs": 3, "nms_threshs": (0.4,)})
    spec = segmenter_spec(
        {
            "n_rays": 16,
            "grid": [2, 2],
            "div_by": [8, 8],
            "prob_thresh": 0.5,
            "nms_thresh": 0.4,
            "input_channels": 3,
        }
    )
    work = tmp_path / "work"
    seen: list[int] = []

    def interrupt_after_first(done: int, total: int, logs: dict[str, float]) -> None:
        seen.append(done)
        if done == 1:
            raise KeyboardInterrupt  # what Ctrl-C raises in the training loop

    with pytest.raises(KeyboardInterrupt):
        fit_segmenter(
            work, train, held_out, spec, start=None, recipe=recipe, progress=interrupt_after_first
        )
    state = json.loads((work / STATE_FILE).read_text(encoding="utf-8"))
    assert state["epochs_done"] == 1 and not state["finished"] and epochs_done(work) == 1
    assert (work / "model" / "weights_now.h5").is_file()

    result = fit_segmenter(
        work,
        train,
        held_out,
        spec,
        start=None,
        recipe=recipe,
        progress=lambda done, total, logs: seen.append(done),
    )
    assert result.resumed_at == 1 and result.epochs_run == 3
    assert seen == [1, 2, 3]
    assert (result.model_dir / "thresholds.json").is_file()
    # Other fields in the same folder are refused rather than mixed into the run.
    with pytest.raises(SegmenterExportError, match="holds a run of other fields"):
        fit_segmenter(work, held_out + train[:1], train[1:], spec, start=None, recipe=recipe)
