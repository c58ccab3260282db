from __future__ import annotations

import pytest

from cytoedge_demo.builder import check_left_out


def test_the_build_refuses_when_many_cases_gave_no_cells() -> None:
    left_out = {
        f"MM-train-{i:03d}": "too few cells: 0 (the bundle needs at least 20)" for i in range(6)
    }
    with pytest.raises(RuntimeError, match="6 of 20 synthetic cases gave no usable cells"):
        check_left_out(left_out, 20)
    check_left_out(dict(list(left_out.items())[:2]), 20)  # a couple: the build goes on


def test_a_bag_of_some_classes_may_lose_a_quarter_of_the_cases() -> None:
    left_out = {
        f"MM-train-{i:03d}": "too few cells: 12 plasma cells (the bundle needs at least 20)"
        for i in range(6)
    }
    check_left_out(left_out, 24, ("plasma_cell",))  # a quarter: they abstain, as at a site
    with pytest.raises(RuntimeError, match="7 of 24 synthetic cases had too few plasma cells"):
        check_left_out({**left_out, "MM-train-099": "too few cells: 3"}, 24, ("plasma_cell",))
