"""GenBloom patient encoders: a bag of cell embeddings in, one patient embedding out.

GenBloom (marrlab/GenBloom, Apache-2.0) aggregates a patient's DinoBloom-B cell
embeddings with a DINOv2 transformer that has no position embedding: each cell
embedding is a token (a linear ``patch_embed.project`` to the width), a CLS token is
prepended, 6 pre-norm blocks with LayerScale run, and the final LayerNorm's CLS is the
patient embedding. Its public evaluation builds depth 6, width 768, 12 heads (the
loader's default depth of 12 is not what the checkpoints hold). GenBloom-G adds a
projection head trained contrastively on karyotype and mutation panels:
Linear(768, 64), BatchNorm, GELU, Dropout, Linear(64, 128), then L2 normalisation.

The blocks are timm's ViT ``Block``: its parameter names and arithmetic are DINOv2's
(norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma; LayerNorm
eps 1e-6 passed in). Checkpoints load strictly after the documented mapping
(docs/export.md, "Patient encoder"); nothing is downloaded.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as functional
from timm.models.vision_transformer import Block
from torch import nn

from export.encoder import CheckpointError

DEPTH = 6
HEADS = 12
WIDTH = 768  # GenBloom's, on DinoBloom-B's 768-d cell embeddings
MLP_RATIO = 4
PROJECTION_HIDDEN = 64
PROJECTION_DIM = 128
CheckpointKind = Literal["genbloom-v", "genbloom-g"]
KINDS: tuple[str, ...] = ("genbloom-v", "genbloom-g")
OutputKind = Literal["cls", "projection"]
# Dropped by the mapping: the iBOT training heads; the position embedding, which
# GenBloom zeroes and freezes (it never reaches a token); the iBOT mask token, used only
# when training masks cells.
_DROPPED_PREFIXES = ("dino_head.", "ibot_head.")
_DROPPED_KEYS = ("pos_embed", "mask_token")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


class PatientEncoder(nn.Module):
    """(cells, cell_dim) float32 -> (1, out): the final LayerNorm's CLS, or for
    ``output == "projection"`` GenBloom-G's L2-normalised projection of it."""

    def __init__(self, cell_dim: int, width: int, projection: bool) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = nn.ModuleDict({"project": nn.Linear(cell_dim, width)})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(
            Block(
                width, HEADS, mlp_ratio=MLP_RATIO, qkv_bias=True, init_values=1e-5, norm_layer=norm
            )
            for _ in range(DEPTH)
        )
        self.norm = norm(width)
        # GenBloom-G's ProjectionHead keeps its layers in ``net`` (the file's own naming).
        self.projection_head = (
            nn.ModuleDict(
                {
                    "net": nn.Sequential(
                        nn.Linear(width, PROJECTION_HIDDEN),
                        nn.BatchNorm1d(PROJECTION_HIDDEN),
                        nn.GELU(),
                        nn.Dropout(0.1),
                        nn.Linear(PROJECTION_HIDDEN, PROJECTION_DIM),
                    )
                }
            )
            if projection
            else None
        )
        self.output: OutputKind = "cls"
        for module in self.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False  # plain attention: the same arithmetic, exports cleanly

    @property
    def out_dim(self) -> int:
        return PROJECTION_DIM if self.output == "projection" else self.cls_token.shape[-1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed["project"](features).unsqueeze(0)
        x = torch.cat((self.cls_token, tokens), dim=1)
        for block in self.blocks:
            x = block(x)
        cls = self.norm(x)[:, 0]
        if self.output == "projection" and self.projection_head is not None:
            return functional.normalize(self.projection_head["net"](cls), dim=-1)
        return cls


def build_patient_encoder(
    cell_dim: int, width: int = WIDTH, projection: bool = False
) -> PatientEncoder:
    """An untrained GenBloom-shaped aggregator in eval mode."""
    return PatientEncoder(cell_dim, width, projection).eval()


def load_patient_encoder(
    path: str | Path,
    kind: CheckpointKind,
    cell_dim: int,
    *,
    width: int = WIDTH,
    output: OutputKind = "cls",
    tower: str | Path | None = None,
) -> PatientEncoder:
    """Build and strictly load a GenBloom-V or GenBloom-G checkpoint; raises CheckpointError.

    ``tower``: the GenBloom-V file a GenBloom-G checkpoint without its own
    ``vision_model`` was trained on (as GenBloom's evaluation pairs them).
    """
    if kind == "genbloom-v":
        if output == "projection":
            raise CheckpointError(f"{path}: a GenBloom-V checkpoint has no projection head")
        state = read_genbloom_v(path)
    elif kind == "genbloom-g":
        state = read_genbloom_g(path, tower)
    else:
        raise CheckpointError(f"unknown patient encoder kind {kind!r}; use one of {list(KINDS)}")
    _check_widths(state, path, cell_dim, width)
    model = build_patient_encoder(cell_dim, width, projection=kind == "genbloom-g")
    _load_strict(model, state)
    model.output = output
    return model


def read_genbloom_v(path: str | Path) -> dict[str, torch.Tensor]:
    """The aggregator of a GenBloom-V file (``genbloom_v.pth`` / ``teacher_checkpoint.pth``).

    ``teacher`` in DINOv2 naming: ``backbone.`` is stripped, the iBOT heads, position
    embedding and mask token are dropped, and blocks stored in chunks
    (``blocks.<chunk>.<n>.``) or flat (``blocks.<n>.``) become ``blocks.<n>.``.
    """
    checkpoint = _read(path)
    teacher = checkpoint.get("teacher")
    if not isinstance(teacher, dict):
        raise CheckpointError(
            f"{path}: not a GenBloom-V checkpoint (expected a dict with a 'teacher' state "
            f"dict, found {list(checkpoint)[:10]})"
        )
    return _mapped({k.removeprefix("backbone."): v for k, v in teacher.items()})


def read_genbloom_g(path: str | Path, tower: str | Path | None) -> dict[str, torch.Tensor]:
    """Aggregator and projection head of a GenBloom-G file (``genbloom_g_fold{k}.pth``).

    The file holds ``vision_tower`` ("transformer"), ``projection_head`` (``net.0``,
    ``net.1`` BatchNorm, ``net.4``) and, when the tower was fine-tuned, ``vision_model``
    in the model's naming; without it the tower is read from the GenBloom-V ``tower``.
    """
    checkpoint = _read(path)
    head = checkpoint.get("projection_head")
    if not isinstance(head, dict):
        raise CheckpointError(
            f"{path}: not a GenBloom-G checkpoint (expected a 'projection_head' state dict, "
            f"found {list(checkpoint)[:10]})"
        )
    if checkpoint.get("vision_tower", "transformer") != "transformer":
        raise CheckpointError(
            f"{path}: vision_tower is {checkpoint['vision_tower']!r}; only the transformer "
            "tower is a patient encoder"
        )
    vision = checkpoint.get("vision_model")
    if isinstance(vision, dict):
        state = _mapped(dict(vision))
    elif tower is not None:
        state = read_genbloom_v(tower)
    else:
        raise CheckpointError(
            f"{path}: holds no vision_model; give the GenBloom-V file it was trained on (--tower)"
        )
    return state | {f"projection_head.{k}": v for k, v in head.items()}


def _read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt / unsafe files
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({error})") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def _mapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mapped = {}
    for key, value in state.items():
        if key.startswith(_DROPPED_PREFIXES) or key in _DROPPED_KEYS:
            continue
        mapped[_CHUNKED_BLOCK.sub(r"blocks.\1.", key)] = value
    return mapped


def _check_widths(
    state: dict[str, torch.Tensor], path: str | Path, cell_dim: int, width: int
) -> None:
    """A file for another encoder or width is refused in words, before the key check."""
    project = state.get("patch_embed.project.weight")
    if project is None or project.ndim != 2:
        return  # strict loading names the key
    found_width, found_cells = (int(n) for n in project.shape)
    if found_cells != cell_dim:
        raise CheckpointError(
            f"{path}: takes {found_cells}-d cell embeddings, but the encoder gives {cell_dim}-d "
            "(a patient encoder is trained on one cell encoder)"
        )
    if found_width != width:
        raise CheckpointError(f"{path}: width {found_width}, expected {width} (--width)")


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint keys do not match the patient encoder", missing, unexpected
        )
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise CheckpointError(f"checkpoint shapes do not match: {'; '.join(wrong[:10])}")
    model.load_state_dict(
        {k: v if v.dtype == torch.int64 else v.to(torch.float32) for k, v in state.items()},
        strict=True,
    )
    model.eval()
