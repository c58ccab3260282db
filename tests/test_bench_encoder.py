"""The encoder bench's arithmetic (its figures come from the command, not from tests)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from bench.encoder import PathResult, gflop_per_cell, print_table


def test_vit_b_counts_the_documented_43_9_gflop() -> None:
    torch = pytest.importorskip("torch")
    from export.encoder import build_encoder

    with torch.device("meta"):  # shapes only: no weights allocated or initialised
        base, small = build_encoder("vit_base"), build_encoder("vit_small")
    assert gflop_per_cell(base) == pytest.approx(43.9, abs=0.05)
    assert gflop_per_cell(small) == pytest.approx(11.0, abs=0.05)


def test_table_gives_rates_and_ratios_to_the_first_path() -> None:
    results = [
        PathResult("torch eager fp32", [4.0, 2.0, 3.0], cells=6),  # median 3 s: 2 cells/s
        PathResult("ORT CPU int8", [1.0, 1.2, 0.8], cells=6, note="gate passed"),  # 6 cells/s
    ]
    buffer = io.StringIO()
    print_table(Console(file=buffer, width=200), results, flops=43.9)
    rows = [line for line in buffer.getvalue().splitlines() if line.startswith("│")]
    assert "2.00" in rows[0] and "87.8" in rows[0] and "1.00x" in rows[0]
    assert "6.00" in rows[1] and "263.4" in rows[1] and "3.00x" in rows[1]
