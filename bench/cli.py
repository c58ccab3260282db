"""``cytoedge bench ...``: heavy imports happen inside the commands only."""

from __future__ import annotations

import typer

bench_app = typer.Typer(
    help="Benchmarks that print figures against a baseline.", no_args_is_help=True
)


def _not_available(what: str) -> typer.Exit:
    typer.echo(f"cytoedge: bench {what} is not available yet.", err=True)
    return typer.Exit(2)


@bench_app.command()
def encoder() -> None:
    """Encoder cells/s: torch eager vs ONNX Runtime fp32 / int8 (and GPU where present)."""
    raise _not_available("encoder")


@bench_app.command()
def pipeline() -> None:
    """One bench slide end to end: seconds per stage, peak memory, 2x-area ratio."""
    raise _not_available("pipeline")


@bench_app.command()
def soak(scans: int = 200) -> None:
    """N small scans through the service: scans/min, failures, memory growth."""
    raise _not_available("soak")
