"""``cytoedge export ...``: torch and TensorFlow are imported inside the commands only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

export_app = typer.Typer(
    help="Turn research models into a checked, deployable model bundle.", no_args_is_help=True
)


@export_app.command()
def encoder(
    checkpoint: Annotated[
        Path,
        typer.Option(
            help="DinoBloom-*.pth, or the model-hub cache folder for --format timm-cache."
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Output folder (ONNX files and export.json).", file_okay=False)
    ],
    arch: Annotated[str, typer.Option(help="vit_small | vit_base | vit_large | vit_giant")] = (
        "vit_base"
    ),
    checkpoint_format: Annotated[
        str, typer.Option("--format", help="dinobloom (official .pth) | timm-cache")
    ] = "dinobloom",
    fp16: Annotated[
        bool, typer.Option(help="Also write encoder.fp16.onnx (ONNX Runtime CUDA).")
    ] = False,
    int8: Annotated[
        bool, typer.Option(help="Also try encoder.int8.onnx for CPU-only sites (gated).")
    ] = False,
    int8_static: Annotated[
        bool,
        typer.Option(
            help="Also try encoder.int8-static.onnx, NNCF's static int8 for the openvino "
            "backend (gated; the site keeps it only where it measures fastest)."
        ),
    ] = False,
    check_heads: Annotated[
        list[Path] | None,
        typer.Option(help="Folder from `export heads` whose calls int8 must keep; repeatable."),
    ] = None,
    crop_px: Annotated[
        int,
        typer.Option(
            help="Fold the resize and normalisation into every variant, which then takes "
            "uint8 crops of this side (the bundle's cells.patch_px, 128); 0: float pixels."
        ),
    ] = 0,
) -> None:
    """DinoBloom encoder to ONNX (fp32, fp16, int8) with parity gates."""
    from rich.console import Console

    from export.documents import write_document
    from export.encoder import CheckpointError, architecture, load_encoder, weights_file
    from export.onnx_export import ParityError
    from export.targets import EncoderExport, encoder_targets

    console = Console(stderr=True)
    try:
        spec = architecture(arch)
        if checkpoint_format not in ("dinobloom", "timm-cache"):
            raise CheckpointError(
                f"--format must be dinobloom or timm-cache, not {checkpoint_format!r}"
            )
        head_probes = _head_probes(check_heads or []) if int8 or int8_static else []
        with console.status(f"Loading {checkpoint} ({checkpoint_format}, {arch}) strictly..."):
            model = load_encoder(checkpoint, arch, checkpoint_format)  # type: ignore[arg-type]
        out.mkdir(parents=True, exist_ok=True)
        job = EncoderExport(model, out, arch, crop_px, head_probes, console)
        for target in encoder_targets(
            {"fp16": fp16, "int8": int8, "int8_static": int8_static, "crop_px": bool(crop_px)}
        ):
            target.run(job)
        source = weights_file(checkpoint, checkpoint_format)  # type: ignore[arg-type]
        write_document(out, job.document(spec, source, checkpoint_format))
    except (CheckpointError, ParityError) as error:
        typer.echo(f"cytoedge: {error}", err=True)
        raise typer.Exit(1) from None
    console.print(f"Encoder {arch} exported to {out} ({', '.join(job.variants)})")


@export_app.command("patient-encoder")
def patient_encoder(
    checkpoint: Annotated[
        Path, typer.Option(help="GenBloom-V (genbloom_v.pth) or GenBloom-G (genbloom_g_fold*.pth).")
    ],
    kind: Annotated[str, typer.Option(help="genbloom-v | genbloom-g")],
    encoder: Annotated[
        Path,
        typer.Option(
            help="Folder written by `cytoedge export encoder`: the cell encoder it pairs with.",
            file_okay=False,
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Output folder (ONNX files and export.json).", file_okay=False)
    ],
    tower: Annotated[
        Path | None,
        typer.Option(help="GenBloom-V file under a GenBloom-G checkpoint without vision_model."),
    ] = None,
    output: Annotated[
        str,
        typer.Option(help="cls (the 768-d CLS) | projection (GenBloom-G's 128-d, L2-normalised)."),
    ] = "cls",
    width: Annotated[int, typer.Option(help="The aggregator's width (GenBloom: 768).")] = 768,
    max_cells: Annotated[
        int, typer.Option(help="Longer bags are evenly thinned to this many cells.", min=1)
    ] = 2000,
    fp16: Annotated[
        bool, typer.Option(help="Also try patient_encoder.fp16.onnx for GPU sites (gated).")
    ] = False,
    int8: Annotated[
        bool, typer.Option(help="Also try patient_encoder.int8.onnx for CPU sites (gated).")
    ] = False,
) -> None:
    """GenBloom patient encoder to ONNX (fp32, fp16, int8) with parity gates."""
    from rich.console import Console

    from export.documents import parity_entry, write_document
    from export.encoder import CheckpointError
    from export.onnx_export import ParityError
    from export.patient_encoder import KINDS, load_patient_encoder
    from export.patient_export import (
        FP16_FILE,
        FP32_FILE,
        INT8_FILE,
        convert_fp16,
        export_document,
        export_fp32,
        quantize_int8,
    )

    console = Console(stderr=True)
    try:
        if kind not in KINDS or output not in ("cls", "projection"):
            raise CheckpointError(
                f"--kind must be one of {', '.join(KINDS)} and --output cls or projection"
            )
        paired = _encoder_section(encoder)
        with console.status(f"Loading {checkpoint} ({kind}) strictly..."):
            model = load_patient_encoder(
                checkpoint,
                kind,  # type: ignore[arg-type]
                int(paired["embed_dim"]),
                width=width,
                output=output,  # type: ignore[arg-type]
                tower=tower,
            )
        out.mkdir(parents=True, exist_ok=True)
        with console.status(f"Exporting {FP32_FILE} and checking it against torch..."):
            report = export_fp32(model, out / FP32_FILE, {"cytoedge.patient_kind": kind})
        console.print(report.summary())
        variants, parity = {"fp32": FP32_FILE}, {FP32_FILE: parity_entry(report)}
        reduced = {
            "fp16": (fp16, FP16_FILE, convert_fp16),
            "int8": (int8, INT8_FILE, quantize_int8),
        }
        notes: dict[str, str] = {}
        for variant, (wanted, file, make) in reduced.items():
            notes[variant] = f"{variant} not requested at export"
            if not wanted:
                continue
            with console.status(f"Writing {file} and checking it against fp32 on bags..."):
                outcome = make(out / FP32_FILE, out / file, int(paired["embed_dim"]))
            notes[variant] = outcome.note  # a miss is noted; the other variants stay
            console.print(outcome.note)
            if outcome.accepted:
                variants[variant] = file
                parity[file] = {"passed": True, **outcome.metrics}
        sources = [checkpoint, *([tower] if tower is not None else [])]
        write_document(
            out,
            export_document(
                kind=kind,
                output=output,
                cell_dim=int(paired["embed_dim"]),
                out_dim=model.out_dim,
                encoder={
                    "architecture": paired["architecture"],
                    "embed_dim": paired["embed_dim"],
                },
                variants=variants,
                fp16_note=notes["fp16"],
                int8_note=notes["int8"],
                max_cells=max_cells,
                parity=parity,
                source_weights=sources,
            ),
        )
    except (CheckpointError, ParityError) as error:
        typer.echo(f"cytoedge: {error}", err=True)
        raise typer.Exit(1) from None
    console.print(f"Patient encoder {kind} ({output}) exported to {out} ({', '.join(variants)})")


def _encoder_section(folder: Path) -> dict[str, Any]:
    """The encoder section of an `export encoder` folder: what a patient encoder pairs with."""
    import json

    from export.encoder import CheckpointError

    path = folder / "export.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        section = document["section"]
        if document.get("kind") != "encoder":
            raise KeyError("kind")
        return {"architecture": section["architecture"], "embed_dim": int(section["embed_dim"])}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: not an encoder export ({error})") from None


def _head_probes(folders: list[Path]) -> list[Any]:
    """int8 head checks from folders written by `export heads` (their export.json)."""
    import json

    from export.int8 import HeadProbe

    probes = []
    for folder in folders:
        try:
            section = json.loads((folder / "export.json").read_text(encoding="utf-8"))["section"]
        except (OSError, ValueError, KeyError) as error:
            raise typer.BadParameter(f"{folder}: no readable export.json ({error})") from None
        outputs = section.get("tasks") or section.get("classes") or []
        probes.append(
            HeadProbe(
                section["name"],
                section["kind"],
                tuple(folder / f for f in section["files"]),
                dict(section.get("thresholds", {})),
                tuple(outputs),
            )
        )
    return probes


@export_app.command()
def heads(
    checkpoint: Annotated[
        Path, typer.Option(help="Head checkpoint (cytoedge-head format, see docs/export.md).")
    ],
    out: Annotated[
        Path, typer.Option(help="Output folder (ONNX files and export.json).", file_okay=False)
    ],
    name: Annotated[str, typer.Option(help="Head name in the bundle, e.g. mm-risk.")],
    kind: Annotated[
        str | None,
        typer.Option(help="gated_attention_mil | transformer_mil (checked against the file)."),
    ] = None,
    bag_lengths: Annotated[
        str, typer.Option(help="Bag lengths the parity gate runs, comma-separated.")
    ] = "1,7,5000",
    indeterminate_band: Annotated[
        float, typer.Option(help="Calls within this distance of a threshold: indeterminate.")
    ] = 0.0,
) -> None:
    """MIL heads (all ensemble members) to ONNX with parity gates."""
    from rich.console import Console

    from export.documents import (
        default_head_section_fields,
        exporter_versions,
        parity_entry,
        write_document,
    )
    from export.heads import HeadCheckpointError, load_heads
    from export.onnx_export import ParityError, export_head_member
    from runtime.files import sha256_file

    console = Console(stderr=True)
    try:
        lengths = [int(n) for n in bag_lengths.split(",") if n.strip()]
        if not lengths or min(lengths) < 1:
            raise typer.BadParameter("bag lengths must be positive integers")
        head_set = load_heads(checkpoint)
        if kind is not None and kind != head_set.kind:
            raise HeadCheckpointError(f"{checkpoint} holds a {head_set.kind} head, not {kind}")
        out.mkdir(parents=True, exist_ok=True)
        files, parity = [], {}
        count = len(head_set.members)
        for index, member in enumerate(head_set.members):
            file = f"{name}.{index}.onnx"
            with console.status(f"Exporting member {index + 1}/{count} and checking it..."):
                report = export_head_member(
                    member,
                    out / file,
                    bag_lengths=lengths,
                    metadata={"cytoedge.ensemble_member": f"{index}/{count}"},
                )
            console.print(f"{file}: {report.summary()}")
            files.append(file)
            parity[file] = parity_entry(report)
        fields, notes = default_head_section_fields(
            head_set.kind, head_set.outputs, head_set.thresholds
        )
        for note in notes:
            console.print(f"[yellow]note:[/yellow] {note}")
        write_document(
            out,
            {
                "kind": "head",
                "section": {
                    "name": name,
                    "kind": head_set.kind,
                    "files": files,
                    "indeterminate_band": indeterminate_band,
                    **fields,
                },
                "parity": parity,
                "provenance": {
                    "source_weights": {"file": checkpoint.name, "sha256": sha256_file(checkpoint)},
                    "config": head_set.config,
                    "notes": notes,
                    "exporter": exporter_versions(),
                },
            },
        )
    except (HeadCheckpointError, ParityError) as error:
        typer.echo(f"cytoedge: {error}", err=True)
        raise typer.Exit(1) from None
    console.print(f"Head {name} ({head_set.kind}, {count} member(s)) exported to {out}")


@export_app.command()
def segmenter(
    out: Annotated[
        Path,
        typer.Option(help="Output folder (segmenter.onnx, segmenter.json).", file_okay=False),
    ],
    model_dir: Annotated[
        Path,
        typer.Argument(
            help="StarDist2D model folder (config.json, thresholds.json, weights_best.h5).",
            file_okay=False,
        ),
    ],
    norm_low: Annotated[
        float | None,
        typer.Option(help="Percentile mapped to 0 before the network (default 1.0).", min=0),
    ] = None,
    norm_high: Annotated[
        float | None,
        typer.Option(help="Percentile mapped to 1 before the network (default 99.8).", max=100),
    ] = None,
    threads: Annotated[int, typer.Option(min=0, help="CPU threads; 0: one per core.")] = 0,
    int8: Annotated[
        bool,
        typer.Option(
            help="Also write segmenter.int8.onnx for CPU sites, only if its detections "
            "match fp32's (export/segmenter_int8.py)."
        ),
    ] = False,
    gate_tiles: Annotated[
        Path | None,
        typer.Option(
            help="With --int8: gate it on these held-out field photos of the site "
            "(a folder of JPEG / PNG / TIFF) instead of synthetic tiles.",
            file_okay=False,
        ),
    ] = None,
    gate_pixel_size: Annotated[
        float,
        typer.Option(
            help="um per pixel of the --gate-tiles photos without a sidecar or metadata.",
            min=0,
        ),
    ] = 0.0,
) -> None:
    """StarDist network to ONNX with a parity gate (ONNX Runtime vs TensorFlow)."""
    from export.segmenter import run_export_command

    gate = None
    if gate_tiles is not None:
        if not int8:
            typer.echo("cytoedge: --gate-tiles gates the int8 network: add --int8", err=True)
            raise typer.Exit(2)
        from export.segmenter_int8 import GateTilesError, read_gate_tiles

        try:  # read before the export, so a bad folder costs nothing
            gate = read_gate_tiles(gate_tiles, gate_pixel_size)
        except GateTilesError as error:
            typer.echo(f"cytoedge: {error}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"int8 gate tiles: {gate.description}", err=True)

    status = run_export_command(
        model_dir,
        out,
        normalisation=None
        if norm_low is None and norm_high is None
        else {
            "kind": "percentile",
            "low": 1.0 if norm_low is None else norm_low,
            "high": 99.8 if norm_high is None else norm_high,
        },
        threads=threads,
    )
    if status == 0 and int8:
        from export.segmenter_int8 import add_int8_to_export

        typer.echo(add_int8_to_export(out, threads, gate).reason, err=True)
    raise typer.Exit(status)


@export_app.command()
def engines(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder whose engines to build.")],
) -> None:
    """Build fp16 TensorRT engines for this GPU, each checked against fp32 ONNX."""
    from rich.console import Console

    from export.onnx_export import ParityError
    from export.tensorrt_build import (
        TensorRTUnavailableError,
        build_checked_engine,
        bundle_targets,
        require_tensorrt,
    )
    from runtime.backends.base import BackendError
    from runtime.bundle_format import BundleError, load_bundle

    console = Console(stderr=True)
    try:
        version = require_tensorrt()
        engines_dir = load_bundle(bundle).engines_dir
        targets = bundle_targets(bundle)
        console.print(f"TensorRT {version}: {len(targets)} engine(s) into {engines_dir}")
        for index, target in enumerate(targets, start=1):
            label = f"{index}/{len(targets)} {target.onnx_path.name}"
            with console.status(f"Building / checking {label} (minutes on first build)..."):
                engine_path, report = build_checked_engine(target, engines_dir)
            console.print(f"{engine_path.name}: {report.summary()}")
    except TensorRTUnavailableError as error:
        typer.echo(f"cytoedge: {error}", err=True)
        raise typer.Exit(2) from None
    except (BundleError, BackendError, ParityError) as error:
        typer.echo(f"cytoedge: {error}", err=True)
        raise typer.Exit(1) from None


@export_app.command()
def bundle(
    out: Annotated[Path, typer.Argument(help="Bundle folder to create.")],
    encoder: Annotated[
        Path, typer.Option(help="Folder written by `cytoedge export encoder`.", file_okay=False)
    ],
    name: Annotated[str, typer.Option(help="Bundle name, e.g. mm-risk.")],
    version: Annotated[str, typer.Option(help="Bundle version, e.g. 1.0.0.")],
    intended_use: Annotated[
        str, typer.Option(help="demo | research | clinical (shown on every report).")
    ],
    segmenter: Annotated[
        Path | None, typer.Option(help="Folder written by `cytoedge export segmenter`.")
    ] = None,
    head: Annotated[
        list[Path] | None,
        typer.Option(
            help="Folder written by `cytoedge export heads`; repeatable. None: a bundle to "
            "train heads for (cytoedge train)."
        ),
    ] = None,
    sections: Annotated[
        Path | None,
        typer.Option(help="JSON with stain_reference, qc, cells and provenance sections."),
    ] = None,
    patient_encoder: Annotated[
        Path | None,
        typer.Option(help="Folder written by `cytoedge export patient-encoder`."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
) -> None:
    """Assemble a versioned, checksummed model bundle from gated exports."""
    from rich.console import Console

    from export.bundle_assembly import AssemblyError, assemble_bundle
    from runtime.bundle_format import BundleError

    console = Console()
    try:
        with console.status("Checking exports, copying and hashing files..."):
            made = assemble_bundle(
                out,
                encoder_dir=encoder,
                head_dirs=head or [],
                segmenter_dir=segmenter,
                name=name,
                version=version,
                intended_use=intended_use,
                sections_file=sections,
                patient_encoder_dir=patient_encoder,
                overwrite=overwrite,
            )
    except (AssemblyError, BundleError) as exc:
        typer.echo(f"cytoedge: {exc}", err=True)
        raise typer.Exit(1) from None
    heads = ", ".join(made.head_names) or "none (train them: cytoedge train CASES --bundle ...)"
    console.print(
        f"Bundle {made.name} {made.version} ({made.intended_use}) at {made.path}: "
        f"{len(made.files)} files, heads {heads}, sha256 {made.sha256[:12]}"
    )
