"""GenBloom checkpoints with seeded weights, written in the published layout.

The demo bundle's patient encoder and the loader's tests start from these files, so
the export reads them exactly as it reads the real ``genbloom_v.pth`` and
``genbloom_g_fold{k}.pth``:

- GenBloom-V: ``{"teacher": {...}}`` with ``backbone.`` prefixes, flat ``blocks.<n>.``,
  the iBOT training heads (``dino_head.*``, ``ibot_head.*``), ``mask_token`` and a
  zero ``pos_embed`` (the real one is (1, 50177, 768); a short one stands in here, as
  the loader drops it whatever its length).
- GenBloom-G: ``{"vision_tower": "transformer", "projection_head": {net.0, net.1
  (BatchNorm), net.4}, "vision_model": {...}}`` where ``vision_model`` is in the
  model's own naming, blocks in one chunk (``blocks.0.<n>.``), pos_embed and mask_token
  included; ``vision_model`` is left out for a G file that needs its V file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from export.patient_encoder import PatientEncoder, build_patient_encoder

_TRAINING_HEAD_DIM = 16  # iBOT heads' shapes play no part: the loader drops them


def seeded_patient_encoder(
    cell_dim: int, width: int, seed: int, *, projection: bool = False
) -> PatientEncoder:
    """GenBloom's architecture with seeded weights; LayerScale in [0.2, 1] so every block
    shapes the embedding (1e-5, the training init, would leave the tokens nearly as fed)."""
    torch.manual_seed(seed)
    model = build_patient_encoder(cell_dim, width, projection=projection)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.cls_token.normal_(0.0, 0.5, generator=generator)
        for name, parameter in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                parameter.copy_(0.2 + 0.8 * torch.rand(parameter.shape, generator=generator))
        if model.projection_head is not None:
            norm = model.projection_head["net"][1]
            norm.running_mean.normal_(0.0, 0.1, generator=generator)
            norm.running_var.uniform_(0.5, 1.5, generator=generator)
    return model.eval()


def _aggregator(model: PatientEncoder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "projection_head" not in k}


def _extras(width: int) -> dict[str, torch.Tensor]:
    return {"pos_embed": torch.zeros(1, 17, width), "mask_token": torch.zeros(1, width)}


def write_genbloom_v(
    model: PatientEncoder, path: Path, *, rename: tuple[str, str] | None = None
) -> Path:
    """``genbloom_v.pth``; ``rename`` (old, new) changes one key, as a damaged file would."""
    width = model.cls_token.shape[-1]
    teacher: dict[str, Any] = {
        f"backbone.{k}": v for k, v in (_aggregator(model) | _extras(width)).items()
    }
    for head in ("dino_head", "ibot_head"):
        teacher[f"{head}.last_layer.weight"] = torch.zeros(_TRAINING_HEAD_DIM, width)
    if rename is not None:
        teacher[rename[1]] = teacher.pop(rename[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"teacher": teacher}, path)
    return path


def write_genbloom_g(model: PatientEncoder, path: Path, *, with_vision_model: bool = True) -> Path:
    """``genbloom_g_fold{k}.pth`` of a model built with ``projection=True``."""
    assert model.projection_head is not None, "a GenBloom-G model has a projection head"
    width = model.cls_token.shape[-1]
    checkpoint: dict[str, Any] = {
        "vision_tower": "transformer",
        "projection_head": {k: v.clone() for k, v in model.projection_head.state_dict().items()},
    }
    if with_vision_model:
        checkpoint["vision_model"] = {
            re.sub(r"^blocks\.(\d+)\.", r"blocks.0.\1.", k): v
            for k, v in (_aggregator(model) | _extras(width)).items()
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path
