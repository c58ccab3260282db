"""DinoBloom encoders (DINOv2 ViT, patch 14, 224 px) built with timm and loaded strictly.

The embedding is the CLS token after the final LayerNorm, as in the official DinoBloom code
(``DinoVisionTransformer.forward`` returns ``x_norm_clstoken`` through an identity head).
timm with ``num_classes=0`` and token pooling returns exactly that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn

IMAGE_SIZE = 224
PATCH_SIZE = 14
TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1  # 256 patches + CLS = 257
# DinoBloom's published transform: ImageNet statistics (marrlab/DinoBloom get_transforms).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

CheckpointFormat = Literal["dinobloom", "timm-cache"]


@dataclass(frozen=True)
class EncoderArch:
    name: str
    timm_name: str
    embed_dim: int


ARCHITECTURES: dict[str, EncoderArch] = {
    a.name: a
    for a in (
        EncoderArch("vit_small", "vit_small_patch14_dinov2", 384),
        EncoderArch("vit_base", "vit_base_patch14_dinov2", 768),
        EncoderArch("vit_large", "vit_large_patch14_dinov2", 1024),
        EncoderArch("vit_giant", "vit_giant_patch14_dinov2", 1536),
    )
}


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match the architecture, key for key."""

    def __init__(
        self,
        reason: str,
        missing: list[str] | tuple[str, ...] = (),
        unexpected: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.reason = reason
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        parts = [reason]
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        super().__init__("; ".join(parts))


def architecture(name: str) -> EncoderArch:
    if name not in ARCHITECTURES:
        raise CheckpointError(
            f"unknown encoder architecture {name!r}; use one of {list(ARCHITECTURES)}"
        )
    return ARCHITECTURES[name]


def build_encoder(arch: str) -> nn.Module:
    """An untrained DinoBloom-shaped encoder at 224 px with no classifier (outputs (N, D))."""
    import timm

    spec = architecture(arch)
    # pretrained=False: timm never downloads; weights come from a local file.
    model = timm.create_model(spec.timm_name, pretrained=False, img_size=IMAGE_SIZE, num_classes=0)
    return model.eval()


def load_encoder(path: str | Path, arch: str, checkpoint_format: CheckpointFormat) -> nn.Module:
    """Build ``arch`` and load the weights at ``path`` strictly; raises CheckpointError."""
    if checkpoint_format == "dinobloom":
        state = read_dinobloom_checkpoint(path)
    elif checkpoint_format == "timm-cache":
        state = read_timm_cache(path, arch)
    else:
        raise CheckpointError(f"unknown checkpoint format {checkpoint_format!r}")
    model = build_encoder(arch)
    load_strict(model, state)
    return model


def read_dinobloom_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone of an official ``DinoBloom-{S,B,L,G}.pth`` in DINOv2 naming.

    Same selection as the official loader: keys of ``teacher`` that start with ``backbone.``
    lose that prefix; ``dino_head.*`` and ``ibot_head.*`` (training heads) are dropped.
    Anything else in ``teacher`` is kept so that strict loading reports it.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        # weights_only: a checkpoint is data and is never allowed to run code.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt / unsafe files
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("teacher"), dict):
        found = list(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path}: not a DinoBloom checkpoint (expected a dict with a 'teacher' state dict, "
            f"found {found})"
        )
    state: dict[str, torch.Tensor] = {}
    for key, value in checkpoint["teacher"].items():
        if key.startswith(("dino_head.", "ibot_head.")):
            continue
        state[key.removeprefix("backbone.")] = value
    return state


def read_timm_cache(path: str | Path, arch: str) -> dict[str, torch.Tensor]:
    """The timm port's weights from a local model-hub cache folder (never downloads).

    ``path`` may be the repository folder (``models--<owner>--<name>``, resolved through
    ``refs/main`` or its only snapshot) or a snapshot folder holding ``model.safetensors``
    and ``config.json``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    snapshot = hub_snapshot(Path(path))
    config_path = snapshot / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{config_path}: unreadable config ({error})") from error
        expected = architecture(arch).timm_name
        if config.get("architecture") not in (None, expected):
            raise CheckpointError(
                f"{config_path}: architecture {config.get('architecture')!r} does not match "
                f"--arch {arch} ({expected})"
            )
    weights = snapshot / "model.safetensors"
    try:
        return load_file(weights)
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({error})") from error


def weights_file(path: str | Path, checkpoint_format: CheckpointFormat) -> Path:
    """The file holding the weights (for its sha256 in the bundle's provenance)."""
    path = Path(path)
    return path if checkpoint_format == "dinobloom" else hub_snapshot(path) / "model.safetensors"


def hub_snapshot(path: Path) -> Path:
    """The snapshot folder of a model-hub cache repository folder (or the folder itself)."""
    if (path / "model.safetensors").is_file():
        return path
    snapshots = path / "snapshots"
    if not snapshots.is_dir():
        raise CheckpointError(
            f"{path}: not a model-hub cache folder (no model.safetensors and no snapshots/)"
        )
    ref = path / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text(encoding="utf-8").strip()
        if (snapshots / revision / "model.safetensors").is_file():
            return snapshots / revision
    candidates = sorted(p for p in snapshots.iterdir() if (p / "model.safetensors").is_file())
    if len(candidates) != 1:
        raise CheckpointError(
            f"{path}: expected exactly one snapshot with model.safetensors, found "
            f"{len(candidates)}; pass the snapshot folder itself"
        )
    return candidates[0]


def load_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Map DINOv2 naming with timm's own filter, then load with ``strict=True``.

    The 224 px position embedding (257 tokens) is required as is: timm would silently
    resample a different grid, which is not the published model.
    """
    import torch
    from timm.models.vision_transformer import checkpoint_filter_fn

    pos_embed = state.get("pos_embed")
    if pos_embed is not None and tuple(pos_embed.shape[:2]) != (1, TOKENS):
        raise CheckpointError(
            f"pos_embed has shape {tuple(pos_embed.shape)}, expected (1, {TOKENS}, D) for "
            f"{IMAGE_SIZE} px input; resampling would change the published model"
        )
    patch = state.get("patch_embed.proj.weight")
    expected_patch = model.state_dict()["patch_embed.proj.weight"]
    if patch is not None and tuple(patch.shape) != tuple(expected_patch.shape):
        raise CheckpointError(
            f"patch_embed.proj.weight has shape {tuple(patch.shape)}, expected "
            f"{tuple(expected_patch.shape)}: wrong --arch or not a patch-14 model"
        )
    mapped = checkpoint_filter_fn(dict(state), model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]
    if missing or unexpected:
        raise CheckpointError("checkpoint keys do not match the architecture", missing, unexpected)
    wrong_shapes = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong_shapes:
        raise CheckpointError(f"checkpoint shapes do not match: {'; '.join(wrong_shapes[:10])}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in mapped.items()}, strict=True)
    model.eval()
