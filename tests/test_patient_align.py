"""GenBloom's second stage on a site's labels (export/patient_align.py): the SupCon loss,
the held-out split, the alignment itself on seeded bags whose marker profile is
learnable, and ``cytoedge train --align-patient-encoder`` on the tiny bundle: the
checkpoint it was exported from is accepted and another refused with one line, the new
version's patient encoder is GenBloom-G's 128-d unit-length projection, and the probe
learnt on the old embedding is dropped."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from appliance.cli.main import app
from export.patient_align import (
    PROVENANCE_KEY,
    AlignRecipe,
    aligned_encoder,
    embed,
    held_out,
    precision_at_k,
    supcon_loss,
)
from runtime.bundle_format import BUNDLE_FILE, load_bundle

CELL_DIM, WIDTH = 32, 48  # a narrow GenBloom: 12 heads need a width divisible by 12


def test_supcon_loss_is_khoslas_l_out_on_a_hand_worked_batch() -> None:
    # two pairs on orthogonal axes: each anchor's one positive is identical to it
    rows = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    groups = torch.tensor([0, 0, 1, 1])
    expected = -(1.0 - math.log(math.e + 2.0))  # exp(1) for the positive, exp(0) twice
    assert float(supcon_loss(rows, groups, 1.0)) == pytest.approx(expected, rel=1e-6)
    # an anchor without a positive adds nothing; swapping the pairs costs more
    lonely = supcon_loss(rows, torch.tensor([0, 0, 1, 2]), 1.0)
    assert float(lonely) == pytest.approx(expected, rel=1e-6)
    assert float(supcon_loss(rows, torch.tensor([0, 1, 0, 1]), 1.0)) > expected


def test_held_out_leaves_each_profile_a_training_case() -> None:
    groups = np.array([0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3])
    for seed in range(5):
        mask = held_out(groups, 0.25, seed)
        assert mask.sum() == 3
        assert not mask[groups == 2].any()  # its only case: it could never be found
        for group in np.unique(groups):
            assert (~mask[groups == group]).any()
    assert held_out(groups, 0.25, 1).tolist() == held_out(groups, 0.25, 1).tolist()


def _profile_bags(seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Three marker profiles, twelve cases each: a profile shifts every cell along one
    axis, each case adds its own small offset (its smear) and the cells their noise."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(3), 12)
    bags = []
    for group in groups:
        cells = rng.normal(size=(int(rng.integers(40, 80)), CELL_DIM)) * 0.5
        cells[:, 8:] += rng.normal(size=CELL_DIM - 8) * 0.3
        cells[:, group] += 1.0
        bags.append(cells.astype(np.float32))
    return bags, groups


def test_alignment_brings_held_out_cases_of_a_profile_together() -> None:
    from cytoedge_demo.genbloom import seeded_patient_encoder

    bags, groups = _profile_bags(6)
    model = seeded_patient_encoder(CELL_DIM, WIDTH, 3)
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    held = held_out(groups, 0.25, 0)
    train = [bag for bag, h in zip(bags, held, strict=True) if not h]
    aligned, (first, last) = aligned_encoder(model, train, groups[~held], AlignRecipe(), 0)

    assert aligned.output == "projection" and aligned.out_dim == 128
    assert last < first
    for key, value in backbone.items():  # the aggregator is frozen
        assert torch.equal(aligned.state_dict()[key], value), key
    before, after = embed(model, bags), embed(aligned, bags)
    assert after.shape == (36, 128)
    np.testing.assert_allclose(np.linalg.norm(after, axis=1), 1.0, atol=1e-5)

    def precision(rows: np.ndarray) -> float:
        return precision_at_k(rows[held], groups[held], rows[~held], groups[~held], 5)

    chance = 1 / 3
    assert precision(after) >= precision(before) + 0.1
    assert precision(after) > chance + 0.3


def test_a_genbloom_g_head_is_where_alignment_starts() -> None:
    from cytoedge_demo.genbloom import seeded_patient_encoder

    bags, groups = _profile_bags(7)
    model = seeded_patient_encoder(CELL_DIM, WIDTH, 4, projection=True)
    model.output = "projection"
    start = {k: v.clone() for k, v in model.projection_head.state_dict().items()}  # type: ignore[union-attr]
    still = AlignRecipe(epochs=1, learning_rate=0.0)
    aligned, _ = aligned_encoder(model, bags, groups, still, 0)
    head = aligned.projection_head.state_dict()  # type: ignore[union-attr]
    for key in ("net.0.weight", "net.0.bias", "net.4.weight", "net.4.bias"):
        assert torch.equal(head[key], start[key]), key
    # a GenBloom-V aggregator gets a new head, the same one for the same seed
    plain = seeded_patient_encoder(CELL_DIM, WIDTH, 4)
    first, _ = aligned_encoder(plain, bags, groups, still, 3)
    again, _ = aligned_encoder(plain, bags, groups, still, 3)
    assert torch.equal(
        first.projection_head["net"][0].weight, again.projection_head["net"][0].weight
    )  # type: ignore[index]
    assert not torch.equal(first.projection_head["net"][0].weight, head["net.0.weight"])  # type: ignore[index]


def test_alignment_trains_no_head_beside_it(tmp_path: Path) -> None:
    table = tmp_path / "cases.csv"
    table.write_text("case_id,scans,del(17p)\nA,a.tif,1\n")
    for extra in (["--recipe", "patient-linear"], ["--bag-classes", "plasma_cells"]):
        code, output = _invoke(
            "train", str(table), "--align-patient-encoder", str(tmp_path / "v.pth"), *extra
        )
        assert code == 2
        assert output == (
            "cytoedge: --align-patient-encoder aligns the patient encoder on a cases table; "
            "train heads (--recipe, --compare-recipes, --bag-classes, --taxonomy) on the new "
            "version after"
        )


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output.strip()


@pytest.mark.slow
def test_train_aligns_the_patient_encoder_into_a_new_version(
    tiny_bundle: Path, tmp_path: Path, isolated_data_dir: Path
) -> None:
    from cytoedge_demo.cohort import CohortSizes, write_cohorts
    from cytoedge_demo.genbloom import seeded_patient_encoder, write_genbloom_v
    from export.patient_export import probe_bags
    from runtime.patient import PatientEncoder
    from tests.fixtures.tiny_bundle import tiny_recipe

    sizes = CohortSizes(
        mm_cases={"train": 8, "holdout": 0},
        pb_patients={"train": 0, "holdout": 0},
        pb_cells=10,
        slide_px=768,
        nucleated_per_mm2=2400.0,
        plasma_fraction=0.6,
        seed=11,
    )
    tables = write_cohorts(tmp_path / "cohort", sizes, lambda fraction: None)
    # the probe learns every marker; the alignment one: two profiles of four cases, enough
    # to align on and to hold out from (four markers give eight cases mostly one each)
    with tables["train"].open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["case_id"].startswith("MM-")]
    table = tables["train"].with_name("del17p.csv")
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["case_id", "scans", "del(17p)"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    base = load_bundle(tiny_bundle)
    assert base.patient_encoder is not None and base.patient_encoder.kind == "genbloom-v"
    code, output = _invoke(
        "train", str(tables["train"]), "--bundle", str(tiny_bundle), "--folds", "2",
        "--version", "5",
        "--recipe", "patient-linear",
    )  # fmt: skip
    assert code == 0, output
    probed = load_bundle(isolated_data_dir / "bundles" / f"{base.name}-5")
    assert probed.head("myeloma").kind == "patient_probe"

    # The demo build's checkpoint, written again from its seed; another seed is refused.
    width = base.patient_encoder.cell_dim
    seed = tiny_recipe().seed + 7  # type: ignore[attr-defined]
    checkpoint = write_genbloom_v(
        seeded_patient_encoder(width, width, seed), tmp_path / "genbloom_v.pth"
    )
    wrong = write_genbloom_v(seeded_patient_encoder(width, width, seed + 1), tmp_path / "other.pth")
    code, output = _invoke(
        "train", str(table), "--bundle", str(probed.path), "--align-patient-encoder", str(wrong)
    )
    assert code == 2
    assert output.startswith(f"cytoedge: {wrong}: not the checkpoint the patient encoder of")
    assert len(output.splitlines()) == 1 and "min cosine" in output
    assert not (isolated_data_dir / "bundles" / f"{base.name}-6").exists()

    bare = tmp_path / "bare"
    shutil.copytree(tiny_bundle, bare)
    manifest = json.loads((bare / BUNDLE_FILE).read_text())
    del manifest["patient_encoder"]
    (bare / BUNDLE_FILE).write_text(json.dumps(manifest))
    code, output = _invoke(
        "train", str(table), "--bundle", str(bare), "--align-patient-encoder", str(checkpoint)
    )
    assert code == 2 and output.endswith(
        "has no patient encoder to align; add one with "
        "cytoedge export patient-encoder (docs/bundles.md)"
    )

    code, output = _invoke(
        "train", str(table), "--bundle", str(probed.path), "--version", "6",
        "--align-patient-encoder", str(checkpoint),
    )  # fmt: skip
    assert code == 0, output
    words = " ".join(output.split())
    assert "Held-out precision@" in words and "Dropped myeloma" in words
    made = load_bundle(isolated_data_dir / "bundles" / f"{base.name}-6")
    spec = made.patient_encoder
    assert spec is not None
    assert (spec.kind, spec.output, spec.embed_dim, spec.cell_dim) == (
        "genbloom-g",
        "projection",
        128,
        width,
    )
    assert spec.encoder == base.patient_encoder.encoder
    assert all(h.kind != "patient_probe" for h in made.heads)
    assert made.head_names == tuple(n for n in probed.head_names if n != "myeloma")
    assert (
        made.file(spec.variants["fp32"]).read_bytes()
        != base.file(base.patient_encoder.variants["fp32"]).read_bytes()
    )

    record = made.provenance[PROVENANCE_KEY]
    assert record["dropped_heads"] == ["myeloma"]
    assert "myeloma" not in made.provenance["training"]["heads"]
    assert record["checkpoint_kind"] == "genbloom-v" and record["markers"] == ["del(17p)"]
    assert record["cases"] == 8 and len(record["held_out"]) == 2
    assert record["derived_from"]["version"] == "5"
    from runtime.files import sha256_file

    assert record["checkpoint_sha256"] == sha256_file(checkpoint)
    retrieval = record["retrieval"]
    assert retrieval["queries"] == 2 and 0.0 <= retrieval["after"] <= 1.0

    # The network itself returns unit-length 128-d embeddings, bag by bag.
    encoder = PatientEncoder(made)
    try:
        for bag in probe_bags(width):
            raw = encoder.model.run({"features": bag})["embedding"]
            assert raw.shape == (1, 128)
            assert float(np.linalg.norm(raw)) == pytest.approx(1.0, abs=1e-4)
    finally:
        encoder.close()
