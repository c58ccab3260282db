"""``cytoedge doctor`` says how long a slide should take here, from measured networks."""

from __future__ import annotations

import math
import re
from pathlib import Path

from appliance.site.pace import OTHER_PER_TILE_SHARE, PaceEstimate
from tests.test_cli import cytoedge


def test_a_slide_costs_its_budgets_tiles_and_cells() -> None:
    pace = PaceEstimate(segment_s_per_tile=0.5, embed_s_per_cell=0.1, budget=400, cells_per_tile=4)
    assert pace.tiles == 100
    expected = 100 * 0.5 * (1 + OTHER_PER_TILE_SHARE) + 40
    assert math.isclose(pace.seconds_per_slide, expected)
    assert f"about {expected:.0f} s per slide" in pace.sentence()
    assert "keeps pace with a slow scanner only" in pace.sentence()  # 2-3.5 min
    quick = PaceEstimate(segment_s_per_tile=0.1, embed_s_per_cell=0.01, budget=400)
    assert "keeps pace with one scanner" in quick.sentence()
    unbounded = PaceEstimate(segment_s_per_tile=1.0, embed_s_per_cell=0.1, budget=0)
    assert unbounded.seconds_per_slide is None and "grows with its zone" in unbounded.sentence()
    cells_only = PaceEstimate(segment_s_per_tile=None, embed_s_per_cell=0.1, budget=400)
    assert cells_only.seconds_per_slide is None and "cell folders only" in cells_only.sentence()


def test_doctor_measures_each_network_and_prints_the_expected_seconds(tiny_bundle: Path) -> None:
    result = cytoedge("doctor", "--bundle", str(tiny_bundle), env={"COLUMNS": "250"})
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("Pace:"))
    measured = re.search(
        r"segmenter ([0-9.]+) s per 200 um tile, encoder ([0-9.]+) s per cell", line
    )
    assert measured is not None, line
    assert 0 < float(measured[1]) < 60 and 0 <= float(measured[2]) < 10
    assert "s per slide at the budget of 400 cells" in line
