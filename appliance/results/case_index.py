"""The site's case index: every scored case's patient embedding, for similar earlier cases.

It lives in the data directory, never leaves the site, and is derived data: the
result folders hold each case's embedding (``patient_embedding.npy``) and what was
confirmed at sign-off, and the index is rebuilt from them when it is missing or does
not add up. One index per patient encoder (its fp32 file's sha256): embeddings of
two networks are not comparable.

Layout, ``<data_dir>/case-index/<encoder sha256[:16]>/``: ``vectors.f32`` (unit-length
float32 rows, appended) and ``rows.jsonl`` (one line per row: case, version, version
folder, decision, diagnosis and confirmed findings). A case scored or signed off again
appends a row; its latest row is the one that counts. A row is appended after its
vector, so a crash between the two leaves more vectors than rows, which a reader
sees and answers by rebuilding.

A query is one matrix product of the unit rows with the case's unit embedding (the
cosine of every row) over the signed-off cases, then the k largest: measured at
100,000 cases of 768 and 128 dimensions in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.results.folder import PATIENT_EMBEDDING_FILE as EMBEDDING_FILE
from appliance.results.folder import latest_in
from appliance.results.schema import RESULT_FILE, SimilarCase
from runtime.files import group_readable

INDEX_DIR = "case-index"
VECTORS = "vectors.f32"
ROWS = "rows.jsonl"
DEFAULT_K = 5
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexRow:
    """One version of a case as the index knows it: where it is and what was confirmed."""

    case_id: str
    version: int
    folder: str  # the version folder
    decision: str = ""  # empty: not signed off
    diagnosis: str = ""
    fish: tuple[str, ...] = ()
    karyotype: str = ""
    mutations: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "version": self.version,
            "folder": self.folder,
            "decision": self.decision,
            "diagnosis": self.diagnosis,
            "fish": list(self.fish),
            "karyotype": self.karyotype,
            "mutations": list(self.mutations),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> IndexRow:
        return cls(
            case_id=str(raw["case_id"]),
            version=int(raw["version"]),
            folder=str(raw["folder"]),
            decision=str(raw.get("decision", "")),
            diagnosis=str(raw.get("diagnosis", "")),
            fish=tuple(str(v) for v in raw.get("fish", ())),
            karyotype=str(raw.get("karyotype", "")),
            mutations=tuple(str(v) for v in raw.get("mutations", ())),
        )


def row_of(folder: Path) -> tuple[IndexRow, str] | None:
    """The index row of a version folder and its patient encoder's sha256, read from the
    raw result.json (None: no result, or no patient embedding). The confirmed findings
    (``review.confirmed``: diagnosis, fish, karyotype, mutations) are read tolerantly:
    absent in results signed before they could be entered, any key may be empty."""
    try:
        raw = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
        record = raw.get("patient_embedding")
        if not isinstance(record, dict) or not (folder / EMBEDDING_FILE).is_file():
            return None
        review = raw.get("review") or {}
        confirmed = review.get("confirmed") or {}
        row = IndexRow(
            case_id=str(raw["case_id"]),
            version=int(raw["version"]),
            folder=str(folder),
            decision=str(review.get("decision", "")),
            diagnosis=str(confirmed.get("diagnosis") or ""),
            fish=tuple(str(v) for v in confirmed.get("fish") or ()),
            karyotype=str(confirmed.get("karyotype") or ""),
            mutations=tuple(str(v) for v in confirmed.get("mutations") or ()),
        )
        return row, str(record["encoder_sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def read_embedding(folder: Path) -> np.ndarray:
    return np.load(folder / EMBEDDING_FILE).astype(np.float32).reshape(-1)


@dataclass
class CaseIndex:
    """The index of one patient encoder; ``open`` reads it or rebuilds it."""

    directory: Path
    outbox: Path
    encoder_sha256: str
    dim: int
    rows: list[IndexRow] = field(default_factory=list)
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    _signed: np.ndarray | None = None  # each signed-off case's latest row, kept between queries
    _rows_bytes: int = -1  # how much of the rows file is read (-1: none yet)
    _buffer: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    @classmethod
    def open(cls, data_dir: Path, outbox: Path, encoder_sha256: str, dim: int) -> CaseIndex:
        directory = Path(data_dir) / INDEX_DIR / encoder_sha256[:16]
        index = cls(directory, Path(outbox), encoder_sha256, dim)
        index.sync()
        return index

    def sync(self) -> None:
        """Take in what other processes appended (a sign-off in the window while the
        service holds the index); read it all again, or rebuild it, when it does not
        add up."""
        try:
            size = (self.directory / ROWS).stat().st_size
        except OSError:
            size = -1
        if size >= 0 and size == self._rows_bytes:
            return
        if size > self._rows_bytes >= 0 and self._read_from(self._rows_bytes):
            return
        if size >= 0 and self._read_from(0):
            return
        self.rebuild()

    def _read_from(self, offset: int) -> bool:
        """Rows (and their vectors) from byte ``offset`` of the rows file on; False when
        the files are missing or do not add up."""
        if offset == 0:
            self.rows, self.vectors = [], np.zeros((0, self.dim), np.float32)
        try:
            with open(self.directory / ROWS, "rb") as source:
                source.seek(offset)
                text = source.read()
            complete = text[: text.rfind(b"\n") + 1]  # a line being written is left for later
            new = [IndexRow.from_json(json.loads(line)) for line in complete.splitlines() if line]
            vectors = np.fromfile(
                self.directory / VECTORS,
                dtype=np.float32,
                offset=len(self.rows) * self.dim * 4,
                count=len(new) * self.dim,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if vectors.size != len(new) * self.dim:
            log.warning("case index %s does not add up", self.directory)
            return False
        self.rows = [*self.rows, *new]
        self._extend(vectors.reshape(len(new), self.dim))
        self._rows_bytes = offset + len(complete)
        self._signed = None
        return True

    def _extend(self, new: np.ndarray) -> None:
        """Rows after ``vectors``: into spare room, or a buffer a quarter larger (a case a
        time must not copy the whole matrix; a first read takes the array as read)."""
        count = len(self.vectors)
        if not count:
            self._buffer = new
        elif count + len(new) > len(self._buffer):
            rows = max(count + len(new), len(self._buffer) * 5 // 4 + 64)
            grown = np.empty((rows, self.dim), np.float32)
            grown[:count] = self.vectors
            grown[count : count + len(new)] = new
            self._buffer = grown
        else:
            self._buffer[count : count + len(new)] = new
        self.vectors = self._buffer[: count + len(new)]

    def rebuild(self) -> int:
        """Every case's latest version with this encoder's embedding, from the result
        folders; written under a temporary name and renamed into place."""
        rows, vectors = [], []
        for folder in _latest_versions(self.outbox):
            found = row_of(folder)
            if found is None or found[1] != self.encoder_sha256:
                continue
            vector = read_embedding(folder)
            if vector.shape != (self.dim,):
                continue
            rows.append(found[0])
            vectors.append(vector)
        self.rows, self._signed = rows, None
        self.vectors = (
            np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, self.dim), np.float32)
        )
        self._buffer = self.vectors
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{self.directory.name}.", dir=self.directory.parent)
        )
        try:
            group_readable(staging)  # mkdtemp's 0700: the technicians' group reads the data dir
            self.vectors.tofile(staging / VECTORS)
            text = "".join(json.dumps(r.to_json()) + "\n" for r in rows)
            (staging / ROWS).write_text(text, encoding="utf-8")
            if self.directory.exists():
                shutil.rmtree(self.directory)
            os.replace(staging, self.directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._rows_bytes = len(text.encode("utf-8"))
        log.info("case index %s rebuilt: %d cases", self.directory, len(rows))
        return len(rows)

    def add(self, folder: Path) -> bool:
        """Append the version in ``folder`` (a scored or signed-off version); False when
        it has no embedding of this encoder. Appenders take turns (an flock on the
        index's folder), so rows and vectors stay in one order."""
        found = row_of(folder)
        if found is None or found[1] != self.encoder_sha256:
            return False
        vector = read_embedding(folder)
        if vector.shape != (self.dim,):
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            self.sync()
            if (self.directory / VECTORS).stat().st_size != self.vectors.nbytes:
                self.rebuild()  # a vector without its row (a crash between the two)
            with open(self.directory / VECTORS, "ab") as out:
                out.write(vector.astype(np.float32).tobytes())
            with open(self.directory / ROWS, "a", encoding="utf-8") as out:
                out.write(json.dumps(found[0].to_json()) + "\n")
            self.sync()
        finally:
            os.close(descriptor)
        return True

    def similar(
        self, embedding: np.ndarray, *, exclude_case: str, k: int = DEFAULT_K
    ) -> tuple[SimilarCase, ...]:
        """The ``k`` signed-off cases nearest by cosine (other cases than ``exclude_case``),
        most similar first."""
        self.sync()
        if self._signed is None:
            self._signed = np.array(
                [i for i in latest_rows(self.rows) if self.rows[i].decision], dtype=np.int64
            )
        if not len(self._signed) or k <= 0:
            return ()
        # A case has one latest row: one more than k leaves k once it is left out.
        query = np.asarray(embedding, np.float32).reshape(-1)
        scores = nearest(self.vectors, self._signed, query, k + 1)
        found = [(i, s) for i, s in scores if self.rows[i].case_id != exclude_case]
        return tuple(_similar(self.rows[i], s) for i, s in found[:k])


def latest_rows(rows: list[IndexRow]) -> list[int]:
    """Indices of each case's latest row (the highest version; the last for equal ones)."""
    best: dict[str, int] = {}
    for index, row in enumerate(rows):
        held = best.get(row.case_id)
        if held is None or row.version >= rows[held].version:
            best[row.case_id] = index
    return sorted(best.values())


def nearest(
    vectors: np.ndarray, candidates: np.ndarray, query: np.ndarray, k: int
) -> list[tuple[int, float]]:
    """(row, cosine) of the ``k`` candidate rows most similar to ``query``, best first.
    Rows are unit length, so the cosine is the dot product: one product over every row,
    cheaper than gathering the candidates' rows first."""
    norm = float(np.linalg.norm(query))
    query = query / norm if norm > 0 else query
    scores = (vectors @ query)[candidates]
    k = min(k, len(candidates))
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return [(int(candidates[i]), float(scores[i])) for i in top]


def _similar(row: IndexRow, similarity: float) -> SimilarCase:
    return SimilarCase(
        case_id=row.case_id,
        version=row.version,
        similarity=round(similarity, 4),
        decision=row.decision,
        diagnosis=row.diagnosis,
        fish=row.fish,
        karyotype=row.karyotype,
        mutations=row.mutations,
    )


def _latest_versions(outbox: Path) -> Iterator[Path]:
    if not outbox.is_dir():
        return
    for case_dir in sorted(outbox.iterdir()):
        if case_dir.is_dir():
            latest = latest_in(case_dir)
            if latest is not None:
                yield latest.path


def add_to_case_index(folder: Path, data_dir: Path) -> bool:
    """A new version (a sign-off) joins the index of the patient encoder that embedded
    its case, opened (or rebuilt) from the outbox the folder lies in. False when it has
    no patient embedding; an index that cannot be written is logged, never raised: the
    version stands and a later rebuild takes it in."""
    found = row_of(folder)
    if found is None:
        return False
    try:
        dim = len(read_embedding(folder))
        return CaseIndex.open(data_dir, folder.parent.parent, found[1], dim).add(folder)
    except OSError as exc:
        log.error("case index: %s not added: %s", folder, exc)
        return False
