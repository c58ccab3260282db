"""Case heads (docs/METHOD.md A and B) and their checkpoint format.

A MIL head takes one bag ``features`` (N, D) and returns per-bag outputs plus one attention
weight per cell that sums to 1; a patient probe takes the case's patient embedding (1, E)
and returns its probabilities alone. An ensemble is a list of members of the same kind; its
outputs are the mean of the members' outputs (attention included).

Checkpoint file (``torch.save``, read back with ``weights_only=True``)::

    {"format": "cytoedge-head", "format_version": 1,
     "kind": "gated_attention_mil" | "transformer_mil" | "patient_probe",
     "config": {...},              # the dataclass fields below, plain JSON-able values
     "members": [state_dict, ...], # one state dict per ensemble member (k >= 1)
     "thresholds": {name: float}}  # optional: decision thresholds chosen on validation
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from runtime.labels import MYELOMA_MARKERS as MYELOMA_TASKS
from runtime.labels import PB_CLASSES

if TYPE_CHECKING:
    from collections.abc import Sequence

HeadKind = Literal["gated_attention_mil", "transformer_mil", "patient_probe"]
CHECKPOINT_FORMAT = "cytoedge-head"
CHECKPOINT_VERSION = 1


class HeadCheckpointError(ValueError):
    """A head checkpoint is unreadable or does not match its declared architecture."""


@dataclass(frozen=True)
class GatedAttentionConfig:
    """METHOD.md A: CLAM-"small" sizes for 768-d inputs, one sigmoid per marker."""

    in_dim: int = 768
    hidden_dim: int = 512
    attention_dim: int = 256
    dropout: float = 0.2
    tasks: tuple[str, ...] = MYELOMA_TASKS


@dataclass(frozen=True)
class TransformerConfig:
    """METHOD.md B (cAItomorph): 10 pre-norm layers, 8 heads x 64, MLP 2048.

    ``classifier_hidden`` defaults to 128, the paper's "MLP classifier (2 layers, 128
    hidden)"; the lab's public aggregator code uses 64 - set it to load such weights.
    """

    in_dim: int = 768
    width: int = 512
    depth: int = 10
    num_heads: int = 8
    mlp_dim: int = 2048
    dropout: float = 0.1
    classifier_hidden: int = 128
    classes: tuple[str, ...] = field(default=PB_CLASSES)


@dataclass(frozen=True)
class PatientProbeConfig:
    """GenBloom's evaluation recipe on the patient embedding: a linear probe per task
    (``hidden_dim`` 0: logistic regression), or one hidden GELU layer (a small MLP)."""

    in_dim: int = 768
    hidden_dim: int = 0
    dropout: float = 0.1
    tasks: tuple[str, ...] = MYELOMA_TASKS


class PatientProbeNetwork(nn.Module):
    """The patient embedding (1, E) -> (probabilities (T,),): one sigmoid per task."""

    def __init__(self, config: PatientProbeConfig) -> None:
        super().__init__()
        self.config = config
        tasks = len(config.tasks)
        layers: list[nn.Module] = [nn.Linear(config.in_dim, config.hidden_dim or tasks)]
        if config.hidden_dim:
            layers += [nn.GELU(), nn.Dropout(config.dropout), nn.Linear(config.hidden_dim, tasks)]
        self.embed = nn.Sequential(*layers)  # ``embed[0]`` takes the standardisation

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.sigmoid(self.embed(features)).reshape(-1),)

    def forward_batch(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, E) patient embeddings as one-row bags -> (B, T)."""
        return torch.sigmoid(self.embed(features[:, 0]))


class GatedAttentionMIL(nn.Module):
    """Gated attention MIL (Ilse et al. 2018), multi-task: (probabilities (T,), attention (N,))."""

    def __init__(self, config: GatedAttentionConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Sequential(
            nn.Linear(config.in_dim, config.hidden_dim), nn.ReLU(), nn.Dropout(config.dropout)
        )
        self.attention_v = nn.Linear(config.hidden_dim, config.attention_dim)
        self.attention_u = nn.Linear(config.hidden_dim, config.attention_dim)
        self.attention_w = nn.Linear(config.attention_dim, 1)
        self.classifiers = nn.Linear(config.hidden_dim, len(config.tasks))  # one row per task

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(features)  # (N, 512)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        attention = torch.softmax(self.attention_w(gate).squeeze(-1), dim=0)  # (N,)
        pooled = attention @ h  # (512,)
        return torch.sigmoid(self.classifiers(pooled)), attention

    def forward_batch(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training on several bags at once: ``features`` (B, N, D) padded, ``mask`` (B, N)
        True for real cells; the probabilities (B, T) ``forward`` gives for each bag."""
        h = self.embed(features)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        logits = self.attention_w(gate).squeeze(-1).masked_fill(~mask, float("-inf"))
        attention = torch.softmax(logits, dim=1)
        pooled = (attention.unsqueeze(-1) * h).sum(dim=1)
        return torch.sigmoid(self.classifiers(pooled))


class _Block(nn.Module):
    """Pre-norm transformer block; keeps q and k for the attention rollout."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.width // config.num_heads
        self.norm1 = nn.LayerNorm(config.width)
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.proj = nn.Linear(config.width, config.width)
        self.drop = nn.Dropout(config.dropout)
        self.norm2 = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(
            nn.Linear(config.width, config.mlp_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.mlp_dim, config.width),
            nn.Dropout(config.dropout),
        )

    def query_key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens = x.shape[0]
        qkv = self.qkv(self.norm1(x)).reshape(tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(1, 2, 0, 3).unbind(0)  # each (H, T, 64)
        return q * self.head_dim**-0.5, k, v

    def forward_batch(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, W) of padded bags, ``keys`` (B, T) True for real tokens."""
        batch, tokens, width = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, 64)
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        attention = torch.softmax(scores.masked_fill(~keys[:, None, None, :], float("-inf")), -1)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + self.drop(self.proj(mixed))
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.query_key_value(x)
        attention = torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # (H, T, T)
        mixed = (attention @ v).transpose(0, 1).reshape(x.shape[0], -1)
        x = x + self.drop(self.proj(mixed))
        x = x + self.mlp(self.norm2(x))
        return x, q, k


class TransformerMIL(nn.Module):
    """cAItomorph-style aggregator: (probabilities (C,), hemoglobin (1,), attention (N,)).

    Attention per cell is the CLS row of the attention rollout (Abnar and Zuidema 2020):
    head-averaged attention with the residual added, 0.5 * (A + I), multiplied over the
    layers. Only that row is needed, so it is pushed back through the layers as a vector
    (v <- v @ A_l, last layer first), recomputing each layer's attention from its stored
    q and k: memory stays at one layer's (H, T, T) attention, never L of them.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if config.width % config.num_heads:
            raise ValueError(f"width {config.width} is not a multiple of {config.num_heads}")
        self.config = config
        self.embed = nn.Sequential(nn.Linear(config.in_dim, config.width), nn.ReLU())
        self.cls_token = nn.Parameter(torch.zeros(1, config.width))
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)
        self.classifier = nn.Sequential(
            nn.Linear(config.width, config.classifier_hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.classifier_hidden, len(config.classes)),
        )
        self.hemoglobin = nn.Linear(config.width, 1)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # no positional encoding: a bag is a set
        x = torch.cat([self.cls_token, self.embed(features)], dim=0)  # (T = N + 1, W)
        queries_keys = []
        for block in self.blocks:
            x, q, k = block(x)
            queries_keys.append((q, k))
        pooled = self.norm(x[0])
        probabilities = torch.softmax(self.classifier(pooled), dim=-1)
        return probabilities, self.hemoglobin(pooled), self._rollout(queries_keys)

    def forward_batch(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training on several bags at once: ``features`` (B, N, D) padded, ``mask`` (B, N)
        True for real cells; (probabilities (B, C), hemoglobin (B, 1)) as ``forward``
        gives them per bag (the rollout is not needed to learn)."""
        batch = features.shape[0]
        cls = self.cls_token.expand(batch, 1, -1)
        x = torch.cat([cls, self.embed(features)], dim=1)
        keys = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        for block in self.blocks:
            x = block.forward_batch(x, keys)
        pooled = self.norm(x[:, 0])
        return torch.softmax(self.classifier(pooled), dim=-1), self.hemoglobin(pooled)

    @staticmethod
    def _rollout(queries_keys: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        tokens = queries_keys[0][0][0, :, 0]  # (T,), only for shape and dtype
        row = torch.cat([torch.ones_like(tokens[:1]), torch.zeros_like(tokens[1:])])  # CLS
        for q, k in reversed(queries_keys):
            attention = torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # (H, T, T)
            mixed = (row @ attention).mean(0)  # row through the head-averaged attention
            row = 0.5 * mixed + 0.5 * row
        cells = row[1:]
        return cells / cells.sum()


def build_head(kind: HeadKind, config: dict[str, Any] | None = None) -> nn.Module:
    """A head of ``kind`` from a plain config dict (missing fields take the defaults)."""
    config = dict(config or {})
    config_type: dict[str, type] = {
        "gated_attention_mil": GatedAttentionConfig,
        "transformer_mil": TransformerConfig,
        "patient_probe": PatientProbeConfig,
    }
    if kind not in config_type:
        raise HeadCheckpointError(f"unknown head kind {kind!r}; use one of {list(config_type)}")
    cls = config_type[kind]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise HeadCheckpointError(f"unknown {kind} config fields: {unknown}")
    for name in ("tasks", "classes"):
        if name in config:
            config[name] = tuple(config[name])
    return _MODEL_TYPES[kind](cls(**config)).eval()


def head_config(model: nn.Module) -> dict[str, Any]:
    """The JSON-able config dict that rebuilds ``model``."""
    config = asdict(model.config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


_MODEL_TYPES: dict[str, type[nn.Module]] = {
    "gated_attention_mil": GatedAttentionMIL,
    "transformer_mil": TransformerMIL,
    "patient_probe": PatientProbeNetwork,
}


def head_kind(model: nn.Module) -> HeadKind:
    for kind, model_type in _MODEL_TYPES.items():
        if isinstance(model, model_type):
            return kind  # type: ignore[return-value]
    raise HeadCheckpointError(f"{type(model).__name__} is not a head network")


@dataclass
class HeadSet:
    """An ensemble read from a checkpoint: its members and optional thresholds."""

    kind: HeadKind
    members: list[nn.Module]
    thresholds: dict[str, float]

    @property
    def outputs(self) -> tuple[str, ...]:
        """Task names (MIL) or class names (transformer), in output order."""
        config = self.members[0].config
        return config.classes if self.kind == "transformer_mil" else config.tasks

    @property
    def config(self) -> dict[str, Any]:
        return head_config(self.members[0])


def save_heads(
    members: Sequence[nn.Module], path: str | Path, thresholds: dict[str, float] | None = None
) -> None:
    """Write an ensemble (k >= 1 members of one kind and config) in the checkpoint format."""
    if not members:
        raise HeadCheckpointError("an ensemble needs at least one member")
    kinds = {head_kind(m) for m in members}
    configs = {repr(head_config(m)) for m in members}
    if len(kinds) != 1 or len(configs) != 1:
        raise HeadCheckpointError("ensemble members must share one kind and one config")
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "kind": head_kind(members[0]),
            "config": head_config(members[0]),
            "members": [m.state_dict() for m in members],
            "thresholds": {k: float(v) for k, v in (thresholds or {}).items()},
        },
        Path(path),
    )


def load_heads(path: str | Path) -> HeadSet:
    """Read an ensemble written by :func:`save_heads`, every member loaded strictly."""
    path = Path(path)
    if not path.is_file():
        raise HeadCheckpointError(f"{path}: no such head checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt / unsafe files
        raise HeadCheckpointError(f"{path}: not a readable torch checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise HeadCheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    if checkpoint.get("format_version") != CHECKPOINT_VERSION:
        raise HeadCheckpointError(
            f"{path}: format_version {checkpoint.get('format_version')!r} is not supported "
            f"(expected {CHECKPOINT_VERSION})"
        )
    members = checkpoint.get("members")
    if not isinstance(members, list) or not members:
        raise HeadCheckpointError(f"{path}: 'members' must be a non-empty list of state dicts")
    models = []
    for index, state in enumerate(members):
        model = build_head(checkpoint.get("kind"), checkpoint.get("config"))
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise HeadCheckpointError(
                f"{path}: member {index} does not match its config: missing {missing}, "
                f"unexpected {unexpected}, wrong shapes {wrong}"
            )
        model.load_state_dict(state, strict=True)
        models.append(model.eval())
    thresholds = checkpoint.get("thresholds") or {}
    if not isinstance(thresholds, dict) or not all(
        isinstance(v, float | int) for v in thresholds.values()
    ):
        raise HeadCheckpointError(f"{path}: 'thresholds' must map names to numbers")
    head_set = HeadSet(checkpoint["kind"], models, {k: float(v) for k, v in thresholds.items()})
    stray = sorted(set(head_set.thresholds) - set(head_set.outputs) - {"malignancy"})
    if stray:
        raise HeadCheckpointError(f"{path}: thresholds for unknown outputs {stray}")
    return head_set


def output_names(kind: HeadKind) -> tuple[str, ...]:
    """ONNX output names, in the order the module returns them (docs/DESIGN.md)."""
    if kind == "gated_attention_mil":
        return ("probabilities", "attention")
    if kind == "patient_probe":
        return ("probabilities",)
    return ("probabilities", "hemoglobin", "attention")
