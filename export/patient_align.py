"""GenBloom's second stage on a site's own genetic labels (``cytoedge train CASES
--align-patient-encoder CHECKPOINT``): the projection head is fitted with a supervised
contrastive loss so that cases with the same marker profile lie close together.

1. The checkpoint must be the one the base bundle's patient encoder was exported from:
   its torch embeddings of the export's probe bags must reach the fp32 gate's cosine
   against the bundle's fp32 ONNX, or it is refused with one line. The kind is the
   base's (a GenBloom-G base needs a GenBloom-G file).
2. Every case of the table goes through the base's slide pipeline
   (``appliance.validation.cohort``, the cache of ``cytoedge train``); its bag is every
   kept cell, thinned to ``max_cells`` as scoring thins it. The frozen aggregator gives
   each bag's CLS once, plus a few views of random halves of the bag (GenBloom's cell
   sampling), so that only the small projection head (GenBloom-G's shape: width -> 64
   -> BatchNorm -> GELU -> 128, L2-normalised) learns, full batch, on a CPU. A
   GenBloom-G checkpoint's head is the start; a GenBloom-V one gets a seeded new head.
3. Positives are cases with the same profile over the table's marker columns (SupCon,
   Khosla et al. 2020, temperature 0.1). The whole profile, not one marker at a time:
   the case index is asked for earlier patients with the same findings, and a sum of
   per-marker losses would pull together cases that share one marker but differ in the
   others. A case with a marker unknown has no profile and is left out.
4. A share of the cases (by patient, never a view of a training case) is held out:
   precision@k of the profile, each held-out case against the training cases as the
   index would hold them, is measured with the base's embeddings and the aligned ones,
   and recorded whatever it shows, with chance beside it.
5. The aligned encoder (kind genbloom-g, output projection, 128-d) is exported behind
   the fp32 gate (fp16 and int8 tried when the base shipped them) and written as a new version
   with the base's other files. Heads of kind ``patient_probe`` learnt on the old
   embedding are dropped: bundle loading refuses a probe tied to another encoder.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as functional

from appliance.pipeline.networks import SlideNetworks
from appliance.site.derived_versions import derived_from, write_bundle_version
from appliance.validation.cohort import CohortCase, PipelineSettings, process_cohort
from export.onnx_export import embedding_parity, ort_session
from export.patient_encoder import (
    PROJECTION_DIM,
    PatientEncoder,
    build_patient_encoder,
    load_patient_encoder,
    read_genbloom_g,
    read_genbloom_v,
)
from export.patient_export import (
    FP16_FILE,
    FP32_FILE,
    INT8_FILE,
    convert_fp16,
    export_fp32,
    probe_bags,
    quantize_int8,
)
from export.train_heads import torch_threads
from runtime.bundle_format import Bundle, PatientEncoderSpec
from runtime.files import sha256_file
from runtime.labels import MYELOMA_MARKERS
from runtime.parity import ENCODER_MIN_COSINE
from runtime.patient import PatientEncoder as OnnxPatientEncoder
from runtime.patient import thinned

if TYPE_CHECKING:
    from rich.console import Console

    from appliance.validation.cases_table import CasesTable

PROVENANCE_KEY = "patient_alignment"
PROBE_KIND = "patient_probe"  # heads learnt on the old embedding


class AlignmentError(ValueError):
    """A checkpoint, bundle or cohort that cannot align a patient encoder; one line."""


@dataclass(frozen=True)
class AlignRecipe:
    epochs: int = 150
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1
    views: int = 4  # per case: its whole (thinned) bag and views - 1 random halves
    view_fraction: float = 0.5
    holdout: float = 0.25  # share of the cases held out for the before/after figures
    k: int = 5  # precision@k
    threads: int = 1  # torch's, as a head's recipe (export/train_heads.py) says why


@dataclass(frozen=True)
class Retrieval:
    """Precision@k of the marker profile, held-out cases against the training cases."""

    k: int
    queries: int
    before: float
    after: float
    chance: float  # the share of training cases with the query's profile, averaged


@dataclass
class AlignResult:
    bundle: Bundle
    retrieval: Retrieval
    loss: tuple[float, float]  # first and last epoch
    dropped: list[str]  # probe heads not carried into the new version
    left_out: dict[str, str] = field(default_factory=dict)  # case id -> why
    notes: dict[str, str] = field(default_factory=dict)  # fp16 / int8: kept, or why not


def matching_encoder(checkpoint: Path, base: Bundle, tower: Path | None = None) -> PatientEncoder:
    """The torch patient encoder of ``checkpoint``, read as the base's kind; AlignmentError
    unless its embeddings of the probe bags match the base's fp32 ONNX within the gate."""
    spec = base.patient_encoder
    if spec is None:
        raise AlignmentError(
            f"{base.name} {base.version} has no patient encoder to align; add one with "
            "cytoedge export patient-encoder (docs/bundles.md)"
        )
    kind = spec.kind
    # the width is the file's (a projection's 128-d embedding does not tell it): read once
    # for it, then loaded strictly as the export loads it
    state = (
        read_genbloom_v(checkpoint) if kind == "genbloom-v" else read_genbloom_g(checkpoint, tower)
    )
    project = state.get("patch_embed.project.weight")
    width = int(project.shape[0]) if project is not None and project.ndim == 2 else 0
    model = load_patient_encoder(
        checkpoint,
        kind,  # type: ignore[arg-type]
        spec.cell_dim,
        width=width,
        output=spec.output,  # type: ignore[arg-type]
        tower=tower,
    )
    session = ort_session(base.file(spec.variants["fp32"]))

    def pair(bag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            reference = model(torch.from_numpy(bag)).numpy()
        return reference, session.run(["embedding"], {"features": bag})[0]  # type: ignore[attr-defined]

    report = embedding_parity(
        "checkpoint vs the bundle's fp32", map(pair, probe_bags(spec.cell_dim)), ENCODER_MIN_COSINE
    )
    if not report.passed:
        raise AlignmentError(
            f"{checkpoint}: not the checkpoint the patient encoder of {base.name} "
            f"{base.version} was exported from (min cosine {report.metrics['min_cosine']:.5f} < "
            f"{ENCODER_MIN_COSINE} on the export's probe bags)"
        )
    return model


def supcon_loss(embeddings: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """Khosla et al.'s L_out: for each anchor with a positive, minus the mean log-softmax
    (over every other row) of its positives; rows are unit length."""
    similarity = embeddings @ embeddings.T / temperature
    self_mask = torch.eye(len(embeddings), dtype=torch.bool)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positives = (groups[:, None] == groups[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    anchors = counts > 0
    mean_positive = log_prob.masked_fill(~positives, 0.0).sum(dim=1)[anchors] / counts[anchors]
    return -mean_positive.mean()


def held_out(groups: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A mask of the held-out cases: about ``share`` of them, drawn seeded, never the last
    training case of its profile (a held-out case needs its profile among the training
    cases to be found at all)."""
    rng = np.random.default_rng(seed)
    wanted = max(1, round(share * len(groups)))
    training = {g: int(n) for g, n in zip(*np.unique(groups, return_counts=True), strict=True)}
    mask = np.zeros(len(groups), dtype=bool)
    for row in rng.permutation(len(groups)):
        if mask.sum() >= wanted:
            break
        if training[groups[row]] >= 2:
            mask[row] = True
            training[groups[row]] -= 1
    return mask


def precision_at_k(
    queries: np.ndarray,
    query_groups: np.ndarray,
    gallery: np.ndarray,
    gallery_groups: np.ndarray,
    k: int,
) -> float:
    """Mean share of each query's k nearest gallery rows (cosine) with the query's group."""
    similarity = _unit(queries) @ _unit(gallery).T
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return float((gallery_groups[nearest] == query_groups[:, None]).mean())


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def aligned_encoder(
    model: PatientEncoder,
    bags: Sequence[np.ndarray],
    groups: np.ndarray,
    recipe: AlignRecipe,
    seed: int,
) -> tuple[PatientEncoder, tuple[float, float]]:
    """``model``'s aggregator, frozen, under a projection head fitted with SupCon on
    ``bags`` (each already thinned) and their profile ``groups``; the head starts from
    ``model``'s own when it has one. Returns the encoder (output projection, eval) and
    the loss of the first and last epoch."""
    with torch_threads(recipe.threads):
        torch.manual_seed(seed)
        cell_dim = model.patch_embed["project"].in_features
        aligned = build_patient_encoder(cell_dim, model.cls_token.shape[-1], projection=True)
        missing, unexpected = aligned.load_state_dict(
            copy.deepcopy(model.state_dict()), strict=False
        )
        assert not unexpected and all(k.startswith("projection_head.") for k in missing)
        rng = np.random.default_rng(seed)
        features, labels = [], []
        aligned.output = "cls"
        with torch.no_grad():
            for bag, group in zip(bags, groups, strict=True):
                for view in _views(bag, recipe, rng):
                    features.append(aligned(torch.from_numpy(view))[0])
                    labels.append(int(group))
        x, y = torch.stack(features), torch.tensor(labels)
        head = aligned.projection_head["net"]  # type: ignore[index]
        optimiser = torch.optim.AdamW(
            head.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
        )
        head.train()
        losses = []
        for _ in range(recipe.epochs):
            optimiser.zero_grad()
            loss = supcon_loss(functional.normalize(head(x), dim=-1), y, recipe.temperature)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        aligned.eval()
        aligned.output = "projection"
        for parameter in aligned.parameters():
            parameter.requires_grad_(False)
    return aligned, (losses[0], losses[-1])


def _views(bag: np.ndarray, recipe: AlignRecipe, rng: np.random.Generator) -> list[np.ndarray]:
    """The bag and ``views - 1`` random subsets of its cells, in bag order: the same
    patient seen through other samples of its cells, as GenBloom samples them."""
    size = max(1, round(recipe.view_fraction * len(bag)))
    halves = [np.sort(rng.choice(len(bag), size, replace=False)) for _ in range(recipe.views - 1)]
    return [np.ascontiguousarray(bag, np.float32)] + [
        np.ascontiguousarray(bag[rows], np.float32) for rows in halves
    ]


def embed(model: PatientEncoder, bags: Sequence[np.ndarray]) -> np.ndarray:
    """(cases, out_dim) of ``model`` on already thinned bags."""
    with torch.no_grad():
        return np.stack(
            [model(torch.from_numpy(np.ascontiguousarray(b, np.float32)))[0].numpy() for b in bags]
        )


@dataclass
class _Profiles:
    bags: list[np.ndarray]  # thinned, as scoring gives them to the patient encoder
    groups: np.ndarray  # one id per distinct profile
    case_ids: list[str]
    left_out: dict[str, str]


def _profiles(cohort: Sequence[CohortCase], base: Bundle, markers: Sequence[str]) -> _Profiles:
    assert base.patient_encoder is not None
    bags, keys, case_ids, left_out = [], [], [], {}
    for case in cohort:
        unknown = [m for m in markers if m not in case.case.labels]
        reason = case.left_out(base.cells.min_cells)
        if reason is None and unknown:
            reason = f"{', '.join(unknown)} unknown: no marker profile"
        bag = case.bag(base, ()) if reason is None else np.zeros((0, 0))
        if reason is None and not len(bag):
            reason = "no kept cell for a patient embedding"
        if reason is not None:
            left_out[case.case_id] = reason
            continue
        bags.append(thinned(bag, base.patient_encoder.max_cells))
        keys.append(tuple(bool(case.case.labels[m]) for m in markers))
        case_ids.append(case.case_id)
    ids = {key: n for n, key in enumerate(sorted(set(keys)))}
    return _Profiles(bags, np.array([ids[k] for k in keys], np.int64), case_ids, left_out)


def align_bundle(
    table: CasesTable,
    base: Bundle,
    model: PatientEncoder,
    checkpoint: Path,
    pipeline: PipelineSettings,
    console: Console,
    *,
    destination: Path,
    version: str,
    seed: int = 0,
    recipe: AlignRecipe | None = None,
    intended_use: str | None = None,
) -> AlignResult:
    """Align ``model`` (``matching_encoder``'s) on the table's marker profiles and write
    the new version; AlignmentError when the cases cannot."""
    recipe = recipe or AlignRecipe()
    spec = base.patient_encoder
    assert spec is not None
    markers = [m for m in MYELOMA_MARKERS if m in table.columns]
    if not markers:
        raise AlignmentError(
            f"{table.path}: no marker column ({', '.join(MYELOMA_MARKERS)}) to align on"
        )
    with SlideNetworks(base, pipeline.runtime) as networks:
        cohort = process_cohort(table, networks, pipeline, console)
    found = _profiles(cohort, base, markers)
    shared = np.unique(found.groups, return_counts=True)[1]
    if not len(shared) or shared.max() < 3:
        raise AlignmentError(
            f"{table.path}: no marker profile is shared by three usable cases ({len(found.bags)} "
            f"of {len(table)} usable); alignment needs cases to pull together and some to hold out"
        )
    held = held_out(found.groups, recipe.holdout, seed)
    train = [b for b, h in zip(found.bags, held, strict=True) if not h]
    with console.status(
        f"Aligning the projection head on {len(train)} cases ({recipe.epochs} epochs)..."
    ):
        aligned, loss = aligned_encoder(model, train, found.groups[~held], recipe, seed)
    before = _base_embeddings(base, found.bags, pipeline)
    with torch_threads(recipe.threads):
        after = embed(aligned, found.bags)
    k = min(recipe.k, int((~held).sum()))
    groups = found.groups
    retrieval = Retrieval(
        k=k,
        queries=int(held.sum()),
        before=precision_at_k(before[held], groups[held], before[~held], groups[~held], k),
        after=precision_at_k(after[held], groups[held], after[~held], groups[~held], k),
        chance=float(np.mean([(groups[~held] == g).mean() for g in groups[held]])),
    )
    dropped = [h.name for h in base.heads if h.kind == PROBE_KIND]
    with tempfile.TemporaryDirectory(prefix=".align-", dir=destination.parent) as work:
        files, parity, notes = _export(aligned, Path(work), set(spec.variants))
        new_spec = PatientEncoderSpec(
            kind="genbloom-g",
            output="projection",
            cell_dim=spec.cell_dim,
            embed_dim=PROJECTION_DIM,
            encoder=spec.encoder,
            variants={variant: path.name for variant, path in files.items()},
            max_cells=spec.max_cells,
            int8_note=notes["int8"],
            fp16_note=notes["fp16"],
        )
        record = {
            "derived_from": derived_from(base),
            "checkpoint": checkpoint.name,
            "checkpoint_sha256": sha256_file(checkpoint),
            "checkpoint_kind": spec.kind,
            "head_start": "the checkpoint's projection head"
            if spec.kind == "genbloom-g"
            else f"seeded new head (seed {seed})",
            "cases_table": table.name,
            "cases_table_sha256": table.sha256,
            "cases": len(found.bags),
            "held_out": [c for c, h in zip(found.case_ids, held, strict=True) if h],
            "left_out": found.left_out,
            "markers": markers,
            "profiles": len(shared),
            "loss": "supervised contrastive (SupCon L_out); positives: the same marker "
            f"profile; temperature {recipe.temperature}",
            "recipe": asdict(recipe),
            "seed": seed,
            "loss_first_last": list(loss),
            "retrieval": asdict(retrieval),
            "dropped_heads": dropped,
            "parity": parity,
        }
        bundle = write_bundle_version(
            base,
            destination,
            version=version,
            heads=[h for h in base.heads if h.kind != PROBE_KIND],
            head_files={},
            provenance=_provenance(base, dropped, record),
            intended_use=intended_use,
            patient_encoder=(new_spec, {path.name: path for path in files.values()}),
        )
    return AlignResult(bundle, retrieval, loss, dropped, found.left_out, notes)


def _base_embeddings(
    base: Bundle, bags: Sequence[np.ndarray], pipeline: PipelineSettings
) -> np.ndarray:
    """The base's embeddings as scoring and its case index have them (its ONNX)."""
    encoder = OnnxPatientEncoder(base, pipeline.runtime)
    try:
        return np.stack([encoder.embed(bag) for bag in bags])
    finally:
        encoder.close()


def _export(
    model: PatientEncoder, work: Path, shipped: set[str]
) -> tuple[dict[str, Path], dict[str, Any], dict[str, str]]:
    """fp32 behind its gate, then each reduced variant the base shipped behind its own;
    (files by variant, parity by file, a note per reduced variant)."""
    from export.documents import parity_entry

    report = export_fp32(
        model,
        work / FP32_FILE,
        {"cytoedge.patient_kind": "genbloom-g", "cytoedge.aligned": "supcon"},
    )
    files, parity = {"fp32": work / FP32_FILE}, {FP32_FILE: parity_entry(report)}
    notes = {}
    cell_dim = model.patch_embed["project"].in_features
    reduced = {"fp16": (FP16_FILE, convert_fp16), "int8": (INT8_FILE, quantize_int8)}
    for variant, (name, make) in reduced.items():
        if variant not in shipped:
            notes[variant] = f"{variant} not tried: the base shipped none"
            continue
        outcome = make(work / FP32_FILE, work / name, cell_dim)
        if outcome.accepted:
            files[variant] = work / name
            parity[name] = {"passed": True, **outcome.metrics}
        notes[variant] = outcome.note
    return files, parity, notes


def _provenance(base: Bundle, dropped: Sequence[str], record: dict[str, Any]) -> dict[str, Any]:
    """The base's provenance, without the records of the heads dropped, and this run's."""
    provenance = copy.deepcopy(dict(base.provenance))
    heads = provenance.get("training", {}).get("heads", {})
    for name in dropped:
        heads.pop(name, None)
    return {**provenance, PROVENANCE_KEY: record}
