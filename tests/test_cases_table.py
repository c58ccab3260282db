"""The labelled cases table: what it accepts, and one line naming row and column for what
it does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.validation.cases_table import CasesTableError, read_cases_table

HEADER = "case_id,scans,del(17p),t(4;14),t(11;14),gain(1q),diagnosis,hb,notes"


def _table(tmp_path: Path, *rows: str, header: str = HEADER) -> Path:
    for name in ("a.tif", "b.tif", "c.tif"):
        (tmp_path / name).write_bytes(b"x")
    case = tmp_path / "case-3"
    case.mkdir(exist_ok=True)
    (case / "s1.svs").write_bytes(b"x")
    (case / "s2.ndpi").write_bytes(b"x")
    cells = tmp_path / "P0001"
    cells.mkdir(exist_ok=True)
    (cells / "manifest.json").write_text('{"cells": []}')
    path = tmp_path / "cases.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_a_table_of_both_workloads_reads_with_its_labels_and_scans(tmp_path: Path) -> None:
    path = _table(
        tmp_path,
        "MM-1,a.tif;b.tif,1,0,,1,,,first smear thick",
        "MM-2,c.tif,0,0,1,0,,,",
        "MM-3,case-3,,1,,,,,",
        "PB-1,P0001,,,,,mds,9.5,",
        '"PB-2",P0001,,,,,healthy,,"notes, with a comma"',
    )
    table = read_cases_table(path)
    assert len(table) == 5 and len(table.sha256) == 64
    first, _, third, pb, _ = table.cases
    assert first.scans == (tmp_path / "a.tif", tmp_path / "b.tif")
    assert first.labels == {"del(17p)": True, "t(4;14)": False, "gain(1q)": True}
    assert sorted(p.name for p in third.scans) == ["s1.svs", "s2.ndpi"]  # a case folder
    assert third.labels == {"t(4;14)": True}
    assert pb.scans == (tmp_path / "P0001",)  # a cell folder is one scan
    assert pb.labels == {"diagnosis": "MDS", "hb": 9.5}
    assert table.columns == ("del(17p)", "t(4;14)", "t(11;14)", "gain(1q)", "diagnosis", "hb")


def test_a_spreadsheets_byte_order_mark_and_blank_lines_are_fine(tmp_path: Path) -> None:
    path = _table(tmp_path, "MM-1,a.tif,1,0,0,0,,,", "", header="\ufeff" + HEADER)
    assert [c.case_id for c in read_cases_table(path).cases] == ["MM-1"]


BAD = [
    ("MM-1,a.tif,yes,0,0,0,,,", "row 2, column del(17p): 'yes' is not 1, 0 or empty"),
    ("MM-1,missing.tif,1,0,0,0,,,", "row 2, column scans: missing.tif does not exist"),
    ("MM-1,,1,0,0,0,,,", "row 2, column scans: empty"),
    (",a.tif,1,0,0,0,,,", "row 2, column case_id: empty"),
    ("PB-1,P0001,,,,,leukaemia,,", "row 2, column diagnosis: 'leukaemia' is not one of"),
    ("PB-1,P0001,,,,,MDS,120,", "row 2, column hb: 120 g/dL is outside 1-25 g/dL"),
    ("PB-1,P0001,,,,,MDS,low,", "row 2, column hb: 'low' is not a number"),
    ("MM-1,a.tif,,,,,,,", "row 2: case 'MM-1' has no label"),
    ("MM-1,a.tif,1,0", "row 2: 4 fields where the header has 9"),
]


@pytest.mark.parametrize(("row", "message"), BAD)
def test_a_bad_row_is_one_line_naming_row_and_column(
    tmp_path: Path, row: str, message: str
) -> None:
    path = _table(tmp_path, "MM-0,a.tif,0,0,0,0,,,", row.replace("row 2", "row 3"))
    with pytest.raises(CasesTableError) as caught:
        read_cases_table(path)
    text = str(caught.value)
    assert "\n" not in text and text.startswith(str(path))
    assert message.replace("row 2", "row 3") in text


def test_a_repeated_case_names_the_first_row(tmp_path: Path) -> None:
    path = _table(tmp_path, "MM-1,a.tif,1,0,0,0,,,", "MM-1,b.tif,0,0,0,0,,,")
    with pytest.raises(CasesTableError, match="row 3, column case_id: 'MM-1' is already the case"):
        read_cases_table(path)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("case_id,del(17p)", "row 1: no column 'scans'"),
        ("case_id,scans,del17p", "row 1, column 'del17p': unknown"),
        ("case_id,scans,notes", "row 1: no label column"),
        ("case_id,scans,hb,hb", "row 1: column 'hb' appears twice"),
    ],
)
def test_a_bad_header_is_one_line(tmp_path: Path, header: str, message: str) -> None:
    path = _table(tmp_path, "MM-1,a.tif,1", header=header)
    with pytest.raises(CasesTableError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_cases_table(path)


def test_unreadable_and_empty_tables(tmp_path: Path) -> None:
    with pytest.raises(CasesTableError, match="no such file"):
        read_cases_table(tmp_path / "none.csv")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("case_id,scans,hb\nK\xf6ln,a.tif,9\n".encode("latin-1"))
    with pytest.raises(CasesTableError, match="not UTF-8 text; save it as CSV UTF-8"):
        read_cases_table(latin)
    with pytest.raises(CasesTableError, match="no cases below the header"):
        read_cases_table(_table(tmp_path))
    hashed = _table(tmp_path, "MM-1,a.tif,1,0,0,0,,,,north", header=HEADER + ",#site")
    assert read_cases_table(hashed).cases[0].case_id == "MM-1"  # '#' columns are notes
