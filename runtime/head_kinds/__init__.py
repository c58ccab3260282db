"""Kinds of heads, found from the classes themselves (``HeadKind`` subclasses).

Every module of this package is imported once when a kind is first asked for,
so a new kind is one new file: gated_attention_mil.py, transformer_mil.py (case
heads), cell_classifier.py (the cell head), ...
"""

from __future__ import annotations

import functools

from runtime.head_kinds.base import (
    CALLS,
    INDETERMINATE,
    NEGATIVE,
    POSITIVE,
    CaseHeadKind,
    CellCalls,
    CellHeadKind,
    Finding,
    HeadKind,
    Interpretation,
    Labels,
    Prediction,
    Truth,
    call,
    combine_calls,
)
from runtime.plugins import import_modules
from runtime.typed_json import SpecError

__all__ = [
    "CALLS",
    "INDETERMINATE",
    "NEGATIVE",
    "POSITIVE",
    "CaseHeadKind",
    "CellCalls",
    "CellHeadKind",
    "Finding",
    "HeadKind",
    "Interpretation",
    "Labels",
    "Prediction",
    "Truth",
    "call",
    "combine_calls",
    "head_kind",
    "head_kind_names",
]


@functools.cache
def _import_kind_modules() -> None:
    import_modules(__name__)


def head_kind_names() -> tuple[str, ...]:
    _import_kind_modules()
    return tuple(sorted(HeadKind.registered))


def head_kind(name: str) -> HeadKind:
    """The kind registered under ``name``; SpecError naming the known ones otherwise."""
    _import_kind_modules()
    cls = HeadKind.registered.get(name)
    if cls is None:
        raise SpecError(f"unknown head kind {name!r}; one of {', '.join(head_kind_names())}")
    return cls()
