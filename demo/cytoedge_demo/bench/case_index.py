"""The case index at scale: query time and memory of a plain matrix product.

Writes an index of N cases in the appliance's own layout (unit-length float32 rows and
their JSON lines, ``appliance.results.case_index``), every case signed off, opens it
as the service does, and times ``CaseIndex.similar`` (k = 5) over queries it never
saw; beside it, the bare ``vectors @ query`` and ``argpartition`` on the same matrix,
so the index's own cost shows. Memory: the matrix's bytes and the process's resident
growth from opening the index.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from appliance.results.case_index import INDEX_DIR, ROWS, VECTORS, CaseIndex

KEY = "bench" + "0" * 59


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def write_index(data_dir: Path, cases: int, dim: int) -> None:
    folder = data_dir / INDEX_DIR / KEY[:16]
    folder.mkdir(parents=True)
    for start in range(0, cases, 10_000):  # in slices: the writer never holds two copies
        with open(folder / VECTORS, "ab") as out:
            out.write(unit_rows(min(10_000, cases - start), dim, seed=start).tobytes())
    with open(folder / ROWS, "w", encoding="utf-8") as out:
        for n in range(cases):
            row = {"case_id": f"case-{n:06d}", "version": 2, "folder": f"/outbox/case-{n:06d}/v2"}
            out.write(json.dumps({**row, "decision": "accepted", "diagnosis": "", "fish": []}))
            out.write("\n")


def measure(cases: int, dim: int, queries: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="case-index-bench-") as work:
        data_dir = Path(work)
        write_index(data_dir, cases, dim)
        before = resident_mb()
        started = time.perf_counter()
        index = CaseIndex.open(data_dir, data_dir / "outbox", KEY, dim)
        opened = time.perf_counter() - started
        grown = resident_mb() - before
        probes = unit_rows(queries, dim, seed=10_000_019)
        index.similar(probes[0], exclude_case="")  # the first query lists the signed-off rows
        timed, bare = [], []
        for probe in probes:
            started = time.perf_counter()
            found = index.similar(probe, exclude_case="", k=5)
            timed.append(time.perf_counter() - started)
            started = time.perf_counter()
            scores = index.vectors @ probe
            np.argpartition(-scores, 5)[:5]
            bare.append(time.perf_counter() - started)
        assert len(found) == 5
        return {
            "open_s": opened,
            "query_ms": 1000 * statistics.median(timed),
            "query_p95_ms": 1000 * float(np.percentile(timed, 95)),
            "bare_ms": 1000 * statistics.median(bare),
            "matrix_mb": index.vectors.nbytes / 2**20,
            "resident_mb": grown,
        }


def run_case_index_bench(cases: int, dims: list[int], queries: int) -> None:
    console = Console()
    table = Table(title=f"Case index, {cases:,} signed-off cases, k = 5, {queries} queries")
    for column in ("dim", "open s", "query ms (median)", "p95 ms", "bare product ms",
                   "matrix MB", "resident growth MB"):  # fmt: skip
        table.add_column(column, justify="right")
    for dim in dims:
        with console.status(f"{cases:,} cases of {dim} dimensions..."):
            got = measure(cases, dim, queries)
        table.add_row(
            str(dim),
            f"{got['open_s']:.2f}",
            f"{got['query_ms']:.1f}",
            f"{got['query_p95_ms']:.1f}",
            f"{got['bare_ms']:.1f}",
            f"{got['matrix_mb']:.0f}",
            f"{got['resident_mb']:.0f}",
        )
    console.print(table)
