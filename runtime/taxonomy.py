"""What kinds of cells a cell head tells apart: its classes, their lineage tree, the
confusions that are dangerous, and the groups a bundle restricts a bag to.

A taxonomy is one JSON file (docs/cells.md has the format). Three ship with
cytoedge, by name: ``pb-wbc`` (the 8 peripheral-blood classes of the PBC dataset),
``rbc-morphology`` (the 13 red-cell classes of Chula RBC-12) and ``marrow-mll``
(the 21 bone-marrow classes of the MLL dataset that CytoDINO uses, plasma cells
among them). A site may write its own and pass its path instead of a name.

The lineage of a class is its path from the root of the tree, e.g. ("myeloid",
"granulocytic", "mature"): the cell head's training smooths a label toward the
classes that share its whole path (its siblings), and a confusion between
siblings is a lesser error than one across lineages. A critical confusion (a
blast called a lymphocyte) carries a penalty the training loss adds and that
validation counts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from runtime.typed_json import SpecError, parse_section

SHIPPED = Path(__file__).resolve().parent / "taxonomies"
# Groups a bundle and the appliance know by name: the white cells a blood head reads,
# and the plasma cells a myeloma head reads and whose share is the inclusion rule's.
WHITE_CELLS = "white_cells"
PLASMA_CELLS = "plasma_cells"


class TaxonomyError(SpecError):
    """A taxonomy that cannot be used; one line naming the file and the key."""


@dataclass(frozen=True)
class CellClass:
    name: str  # the key (labels, folders, tables use it)
    label: str  # what a person reads
    lineage: tuple[str, ...]  # path from the root of the tree
    colour: tuple[int, int, int]  # RGB, as QuPath colours the class


@dataclass(frozen=True)
class CriticalConfusion:
    """``true`` called any of ``predicted`` is a dangerous error (weighted ``penalty``)."""

    true: str
    predicted: tuple[str, ...]
    penalty: float
    why: str


@dataclass(frozen=True)
class Taxonomy:
    name: str
    title: str
    classes: tuple[CellClass, ...]
    critical: tuple[CriticalConfusion, ...] = ()
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""  # where the classes come from

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def cell_class(self, name: str) -> CellClass:
        return self.classes[self.index(name)]

    def siblings(self, name: str) -> tuple[str, ...]:
        """The other classes with the same lineage path."""
        lineage = self.cell_class(name).lineage
        return tuple(c.name for c in self.classes if c.lineage == lineage and c.name != name)

    def group(self, group: str) -> tuple[str, ...]:
        """The classes of a named group (none when the taxonomy has no such group)."""
        return self.groups.get(group, ())

    def is_critical(self, true: str, predicted: str) -> bool:
        return any(true == c.true and predicted in c.predicted for c in self.critical)

    def restricted(self, names: Sequence[str]) -> Taxonomy:
        """This taxonomy over ``names`` only, in that order (a cell head's output order):
        the confusions and groups among them, those that lose all their classes dropped."""
        kept = set(names)
        critical = tuple(
            replace(c, predicted=tuple(p for p in c.predicted if p in kept))
            for c in self.critical
            if c.true in kept and kept & set(c.predicted)
        )
        groups = {g: tuple(m for m in members if m in kept) for g, members in self.groups.items()}
        return replace(
            self,
            classes=tuple(self.cell_class(name) for name in names),
            critical=critical,
            groups={g: members for g, members in groups.items() if members},
        )

    def validate(self, where: str) -> None:
        names = self.names
        if len(names) < 2:
            raise TaxonomyError(f"{where}.classes: a taxonomy needs at least two classes")
        repeated = sorted({n for i, n in enumerate(names) if n in names[:i]})
        if repeated:
            raise TaxonomyError(f"{where}.classes: {repeated} appear more than once")
        for index, cell_class in enumerate(self.classes):
            at = f"{where}.classes[{index}]"
            if not cell_class.name or "/" in cell_class.name or cell_class.name.startswith("."):
                raise TaxonomyError(f"{at}.name {cell_class.name!r} cannot name a folder")
            if not cell_class.lineage:
                raise TaxonomyError(f"{at}.lineage must name at least the root")
            if not all(0 <= value <= 255 for value in cell_class.colour):
                raise TaxonomyError(f"{at}.colour must be RGB in 0..255")
        for index, confusion in enumerate(self.critical):
            at = f"{where}.critical[{index}]"
            unknown = sorted({confusion.true, *confusion.predicted} - set(names))
            if unknown:
                raise TaxonomyError(f"{at}: {unknown} are not classes of this taxonomy")
            if confusion.penalty <= 0:
                raise TaxonomyError(f"{at}.penalty must be positive")
        for group, members in self.groups.items():
            unknown = sorted(set(members) - set(names))
            if unknown:
                raise TaxonomyError(f"{where}.groups.{group}: {unknown} are not classes")


def shipped_taxonomies() -> tuple[str, ...]:
    return tuple(sorted(path.stem for path in SHIPPED.glob("*.json")))


def load_taxonomy(name_or_path: str | Path) -> Taxonomy:
    """A shipped taxonomy by name, or a taxonomy file; TaxonomyError naming the file."""
    path = Path(name_or_path)
    if not path.suffix and (SHIPPED / f"{path.name}.json").is_file():
        path = SHIPPED / f"{path.name}.json"
    if not path.is_file():
        raise TaxonomyError(
            f"{name_or_path}: no such taxonomy file or shipped taxonomy "
            f"({', '.join(shipped_taxonomies())})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TaxonomyError(f"{path}: not a readable JSON file ({exc})") from None
    try:
        return parse_section(Taxonomy, data, "taxonomy")
    except SpecError as exc:
        raise TaxonomyError(f"{path}: {exc}") from None
