"""``cytoedge export ...``: torch and TensorFlow are imported inside the commands only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
def bundle(
    out: Annotated[Path, typer.Argument(help="Bundle folder to create.")],
    encoder: Annotated[
        Path, typer.Option(help="Folder written by `cytoedge export encoder`.", file_okay=False)
    ],
    head: Annotated[
        list[Path], typer.Option(help="Folder written by `cytoedge export heads`; repeatable.")
    ],
    name: Annotated[str, typer.Option(help="Bundle name, e.g. mm-risk.")],
    version: Annotated[str, typer.Option(help="Bundle version, e.g. 1.0.0.")],
    intended_use: Annotated[
        str, typer.Option(help="demo | research | clinical (shown on every report).")
    ],
    segmenter: Annotated[
        Path | None, typer.Option(help="Folder written by `cytoedge export segmenter`.")
    ] = None,
    sections: Annotated[
        Path | None,
        typer.Option(help="JSON with stain_reference, qc, cells and provenance sections."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
) -> None:
    """Assemble a versioned, checksummed model bundle from gated exports."""
    from rich.console import Console

    from export.bundle import AssemblyError, assemble_bundle
    from runtime.bundle import BundleError

    console = Console()
    try:
        with console.status("Checking exports, copying and hashing files..."):
            made = assemble_bundle(
                out,
                encoder_dir=encoder,
                head_dirs=head,
                segmenter_dir=segmenter,
                name=name,
                version=version,
                intended_use=intended_use,
                sections_file=sections,
                overwrite=overwrite,
            )
    except (AssemblyError, BundleError) as exc:
        typer.echo(f"cytoedge: {exc}", err=True)
        raise typer.Exit(1) from None
    console.print(
        f"Bundle {made.name} {made.version} ({made.intended_use}) at {made.path}: "
        f"{len(made.files)} files, heads {', '.join(made.head_names)}, sha256 {made.sha256[:12]}"
    )
