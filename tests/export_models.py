"""Test models and checkpoints in the real on-disk formats, with random weights.

timm initialises LayerScale to 1e-5, which makes random blocks near-identity and lets any
export "match"; these models get LayerScale in [0.2, 1.0] so every block matters.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import onnx
import torch
from torch import nn

from export.encoder import architecture, build_encoder


def meaningful_encoder(arch: str = "vit_small", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_encoder(arch)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".gamma"):
                parameter.copy_(0.2 + 0.8 * torch.rand(parameter.shape, generator=generator))
    return model.eval()


def dinov2_backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone in facebookresearch/dinov2 naming (DinoVisionTransformer, no chunks).

    Module names there: cls_token, pos_embed, mask_token, patch_embed.proj,
    blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma},
    norm; the SwiGLU FFN of ViT-G is mlp.w12 / mlp.w3.
    """
    swiglu = type(model.blocks[0].mlp).__name__ == "SwiGLUPacked"
    state = {}
    for key, value in model.state_dict().items():
        if swiglu:
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        state[key] = value.clone()
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    return state


def write_dinobloom_checkpoint(
    model: nn.Module, path: Path, *, rename: tuple[str, str] | None = None, drop: str = ""
) -> Path:
    """``{"teacher": {backbone.*, dino_head.*, ibot_head.*}}`` as in DinoBloom-{S,B,L,G}.pth."""
    teacher = {f"backbone.{k}": v for k, v in dinov2_backbone_state(model).items()}
    dim = model.embed_dim
    for head in ("dino_head", "ibot_head"):  # DINOHead: 3-layer MLP + weight-normed last layer
        teacher[f"{head}.mlp.0.weight"] = torch.randn(64, dim)
        teacher[f"{head}.mlp.0.bias"] = torch.zeros(64)
        teacher[f"{head}.mlp.2.weight"] = torch.randn(64, 64)
        teacher[f"{head}.mlp.2.bias"] = torch.zeros(64)
        teacher[f"{head}.mlp.4.weight"] = torch.randn(32, 64)
        teacher[f"{head}.mlp.4.bias"] = torch.zeros(32)
        teacher[f"{head}.last_layer.weight_g"] = torch.ones(128, 1)
        teacher[f"{head}.last_layer.weight_v"] = torch.randn(128, 32)
    if rename:
        teacher[rename[1]] = teacher.pop(rename[0])
    if drop:
        teacher.pop(drop)
    torch.save({"teacher": teacher}, path)
    return path


def write_timm_cache(
    model: nn.Module, cache_dir: Path, arch: str, *, drop: str = "", owner: str = "1aurent"
) -> Path:
    """A model-hub cache repository folder: blobs/, refs/main, snapshots/<rev>/ symlinks."""
    from safetensors.torch import save_file

    repo = cache_dir / f"models--{owner}--{arch}_patch14_224.dinobloom"
    revision = "4f2a9d8" + "0" * 33
    blobs, snapshot = repo / "blobs", repo / "snapshots" / revision
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items() if k != drop}
    staged = blobs / "staged"
    save_file(state, staged)
    config = {
        "architecture": architecture(arch).timm_name,
        "num_classes": 0,
        "num_features": architecture(arch).embed_dim,
        "global_pool": "token",
        "pretrained_cfg": {"input_size": [3, 518, 518], "mean": [0.485, 0.456, 0.406]},
    }
    for name, data in (
        ("model.safetensors", staged.read_bytes()),
        ("config.json", json.dumps(config).encode()),
    ):
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    staged.unlink()
    return repo


def peaky_head(model: nn.Module, seed: int) -> nn.Module:
    """Random head weights at a scale where attention is far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim > 1:
                scale = 1.5 / math.sqrt(parameter.shape[-1])
                if ".qkv." in name:
                    scale *= 4.0  # sharper attention so the rollout is not ~uniform
            else:
                scale = 0.1
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


def assert_fp16_keeps_fp32_edges(model: onnx.ModelProto, layer_norms: int) -> None:
    """An fp16 conversion: fp16 weights, float32 inputs and outputs, and every one of the
    ``layer_norms`` LayerNorms still present with an fp32 scale, so the op runs in fp32."""
    float32 = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [float32]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [float32]
    weights = {i.name: i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in weights.values()
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == layer_norms
    assert all(weights[node.input[1]] == float32 for node in norms)
