"""The encoder's export targets, one table: what each is, where it runs, what accepts it.

A row names a target, the option that asks for it, the file it writes, whether it runs on
CPUs and GPUs, what building it needs, the gate that accepts it with that gate's
runtime/parity.py limit, and the function that builds it. ``cytoedge export encoder``
runs the rows it is asked for, in table order: fp16 and int8 convert the fp32 file, and
the crop-input fold rewrites every variant written before it. The TensorRT plan is a row
too, built on the site's own GPU by ``cytoedge export engines``, so the encoder command
never runs it. A new target is one row and its function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.parity import ENCODER_MIN_COSINE, FP16_MIN_COSINE, INT8_MIN_COSINE

if TYPE_CHECKING:
    from rich.console import Console
    from torch import nn

    from export.encoder import EncoderArch
    from export.int8 import HeadProbe
    from export.onnx_export import ParityReport

ENCODER_COMMAND = "cytoedge export encoder"
ENGINES_COMMAND = "cytoedge export engines"


@dataclass
class EncoderExport:
    """One run of ``cytoedge export encoder``: its inputs and what its targets have made."""

    model: nn.Module
    out: Path
    arch: str
    crop_px: int
    head_probes: Sequence[HeadProbe]
    console: Console
    variants: dict[str, str] = field(default_factory=dict)  # the bundle's encoder.variants
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)  # export.json's "parity"
    int8_note: str = "int8 not requested at export"

    def document(
        self, arch: EncoderArch, source_weights: Path, checkpoint_format: str
    ) -> dict[str, Any]:
        """``export.json`` for what was made: the bundle's encoder section, the gates'
        numbers and the weights' provenance."""
        from export.documents import exporter_versions
        from export.encoder import IMAGE_SIZE, MEAN, STD
        from runtime.files import sha256_file

        return {
            "kind": "encoder",
            "section": {
                "architecture": arch.timm_name,
                "embed_dim": arch.embed_dim,
                "variants": self.variants,
                "input": {
                    "size": IMAGE_SIZE,
                    "mean": list(MEAN),
                    "std": list(STD),
                    "crop_px": self.crop_px,
                },
                "int8_note": self.int8_note,
            },
            "parity": self.parity,
            "provenance": {
                "source_weights": {
                    "file": source_weights.name,
                    "format": checkpoint_format,
                    "sha256": sha256_file(source_weights),
                },
                "embedding": "CLS token after the final LayerNorm",
                "exporter": exporter_versions(),
            },
            "extra_files": sorted(p.name for p in self.out.glob("encoder*.onnx.data")),
        }

    def record(self, target: ExportTarget, report: ParityReport) -> None:
        """A variant whose gate passed: print its numbers, keep its file and report."""
        from export.documents import parity_entry

        self.console.print(report.summary())
        self.parity[target.file] = parity_entry(report)
        self.variants[target.variant] = target.file


@dataclass(frozen=True)
class ExportTarget:
    """One row of the table."""

    name: str
    option: str | None  # the encoder command's option that asks for it; None: always made
    file: str  # what it writes ("" for the fold, which rewrites the variants' files)
    cpu: bool  # runs on a CPU-only site
    gpu: bool  # runs on a GPU site
    needs: str  # to build it (the export extra holds all but TensorRT)
    gate: str  # what accepts it
    precision: str | None  # whose runtime/parity.py limit; None: each folded variant's own
    min_cosine: float | None  # that limit (the gate's per-row cosine floor)
    variant: str = ""  # its key in the bundle's encoder.variants; "": not a variant
    built_by: str = ENCODER_COMMAND
    build: Callable[[EncoderExport, ExportTarget], None] | None = None

    def run(self, job: EncoderExport) -> None:
        assert self.build is not None, f"{self.name} is built by {self.built_by}"
        self.build(job, self)


def _fp32(job: EncoderExport, target: ExportTarget) -> None:
    from export.onnx_export import export_encoder

    with job.console.status(f"Exporting {target.file} and checking it against torch..."):
        report = export_encoder(
            job.model, job.out / target.file, metadata={"cytoedge.arch": job.arch}
        )
    job.record(target, report)


def _fp16(job: EncoderExport, target: ExportTarget) -> None:
    from export.fp16 import export_fp16

    with job.console.status("Converting to fp16 and checking it (CPU, loose)..."):
        report = export_fp16(job.out / FP32.file, job.out / target.file)
    job.record(target, report)


def _int8(job: EncoderExport, target: ExportTarget) -> None:
    from export.int8 import quantize_encoder

    with job.console.status("Quantising to int8 and checking it on rendered cells..."):
        result = quantize_encoder(job.out / FP32.file, job.out / target.file, heads=job.head_probes)
    # A rejected int8 is no failure: the bundle keeps fp32 and the note says why.
    job.int8_note = result.reason
    job.console.print(result.reason)
    if result.accepted:
        job.variants[target.variant] = target.file
        job.parity[target.file] = {"passed": True, **result.metrics}


def _int8_static(job: EncoderExport, target: ExportTarget) -> None:
    from export.int8_static import quantize_encoder_static

    with job.console.status("Quantising to static int8 with NNCF and checking it on OpenVINO..."):
        result = quantize_encoder_static(
            job.out / FP32.file, job.out / target.file, heads=job.head_probes
        )
    # Like int8: a rejection is noted, the bundle keeps the other variants.
    job.int8_note = f"{job.int8_note}; {result.reason}"
    job.console.print(result.reason)
    if result.accepted:
        job.variants[target.variant] = target.file
        job.parity[target.file] = {"passed": True, **result.metrics}


def _crop_input(job: EncoderExport, target: ExportTarget) -> None:
    from export.crop_input import fold_in_place
    from export.documents import parity_entry
    from export.encoder import IMAGE_SIZE, MEAN, STD

    for variant, name in job.variants.items():
        with job.console.status(f"Folding the preprocessing into {name}..."):
            report = fold_in_place(job.out / name, variant, job.crop_px, IMAGE_SIZE, MEAN, STD)
        job.console.print(report.summary())
        job.parity[name] = {**job.parity[name], "crop_input": parity_entry(report)}


FP32 = ExportTarget(
    name="fp32 ONNX",
    option=None,
    file="encoder.onnx",
    cpu=True,
    gpu=True,
    needs="torch, timm, onnx",
    gate="per-row cosine vs torch on rendered cells (1, then 8)",
    precision="fp32",
    min_cosine=ENCODER_MIN_COSINE,
    variant="fp32",
    build=_fp32,
)
FP16 = ExportTarget(
    name="fp16 ONNX",
    option="fp16",
    file="encoder.fp16.onnx",
    cpu=False,
    gpu=True,
    needs="onnxconverter-common",
    gate="per-row cosine vs fp32 ONNX on rendered cells, run on the CPU (loose)",
    precision="fp16",
    min_cosine=FP16_MIN_COSINE,
    variant="fp16",
    build=_fp16,
)
INT8 = ExportTarget(
    name="int8 ONNX",
    option="int8",
    file="encoder.int8.onnx",
    cpu=True,
    gpu=False,
    needs="onnxruntime.quantization",
    gate="per-row cosine vs fp32 ONNX on 48 rendered cells, and unchanged calls of every "
    "--check-heads head; a miss is noted in int8_note, not an error",
    precision="int8",
    min_cosine=INT8_MIN_COSINE,
    variant="int8",
    build=_int8,
)
INT8_STATIC = ExportTarget(
    name="static int8 ONNX (NNCF)",
    option="int8_static",
    file="encoder.int8-static.onnx",
    cpu=True,
    gpu=False,
    needs="nncf, openvino",
    gate="the int8 gate (per-row cosine vs fp32 ONNX on 48 rendered cells, unchanged "
    "--check-heads calls) run through OpenVINO; a miss is noted in int8_note",
    precision="int8_static",
    min_cosine=INT8_MIN_COSINE,
    variant="int8_static",
    build=_int8_static,
)
CROP_INPUT = ExportTarget(
    name="crop-input fold",
    option="crop_px",
    file="",
    cpu=True,
    gpu=True,
    needs="onnx",
    gate="per-row cosine, folded file fed 24 rendered crops vs the same file fed as the "
    "runtime fed it; each variant's own limit less 1e-4 (Pillow's uint8 rounding)",
    precision=None,
    min_cosine=None,
    build=_crop_input,
)
TENSORRT = ExportTarget(
    name="TensorRT plan",
    option=None,
    file="engines/<model>.engine",
    cpu=False,
    gpu=True,
    needs="tensorrt >= 10 and the site's CUDA GPU",
    gate="per-row cosine vs fp32 ONNX on rendered cells (1, then 64)",
    precision="fp16",
    min_cosine=FP16_MIN_COSINE,
    built_by=ENGINES_COMMAND,
)
ENCODER_TARGETS: tuple[ExportTarget, ...] = (FP32, FP16, INT8, INT8_STATIC, CROP_INPUT, TENSORRT)


def encoder_targets(asked: dict[str, bool]) -> list[ExportTarget]:
    """The rows ``cytoedge export encoder`` makes, in order, given its options by name."""
    return [
        target
        for target in ENCODER_TARGETS
        if target.built_by == ENCODER_COMMAND and (target.option is None or asked[target.option])
    ]
