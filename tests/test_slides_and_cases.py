"""process_slide / score_case: caching, cases, versions and abstention, on small bundles.

The networks are the runtime's tiny ONNX models (tests/runtime_models.py): the
point here is the orchestration, not the models; tests/test_score_cli.py and
the demo run the real segmenter and encoder.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import appliance.pipeline.networks
import appliance.pipeline.slides
from appliance.pipeline import slide_cache
from appliance.pipeline.cases import abstain_reason, score_case, top_attention_mass
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.slides import SlideResult, process_slide
from appliance.readers import scan_fingerprint
from appliance.results import PredictionRecord, QcRecord, ScanRecord, read_result
from cytoedge_demo.synthetic import write_cell_folders
from runtime.bundle_format import Bundle
from tests.runtime_models import TinyBundle


def process(path: Path, bundle: Bundle, cache: Path, **options: object) -> SlideResult:
    """One slide with networks of its own (the tests that share them say so)."""
    with SlideNetworks(bundle) as networks:
        return process_slide(path, networks, cache_dir=cache, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyBundle, Bundle]:
    made = TinyBundle(tmp_path_factory.mktemp("tiny"))
    return made, made.write()


@pytest.fixture(scope="module")
def pb_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pb")
    write_cell_folders(root, 2, 60, seed=3)
    small = root / "small"
    write_cell_folders(small, 1, 12, seed=4)
    return root


def test_a_cell_folder_is_embedded_once_and_then_read_from_the_cache(
    tiny: tuple[TinyBundle, Bundle], pb_folders: Path, tmp_path: Path
) -> None:
    _, bundle = tiny
    stages: list[tuple[str, float]] = []
    first = process(
        pb_folders / "P0001", bundle, tmp_path, progress=lambda s, f: stages.append((s, f))
    )
    assert first.n_cells == 60 and first.qc_passed and not first.from_cache
    assert {"read", "embed"} <= {s for s, _ in stages}
    assert all(0.0 <= f <= 1.0 for _, f in stages)
    cells = first.cells()
    assert cells.embeddings.shape == (60, bundle.encoder.embed_dim)
    assert cells.patches.shape[0] == 60
    again = process(pb_folders / "P0001", bundle, tmp_path)
    assert again.from_cache and again.fingerprint == first.fingerprint
    np.testing.assert_array_equal(again.cells().embeddings, cells.embeddings)


def test_one_shared_encoder_session_serves_every_slide_and_a_cached_one_opens_none(
    tiny: tuple[TinyBundle, Bundle],
    pb_folders: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, bundle = tiny
    opened: list[object] = []

    class CountedEncoder(appliance.pipeline.networks.Encoder):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            opened.append(self)

    monkeypatch.setattr(appliance.pipeline.networks, "Encoder", CountedEncoder)
    with SlideNetworks(bundle) as shared:
        slides = [
            process_slide(pb_folders / name, shared, cache_dir=tmp_path)
            for name in ("P0001", "P0002")
        ]
        assert shared.embedded == 120
    assert len(opened) == 1
    assert all(s.backend == "ort-cpu" and s.scan.encoder_variant == "fp32" for s in slides)
    assert all(s.scan.segmenter_variant is None for s in slides), "cell folders: not segmented"
    # Both slides cached: a fresh shared encoder is never opened.
    with SlideNetworks(bundle) as idle:
        again = process_slide(pb_folders / "P0001", idle, cache_dir=tmp_path)
        assert again.from_cache
    assert len(opened) == 1


def test_a_fingerprint_from_the_caller_is_not_recomputed(
    tiny: tuple[TinyBundle, Bundle],
    pb_folders: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, bundle = tiny
    first = process(pb_folders / "P0001", bundle, tmp_path)
    assert first.fingerprint == scan_fingerprint(pb_folders / "P0001")

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(appliance.pipeline.slides, "scan_fingerprint", no_hashing)
    again = process(pb_folders / "P0001", bundle, tmp_path, fingerprint=first.fingerprint)
    assert again.from_cache and again.fingerprint == first.fingerprint
    with pytest.raises(ValueError, match="sha256"):
        process(pb_folders / "P0001", bundle, tmp_path, fingerprint="abc")


def test_a_case_over_two_slides_is_scored_and_rescoring_adds_a_version(
    tiny: tuple[TinyBundle, Bundle], pb_folders: Path, tmp_path: Path
) -> None:
    _, bundle = tiny
    cache, outbox = tmp_path / "cache", tmp_path / "out"
    one = process(pb_folders / "P0001", bundle, cache)
    first = score_case("patient-7", [one], bundle, outbox, write_pdf=False)
    assert first.result.status == "scored" and first.version == 1
    late = process(pb_folders / "P0002", bundle, cache)
    again = process(pb_folders / "P0001", bundle, cache)
    second = score_case("patient-7", [again, late], bundle, outbox, write_pdf=False)
    assert second.version == 2 and again.from_cache
    assert (first.folder.path / "result.json").is_file()  # the earlier version stays

    result = read_result(second.folder.path)
    assert result == second.result and result.version == 2
    assert [s.slide_id for s in result.scans] == ["P0001", "P0002"]
    assert result.cells == 120
    assert {p.task for p in result.predictions} >= {"del17p", "malignancy"}
    findings = {f.key: f for head in result.heads for f in head.findings}
    assert findings["high_risk"].call in ("positive", "negative", "indeterminate")
    assert findings["top2"].text.count(",") == 1  # the two most likely classes
    assert len(result.top_cells) == 20
    for cell in result.top_cells:
        assert (second.folder.path / cell.image).is_file()
    attention = np.load(second.folder.path / "embeddings.npz")["attention"]
    assert attention.shape == (120,)
    assert result.attention_top20_mass == pytest.approx(top_attention_mass(attention))
    csv_header = (second.folder.path / "slides" / "P0002" / "cells.csv").read_text().split("\n")[0]
    assert csv_header.endswith("attention")


def test_too_few_cells_abstain_with_the_count_in_the_reason(
    tiny: tuple[TinyBundle, Bundle], pb_folders: Path, tmp_path: Path
) -> None:
    _, bundle = tiny
    small = process(pb_folders / "small" / "P0001", bundle, tmp_path)
    case = score_case("few", [small], bundle, tmp_path / "out", write_pdf=False)
    assert case.result.status == "abstained"
    assert case.result.abstain_reason == "too few cells: 12 (the bundle needs at least 50)"
    assert case.result.heads == ()


def test_every_task_indeterminate_abstains(
    tiny: tuple[TinyBundle, Bundle], pb_folders: Path, tmp_path: Path
) -> None:
    made, _ = tiny
    wide = [dataclasses.replace(h, indeterminate_band=0.49) for h in made.heads]
    made.path = tmp_path / "wide-bundle"
    bundle = made.write(heads=wide)
    slide = process(pb_folders / "P0001", bundle, tmp_path)
    case = score_case("unsure", [slide], bundle, tmp_path / "out", write_pdf=False)
    reason = case.result.abstain_reason
    assert case.result.status == "abstained"
    assert reason is not None and "all tasks indeterminate" in reason
    assert all(p.call == "indeterminate" for p in case.result.predictions)


def test_a_slide_that_failed_qc_makes_the_case_abstain(
    tiny: tuple[TinyBundle, Bundle], tmp_path: Path
) -> None:
    _, bundle = tiny
    entry = tmp_path / "entry"
    empty = slide_cache.SlideCells.empty(
        bundle.encoder.embed_dim, np.full((8, 8, 3), 255, np.uint8), 32.0, 128
    )
    reason = "71 % of tiles blurred"
    slide_cache.write_entry(entry, {"scan": {"sha256": "0" * 64}}, empty)
    scan = ScanRecord(
        slide_id="s1",
        path=str(tmp_path / "s1.tif"),
        sha256="0" * 64,
        format="openslide:aperio",
        bytes=1000,
        pixel_size_um=0.25,
        qc=QcRecord("fail", (reason,)),
        cells=0,
    )
    failed = SlideResult(
        slide_id="s1",
        path=tmp_path / "s1.tif",
        scan=scan,
        qc_passed=False,
        qc_reason=reason,
        n_cells=0,
        cache_entry=entry,
        timings_s={},
        backend="ort-cpu",
    )
    case = score_case("blurred", [failed], bundle, tmp_path / "out", write_pdf=False)
    assert case.result.status == "abstained"
    assert case.result.abstain_reason == f"slide QC failed: s1: {reason}"
    html = (case.folder.path / "report.html").read_text()
    assert reason in html


def test_abstain_reason_rules() -> None:
    def called(call: str) -> PredictionRecord:
        return PredictionRecord("t", "t", 0.5, 0.5, call)  # type: ignore[arg-type]

    scored = [called("positive"), called("indeterminate")]
    unsure = [called("indeterminate")] * 2
    assert abstain_reason(80, 50, [], 1, scored) is None
    assert (
        abstain_reason(49, 50, [], 1, scored) == "too few cells: 49 (the bundle needs at least 50)"
    )
    # one slide of two failed QC: the other still carries the case
    assert abstain_reason(80, 50, ["a: blurred"], 2, scored) is None
    assert abstain_reason(0, 50, ["a: blurred"], 1, []) == "slide QC failed: a: blurred"
    assert abstain_reason(80, 50, [], 1, unsure) is not None


def test_top_attention_mass() -> None:
    assert top_attention_mass(np.full(10, 0.1)) == pytest.approx(0.2)
    peaked = np.array([0.91] + [0.01] * 9)
    assert top_attention_mass(peaked) == pytest.approx(0.92)


@pytest.mark.slow
def test_a_scan_gives_qupath_tables_in_the_level0_pixels_of_the_scan(
    tiny_bundle: Path, small_scan_writer: Callable[..., Path], tmp_path: Path
) -> None:
    # The same smear as a 0.125 um/px field (each pixel doubled, so that it reads back
    # unchanged at 0.25 um/px: a smoother upsampling would fail the blur QC): the
    # tables must come back in the file's own pixels (twice the working grid).
    import tifffile
    from PIL import Image

    from runtime.bundle_format import load_bundle

    bundle = load_bundle(tiny_bundle)
    scan = small_scan_writer(tmp_path / "smear.tif", seed=5)
    fine = tmp_path / "smear-fine.png"
    image = Image.fromarray(tifffile.imread(scan, level=0))
    image.resize((2 * image.width, 2 * image.height), Image.Resampling.NEAREST).save(fine)
    slide = process(fine, bundle, tmp_path / "cache", calibration=0.125)
    cells = slide.cells()
    assert slide.n_cells > 0 and slide.scan.pixel_size_um == 0.125

    features = cells.geojson["features"]
    rows = list(csv.DictReader(io.StringIO(cells.table_csv)))
    assert len(features) == len(rows) == slide.n_cells
    for feature, row, (x, y) in zip(features, rows, cells.xy, strict=True):
        measured = feature["properties"]["measurements"]
        assert measured["centroid_x"] == pytest.approx(2 * x, abs=0.1)
        assert measured["centroid_y"] == pytest.approx(2 * y, abs=0.1)
        assert float(row["x"]) == pytest.approx(2 * x, abs=0.1)
        (ring,) = feature["geometry"]["coordinates"]
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert min(xs) <= 2 * x <= max(xs) and min(ys) <= 2 * y <= max(ys)
    # Areas are physical: METHOD.md's 500-5000 px at 0.25 um/px is 31-313 um2.
    areas = [float(r["area_um2"]) for r in rows]
    assert min(areas) >= 500 * 0.0625 and max(areas) <= 5000 * 0.0625


@pytest.mark.slow
def test_shared_networks_open_the_segmenter_once_for_every_scan(
    tiny_bundle: Path,
    small_scan_writer: Callable[..., Path],
    pb_folders: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from appliance.pipeline.segmentation import Segmenter
    from runtime.bundle_format import load_bundle

    bundle = load_bundle(tiny_bundle)
    opened: list[Path] = []
    real_open = Segmenter.open

    def counted_open(*args: object, **kwargs: object) -> Segmenter:
        opened.append(Path(str(args[0])))
        return real_open(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Segmenter, "open", counted_open)
    scans = [small_scan_writer(tmp_path / f"smear-{seed}.tif", seed=seed) for seed in (3, 4)]
    with SlideNetworks(bundle) as shared:
        slides = [process_slide(s, shared, cache_dir=tmp_path) for s in scans]
        # Both passed QC, so both were segmented, with the one session.
        assert all(s.qc_passed for s in slides) and sum(s.n_cells for s in slides) > 0
        assert len(opened) == 1
    # A single-cell folder needs no segmentation: it never opens one.
    with SlideNetworks(bundle) as cells_only:
        process_slide(pb_folders / "P0001", cells_only, cache_dir=tmp_path)
    assert len(opened) == 1


def test_a_case_runs_only_the_heads_for_its_inputs(
    tiny: tuple[TinyBundle, Bundle], pb_folders: Path, tmp_path: Path
) -> None:
    made, _ = tiny
    mm, pb = made.heads
    made.path = tmp_path / "by-inputs"
    bundle = made.write(
        heads=[
            dataclasses.replace(mm, inputs=("scans",)),
            dataclasses.replace(pb, inputs=("cells",)),
        ]
    )
    slide = process(pb_folders / "P0001", bundle, tmp_path)
    case = score_case("blood", [slide], bundle, tmp_path / "out", write_pdf=False)
    assert [h.name for h in case.result.heads] == ["pb_screen"]
    made.path = tmp_path / "scans-only"
    scans_only = made.write(heads=[dataclasses.replace(mm, inputs=("scans",))])
    slide = process(pb_folders / "P0001", scans_only, tmp_path)
    case = score_case("blood", [slide], scans_only, tmp_path / "out2", write_pdf=False)
    assert case.result.status == "abstained" and case.result.heads == ()
    assert case.result.abstain_reason == "no head of bundle tiny 1.0 scores single-cell folders"
