"""GenBloom's second stage on a site's labels (export/patient_align.py): the SupCon loss,
the held-out split, the alignment itself on seeded bags whose marker profile is
learnable, and the options it cannot be combined with. The command end to end on the
tiny bundle (checkpoint accepted or refused, the new version, the probe dropped) runs in
tests/test_patient_recipe.py, on the cases that test's probe learnt from."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from appliance.cli.main import app
from export.patient_align import (
    AlignRecipe,
    aligned_encoder,
    embed,
    held_out,
    precision_at_k,
    supcon_loss,
)

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
