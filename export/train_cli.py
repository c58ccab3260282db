"""``cytoedge train CASES``: torch is imported inside the command only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from appliance.cli.shared import ConfigOption, fail, setup


def train(
    cases: Annotated[
        Path, typer.Argument(metavar="CASES", help="Cases table (CSV; docs/training.md).")
    ],
    bundle: Annotated[
        Path | None,
        typer.Option(help="Bundle whose encoder and segmenter to use (default: the configured)."),
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="The new version (default: the base's next number).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder of the new version (default <data_dir>/bundles/<name>-<ver>)."),
    ] = None,
    folds: Annotated[int, typer.Option(min=2, help="Patient-level cross-validation folds.")] = 5,
    indeterminate_band: Annotated[
        float,
        typer.Option(min=0.0, max=0.49, help="Calls within this distance of a threshold."),
    ] = 0.05,
    intended_use: Annotated[
        str | None, typer.Option(help="demo | research | clinical (default: the base's).")
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Folder of the training report (default <data_dir>/validation/...)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of folds, initialisation and sampling.")] = 0,
    config: ConfigOption = None,
) -> None:
    """Train heads on labelled cases: a new bundle version and its out-of-fold report.

    Every scan is embedded by the base bundle's own encoder and segmenter (cached:
    a second run embeds only new scans). Exit 0 when the new version is written; 1
    when the cases cannot train a head; 2 with one line for a bundle or table that
    cannot be used.
    """
    from rich.console import Console

    from appliance.site.derived_versions import next_version, version_folder
    from appliance.validation.cases_table import CasesTableError, read_cases_table
    from appliance.validation.cohort import PipelineSettings
    from appliance.validation.summary import print_summary
    from export.onnx_export import ParityError
    from export.train_run import TrainingError, TrainOptions, train_bundle
    from runtime.bundle_format import BundleError, load_bundle

    cfg = setup(config)
    console = Console(stderr=True)
    try:
        base = load_bundle(bundle or cfg.bundle_dir)
        table = read_cases_table(cases)
    except (BundleError, CasesTableError) as exc:
        raise fail(str(exc)) from None
    new_version = version or next_version(base.version)
    destination = out or version_folder(cfg.data_dir / "bundles", base.name, new_version)
    folder = report or cfg.data_dir / "validation" / f"{base.name}-{new_version}" / "training"
    if destination.exists():
        raise fail(f"{destination} exists; choose another --version or --out")
    destination.parent.mkdir(parents=True, exist_ok=True)
    console.print(
        f"Training on {len(table)} cases of {cases} with the encoder and segmenter of "
        f"{base.name} {base.version}"
    )
    try:
        result = train_bundle(
            table,
            base,
            PipelineSettings.from_config(cfg),
            console,
            destination=destination,
            version=new_version,
            report_folder=folder,
            options=TrainOptions(folds=folds, indeterminate_band=indeterminate_band, seed=seed),
            intended_use=intended_use,
        )
    except (TrainingError, BundleError, ParityError) as exc:
        raise fail(str(exc), code=1) from None
    for case, reason in result.left_out.items():
        console.print(f"[yellow]left out[/yellow] {case}: {reason}")
    print_summary(result.report, Console())
    seconds = result.seconds
    console.print(
        f"Embedding {seconds['embedding']:.0f} s ({result.scans_embedded} scans embedded, "
        f"{result.scans_cached} from the cache), head training {seconds['heads']:.0f} s, "
        f"export {seconds['export']:.0f} s"
    )
    made = result.bundle
    console.print(
        f"Bundle {made.name} {made.version} ({made.intended_use}) at {made.path}, heads "
        f"{', '.join(made.head_names)}; report {result.files.html}"
    )
