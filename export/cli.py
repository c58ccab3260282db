"""``cytoedge export ...``: torch and TensorFlow are imported inside the commands only."""

from __future__ import annotations

import typer

export_app = typer.Typer(
    help="Turn research models into a checked, deployable model bundle.", no_args_is_help=True
)


def _not_available(what: str) -> typer.Exit:
    typer.echo(f"cytoedge: export {what} is not available yet.", err=True)
    return typer.Exit(2)


@export_app.command()
def encoder() -> None:
    """DinoBloom encoder to ONNX (fp32, fp16, int8) with parity gates."""
    raise _not_available("encoder")


@export_app.command()
def heads() -> None:
    """MIL heads to ONNX with parity gates."""
    raise _not_available("heads")


@export_app.command()
def segmenter() -> None:
    """StarDist network to ONNX with a parity gate."""
    raise _not_available("segmenter")


@export_app.command()
def engines() -> None:
    """Build fp16 TensorRT engines for this GPU."""
    raise _not_available("engines")


@export_app.command()
def bundle() -> None:
    """Assemble a versioned, checksummed model bundle."""
    raise _not_available("bundle")
