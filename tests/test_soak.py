"""``cytoedge bench soak``: its small templates, its bundle copy, and a short real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tifffile
from rich.console import Console

from cytoedge_demo.bench.soak import (
    make_templates,
    print_report,
    run_soak,
    smear_density,
    soak_bundle,
)
from runtime.bundle_format import load_bundle
from tests.runtime_models import TinyBundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return TinyBundle(tmp_path_factory.mktemp("tiny")).write().path


def test_smear_templates_have_the_asked_size_and_density(tmp_path: Path) -> None:
    assert smear_density(20, 512) == pytest.approx(20 / 0.128**2)
    paths = make_templates("smear", tmp_path, 2, size_px=256, cells=8)
    assert len(paths) == 2 and paths[0].read_bytes() != paths[1].read_bytes()
    with tifffile.TiffFile(paths[0]) as tif:
        assert tif.pages[0].shape[:2] == (256, 256)


def test_the_soak_bundle_lowers_min_cells_and_links_the_models(
    tmp_path: Path, bundle_dir: Path
) -> None:
    source_json = (bundle_dir / "bundle.json").read_bytes()
    lowered = soak_bundle(bundle_dir, tmp_path / "soak", 10)
    assert lowered == 10
    copy = load_bundle(tmp_path / "soak")  # every linked file checks against its sha256
    assert copy.cells.min_cells == 10
    assert copy.sha256 != load_bundle(bundle_dir).sha256
    linked = [p for p in (tmp_path / "soak").iterdir() if p.name != "bundle.json"]
    assert linked and all(p.is_symlink() for p in linked)
    assert (bundle_dir / "bundle.json").read_bytes() == source_json
    # Never raised above the bundle's own minimum.
    assert (
        soak_bundle(bundle_dir, tmp_path / "again", 10_000)
        == load_bundle(bundle_dir).cells.min_cells
    )


@pytest.mark.slow
def test_a_short_soak_scores_every_scan_and_stops_cleanly(tmp_path: Path, bundle_dir: Path) -> None:
    report = run_soak(
        3,
        bundle=bundle_dir,
        kind="cells",
        cells=12,
        burst=3,
        quiet=0.5,
        work=tmp_path,
        timeout_per_scan=60.0,
        console=Console(quiet=True),
    )
    assert report.outcomes == {"done": 3}, report
    assert report.failures == 0 and report.duplicates == 0
    assert report.cells == 3 * 12 and report.min_cells == 1
    assert report.exit_code == 0
    assert report.rss_idle_mb > 0 and 0 < report.rss_warm_mb <= report.rss_peak_mb
    results = sorted((tmp_path / "outbox").glob("*/v1/result.json"))
    assert len(results) == 3
    assert all(json.loads(p.read_text())["status"] == "scored" for p in results)
    console = Console(record=True, width=120)
    print_report(report, console)
    assert "scans/min" in console.export_text()
