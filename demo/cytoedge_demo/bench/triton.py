"""``cytoedge bench triton``: N workstation processes embedding cells through one Triton
server, against the same N processes each embedding on its own CPU, in one run.

The server is the nvidia-pytriton wheel's ``tritonserver`` on this machine's CPU
(``cytoedge_demo.triton_server``), serving the repository ``bundle triton-repo``
writes; each client is a separate process with the bundle's ``Encoder`` on the
``triton`` backend, as a workstation's service would run it. The server's dynamic
batcher joins the clients' requests; the batch sizes it formed are read from its
statistics API. On one CPU the server and the clients share the cores, so this
measures the path and the batching, not what a GPU server gives a lab.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from cytoedge_demo.bench.gemm import cpu_description
from cytoedge_demo.triton_server import serving
from runtime.backends import RuntimeSettings, TritonSettings
from runtime.bundle_format import load_bundle
from runtime.triton_repo import model_name, write_repository

CLIENT_BATCH = 16  # cells per request: a slide's batches are small beside the server's


def _client(args: tuple[str, RuntimeSettings, int, int]) -> float:
    """Embed ``cells`` random patches as one workstation; seconds, once the encoder is open."""
    from runtime.encoder import Encoder

    bundle_dir, settings, cells, seed = args
    bundle = load_bundle(bundle_dir, verify_files=False)
    encoder = Encoder(bundle, settings)
    side = encoder.fed_px
    patches = np.random.default_rng(seed).integers(0, 256, (cells, side, side, 3), np.uint8)
    encoder.embed(patches[:CLIENT_BATCH])  # warm-up: sessions and connections
    started = time.perf_counter()
    encoder.embed(patches)
    seconds = time.perf_counter() - started
    encoder.close()
    return seconds


def _cells_per_second(clients: int, settings: RuntimeSettings, bundle: Path, cells: int) -> float:
    """All clients at once; the slowest one's time ends the run."""
    jobs = [(str(bundle), settings, cells, seed) for seed in range(clients)]
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        seconds = pool.map(_client, jobs)
    return clients * cells / max(seconds)


def _batch_sizes(url: str, model: str) -> Counter[int]:
    """{batch size: executions} the server ran ``model`` at so far."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model).model_stats
    finally:
        client.close()
    return Counter(
        {b.batch_size: b.compute_infer.count for entry in stats for b in entry.batch_stats}
    )


def run_triton_bench(bundle_dir: Path, clients: int, cells: int, threads: int) -> None:
    console = Console()
    bundle = load_bundle(bundle_dir)
    # The cores are shared either way: all of them for the server's one session, or
    # an even share for each local client.
    cores = threads or os.cpu_count() or 1
    local_threads = max(1, cores // clients)
    console.print(
        f"{cpu_description()}; bundle {bundle.name} {bundle.version} "
        f"({bundle.encoder.architecture}); {clients} client process(es) x {cells} cells, "
        f"{CLIENT_BATCH} per request"
    )
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as work:
        written = Path(work) / "written"
        write_repository(bundle, written, gpu=False)
        model = model_name(bundle.name, bundle.encoder.variants["fp32"])
        with serving(written, Path(work) / "server", threads=cores) as server:
            remote = RuntimeSettings(
                "triton", batch_size=CLIENT_BATCH, triton=TritonSettings(url=server.url)
            )
            before = _batch_sizes(server.url, model)
            served = _cells_per_second(clients, remote, bundle_dir, cells)
            formed = _batch_sizes(server.url, model) - before
        # fp32 as the server runs it (ort-cpu would take an int8 encoder the bundle lists).
        local = RuntimeSettings(
            "ort-cpu", threads=local_threads, batch_size=CLIENT_BATCH, precision="fp32"
        )
        here = _cells_per_second(clients, local, bundle_dir, cells)
    table = Table(
        title=f"Encoder, {clients} workstation process(es); batches include each one's warm-up"
    )
    for column in ("path", "cells/s (all clients)", "batch sizes the server formed"):
        table.add_column(column)
    shown = ", ".join(f"{size} x{count}" for size, count in sorted(formed.items()))
    table.add_row(f"one triton server ({cores} thread(s))", f"{served:.1f}", shown or "-")
    table.add_row(f"each scoring locally (ort-cpu, {local_threads} thread(s))", f"{here:.1f}", "")
    console.print(table)
    console.print(f"server / local: {served / here:.2f}x")
