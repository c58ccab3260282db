"""``cytoedge bench ...``: heavy imports happen inside the commands only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

bench_app = typer.Typer(
    help="Benchmarks that print figures against a baseline.", no_args_is_help=True
)


@bench_app.command()
def encoder(
    arch: Annotated[
        str, typer.Option(help="vit_small | vit_base | vit_large | vit_giant.")
    ] = "vit_base",
    batch: Annotated[int, typer.Option(min=1, help="Cells per batch (the same images).")] = 8,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats; the median counts.")] = 3,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs first.")] = 1,
    threads: Annotated[int, typer.Option(min=0, help="CPU threads; 0: one per core.")] = 0,
    weights: Annotated[
        Path | None, typer.Option(help="Real encoder weights (default: seeded random).")
    ] = None,
    checkpoint_format: Annotated[
        str, typer.Option(help="dinobloom | timm-cache, for --weights.")
    ] = "dinobloom",
    workdir: Annotated[
        Path | None, typer.Option(help="Where the exported models go (default: a temp dir).")
    ] = None,
    gemm: Annotated[
        bool, typer.Option(help="Also time fp32 vs int8 GEMM kernels at the model's shapes.")
    ] = True,
) -> None:
    """Encoder cells/s: torch eager vs ONNX Runtime fp32 / int8 (and GPU where present)."""
    from cytoedge_demo.bench.encoder import run_encoder_bench

    run_encoder_bench(
        arch=arch,
        batch=batch,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        weights=weights,
        checkpoint_format=checkpoint_format,
        workdir=workdir,
        gemm=gemm,
    )


@bench_app.command("crop-input")
def crop_input(
    bundle: Annotated[Path, typer.Argument(help="A bundle whose encoder takes float pixels.")],
    cells: Annotated[int, typer.Option(min=1, help="Rendered crops per run.")] = 400,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs of each; the median counts.")] = 3,
    threads: Annotated[int, typer.Option(min=0, help="CPU threads; 0: one per core.")] = 0,
    crop_px: Annotated[int, typer.Option(help="Side of the crops (cells.patch_px).")] = 128,
) -> None:
    """The encoder fed as today (resized and normalised on the CPU) vs with that folded in."""
    from cytoedge_demo.bench.crop_input import run_crop_input_bench

    run_crop_input_bench(bundle, cells, repeats, threads, crop_px)


@bench_app.command()
def triton(
    bundle: Annotated[Path, typer.Argument(help="The bundle whose encoder is timed.")],
    clients: Annotated[int, typer.Option(min=1, help="Workstation processes at once.")] = 1,
    cells: Annotated[int, typer.Option(min=1, help="Cells each client embeds.")] = 64,
    threads: Annotated[int, typer.Option(min=0, help="CPU threads in all; 0: one per core.")] = 0,
) -> None:
    """Cells/s of N clients through one Triton server (and the batch sizes it formed)
    against the same N clients each scoring locally."""
    from cytoedge_demo.bench.triton import run_triton_bench

    run_triton_bench(bundle, clients, cells, threads)


@bench_app.command()
def pipeline(
    size: Annotated[int, typer.Option(help="Side of the bench slide, px at 0.25 um/px.")] = 8192,
    large: Annotated[
        list[str] | None,
        typer.Option(
            help="Also this slide: N (N x N) or WxH; twice as wide as high is smear-shaped. "
            "Repeatable, e.g. --large 40000 --large 100000x50000."
        ),
    ] = None,
    budget: Annotated[
        int | None,
        typer.Option(help="Cells per slide instead of the bundle's budget (0: the whole zone)."),
    ] = None,
    bundle: Annotated[Path | None, typer.Option(help="Bundle (default: configured).")] = None,
    every_cell: Annotated[
        bool,
        typer.Option(
            help="Also the first slide with every case head reading every cell: what a bag "
            "of some classes (its budget counted in them) costs against it.",
        ),
    ] = False,
) -> None:
    """Bench slides end to end: seconds per stage, share of the zone, peak memory, ratios."""
    from appliance.config import load_config
    from cytoedge_demo.bench.pipeline import parse_size, run_pipeline_bench

    try:
        sizes = tuple(parse_size(text) for text in large or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--large") from None
    config = load_config(None)
    run_pipeline_bench(
        bundle or config.bundle_dir,
        config.data_dir / "bench",
        config.state_dir,
        size=size,
        large=sizes,
        backend=config.runtime.backend,
        threads=config.runtime.threads,
        budget=budget,
        every_cell=every_cell,
    )


@bench_app.command()
def segmentation(
    segmenter_dir: Annotated[
        Path,
        typer.Argument(help="Folder written by `cytoedge export segmenter`, or a bundle."),
    ],
    stardist: Annotated[
        Path | None,
        typer.Option(help="Its StarDist model folder: TensorFlow baseline on the same tiles."),
    ] = None,
    tiles: Annotated[int, typer.Option(min=1, help="Held-out synthetic tiles.")] = 8,
    size: Annotated[int, typer.Option(min=64, help="Tile side in px (0.25 um/px).")] = 512,
    seed: Annotated[int, typer.Option(help="Generator seed of the held-out tiles.")] = 777,
    backend: Annotated[str, typer.Option(help="Runtime backend.")] = "auto",
    threads: Annotated[int, typer.Option(min=0, help="CPU threads; 0: one per core.")] = 0,
    variants: Annotated[
        bool,
        typer.Option(
            help="Also fp32 against int8 candidates and half resolution on ONNX Runtime's "
            "CPU: s/MP on 928 px tiles, ratio, F1, detection parity."
        ),
    ] = False,
    repeats: Annotated[int, typer.Option(min=1, help="Timed passes (--variants).")] = 3,
    slide: Annotated[
        Path | None,
        typer.Option(help="With --variants: a slide whose first visited tiles' glass to measure."),
    ] = None,
) -> None:
    """Segmentation F1 at IoU 0.5 on held-out synthetic tiles; s/tile vs TensorFlow."""
    from cytoedge_demo.bench.segmentation import run_segmentation_bench, run_variants_bench

    run_segmentation_bench(segmenter_dir, stardist, tiles, size, seed, backend, threads)
    if variants:
        run_variants_bench(segmenter_dir, tiles, size, seed, threads, repeats, slide=slide)


@bench_app.command()
def fields(
    data: Annotated[
        Path, typer.Argument(help="Field photos (*.jpg) with Pascal VOC boxes (*.xml), e.g. BCCD.")
    ],
    pixel_size: Annotated[float, typer.Option(help="The photos' um per pixel.")] = 0.07,
    bundle: Annotated[Path | None, typer.Option(help="Bundle (default: configured).")] = None,
    clear_fields: Annotated[
        int,
        typer.Option(
            min=0,
            help="Also this many fields per photo without a white cell (a band of the photo "
            "clear of its white cells, mirrored): a smear where most fields hold none.",
        ),
    ] = 0,
) -> None:
    """Annotated photos as one field folder: white cells found, red cells kept, s/field."""
    from rich.console import Console

    from appliance.config import load_config
    from cytoedge_demo.bench.fields import run_fields_bench

    where = bundle or load_config(None).bundle_dir
    run_fields_bench(where, data, pixel_size, Console(), clear_fields)


@bench_app.command()
def blur(
    real: Annotated[
        list[str] | None,
        typer.Argument(
            help="FOLDER=UM_PER_PX of real photos, e.g. ../shared/data/bccd-sample=0.07"
        ),
    ] = None,
) -> None:
    """The QC blur measure, old rule vs current, on one smear at 0.25 / 0.5 / 0.1 um/px."""
    from rich.console import Console

    from cytoedge_demo.bench.fields import run_blur_bench

    folders = []
    for item in real or []:
        folder, _, um = item.rpartition("=")
        if not folder or not Path(folder).is_dir():
            raise typer.BadParameter(f"{item}: expected FOLDER=UM_PER_PX with an existing folder")
        folders.append((Path(folder), float(um)))
    run_blur_bench(folders, Console())


@bench_app.command()
def soak(
    scans: Annotated[int, typer.Argument(min=1, help="How many scans to drop.")] = 200,
    bundle: Annotated[
        Path | None, typer.Option(help="Model bundle (default: the configured one).")
    ] = None,
    kind: Annotated[str, typer.Option(help="smear (TIFF) | cells (PB folder).")] = "smear",
    size: Annotated[int, typer.Option(min=256, help="Smear side in pixels (0.25 um/px).")] = 512,
    cells: Annotated[
        int, typer.Option(min=2, help="Nucleated cells placed on each scan (about).")
    ] = 20,
    burst: Annotated[int, typer.Option(min=1, help="Scans dropped at once.")] = 10,
    quiet: Annotated[float, typer.Option(min=0.1, help="The service's quiet period, s.")] = 2.0,
    workdir: Annotated[
        Path | None, typer.Option(help="Inbox, outbox and store here (default: a temp dir).")
    ] = None,
) -> None:
    """N small scans through the service: scans/min, failures, memory growth."""
    from rich.console import Console

    from appliance.config import ConfigError, load_config
    from cytoedge_demo.bench.soak import print_report, run_soak

    if bundle is None:
        try:
            bundle = load_config().bundle_dir
        except ConfigError as exc:
            typer.echo(f"cytoedge: {exc}", err=True)
            raise typer.Exit(2) from None
    if not (bundle / "bundle.json").is_file():
        typer.echo(
            f"cytoedge: no model bundle at {bundle} (--bundle, or `cytoedge demo`)", err=True
        )
        raise typer.Exit(2)
    console = Console()
    report = run_soak(
        scans,
        bundle=bundle.resolve(),
        kind=kind,
        size_px=size,
        cells=cells,
        burst=burst,
        quiet=quiet,
        work=workdir,
    )
    print_report(report, console)
    raise typer.Exit(0 if report.failures == 0 and report.exit_code == 0 else 1)


@bench_app.command()
def heads(
    cases: Annotated[int, typer.Option(min=10, help="Cases in the synthetic cohort.")] = 300,
    mm_cells: Annotated[int, typer.Option(min=1, help="Cells per myeloma bag.")] = 300,
    pb_cells: Annotated[int, typer.Option(min=1, help="Cells per blood bag.")] = 200,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs timed per member.")] = 3,
    folds: Annotated[int, typer.Option(min=2, help="Folds of the projected training.")] = 5,
) -> None:
    """Head training on cached embeddings: s/epoch on torch's threads vs the recipe's."""
    from cytoedge_demo.bench.heads import run_heads_bench

    run_heads_bench(cases, mm_cells, pb_cells, epochs, folds)


@bench_app.command()
def cells(
    data: Annotated[
        Path,
        typer.Argument(help="Photos N.jpg with N.txt beside them (x y class), e.g. Chula RBC-12."),
    ],
    pixel_size: Annotated[
        float, typer.Option(help="The photos' um per pixel (Chula RBC-12: about 0.2).")
    ] = 0.2,
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle whose encoder to use (default: configured).")
    ] = None,
    held_out: Annotated[
        float, typer.Option(min=0.05, max=0.9, help="Share of the images held out.")
    ] = 0.3,
    seed: Annotated[int, typer.Option(help="Seed of the image split, folds and training.")] = 0,
    images: Annotated[
        int, typer.Option(min=0, help="Use this many images, drawn by the seed (0: all).")
    ] = 0,
    folds: Annotated[int, typer.Option(min=2, help="Training folds, by image.")] = 5,
) -> None:
    """A cell head on labelled cells of held-out images vs majority class and colour/shape."""
    from rich.console import Console

    from appliance.config import load_config
    from appliance.validation.labelled_cells import LabelledCellsError
    from cytoedge_demo.bench.cells import run_cells_bench
    from runtime.bundle_format import BundleError

    config = load_config(None)
    try:
        run_cells_bench(
            data,
            bundle or config.bundle_dir,
            Console(),
            pixel_size=pixel_size,
            held_out=held_out,
            seed=seed,
            limit=images,
            folds=folds,
            cache=config.cache_dir,
        )
    except (LabelledCellsError, BundleError) as exc:
        typer.echo(f"cytoedge: {exc}", err=True)
        raise typer.Exit(2) from None


@bench_app.command()
def fuzz(
    minutes: Annotated[
        float, typer.Option(min=0.1, help="Run for this long (whole batches).")
    ] = 5.0,
    seed: Annotated[int, typer.Option(help="Hypothesis seed of the first batch.")] = 0,
    data: Annotated[
        Path, typer.Option(help="Folder of bccd-sample and chula-sample (the seed photos).")
    ] = Path("../shared/data"),
    slides: Annotated[
        Path, typer.Option(help="OpenSlide's test files (`make testdata`), also seeds.")
    ] = Path(".testdata/openslide-python-1.4.1"),
    timeout: Annotated[float, typer.Option(min=1, help="Seconds per input before a hang.")] = 30,
    memory_mb: Annotated[
        float, typer.Option(min=1, help="Resident growth per input above which it fails.")
    ] = 1024,
    keep: Annotated[
        Path | None, typer.Option(help="Write the first input of each distinct failure here.")
    ] = None,
) -> None:
    """Mutated real files through every reader, each in a child: failures, hangs, memory."""
    from rich.console import Console

    from cytoedge_demo.bench.fuzz import print_report, run_fuzz

    console = Console()
    try:
        report = run_fuzz(
            data,
            slides if slides.is_dir() else None,
            minutes,
            seed,
            timeout,
            memory_mb,
            keep,
            console,
        )
    except FileNotFoundError as exc:
        typer.echo(f"cytoedge: {exc}", err=True)
        raise typer.Exit(2) from None
    print_report(report, console)
    raise typer.Exit(1 if report.failures else 0)


@bench_app.command("case-index")
def case_index(
    cases: Annotated[int, typer.Option(min=1, help="Signed-off cases in the index.")] = 100_000,
    dim: Annotated[
        list[int] | None,
        typer.Option(help="Embedding width; repeatable (default 768 and 128, GenBloom's)."),
    ] = None,
    queries: Annotated[int, typer.Option(min=1, help="Timed queries; the median counts.")] = 50,
) -> None:
    """The case index's query time and memory at scale (a plain matrix product)."""
    from cytoedge_demo.bench.case_index import run_case_index_bench

    run_case_index_bench(cases, dim or [768, 128], queries)


@bench_app.command()
def retrieval(
    bundle: Annotated[
        Path | None,
        typer.Option(help="A bundle with a patient encoder (default: the demo's networks)."),
    ] = None,
    marker: Annotated[
        list[str] | None, typer.Option(help="Hidden marker; repeatable (default: all four).")
    ] = None,
    patients: Annotated[int, typer.Option(min=4, help="Synthetic patients, half positive.")] = 24,
    cells: Annotated[int, typer.Option(min=1, help="Plasma-cell crops per patient.")] = 12,
    k: Annotated[int, typer.Option(min=1, help="Nearest patients compared.")] = 5,
) -> None:
    """precision@k of patient embeddings for the synthetic cohort's hidden marker vs chance."""
    from rich.console import Console
    from rich.table import Table

    from cytoedge_demo.retrieval import demo_networks, measure_retrieval
    from runtime.labels import MYELOMA_MARKERS

    embed_cells, embed_bag, networks = demo_networks(str(bundle) if bundle else None)
    table = Table(title=f"Retrieval, {patients} patients of {cells} plasma cells; {networks}")
    for column in ("marker", f"precision@{k}", "chance", "ratio"):
        table.add_column(column, justify="right")
    for name in marker or list(MYELOMA_MARKERS):
        found = measure_retrieval(
            embed_cells, embed_bag, marker=name, patients=patients, cells=cells, k=k
        )
        ratio = found.precision / found.chance
        table.add_row(name, f"{found.precision:.3f}", f"{found.chance:.3f}", f"{ratio:.2f}x")
    Console().print(table)
