"""kdistill.data.io: the one JSON / JSON Lines / hub reader, and the entry point nothing imports cli for."""

import re
from pathlib import Path

import pytest

from kdistill.data.io import DataValidationError, iter_json_lines, read_json, read_json_rows, read_rows
from kdistill.errors import MissingFileError

SRC = Path(__file__).resolve().parents[1] / "src" / "kdistill"


def test_json_lines_array_and_one_object_are_located_by_line(tmp_path):
    lines = tmp_path / "a.jsonl"
    lines.write_text('{"x": 1}\n\n{"x": 2}\n')
    assert read_json_rows(lines) == ([(f"{lines}:1", {"x": 1}), (f"{lines}:3", {"x": 2})], [])
    array = tmp_path / "b.json"
    array.write_text('[\n  {"x": 1},\n  {"x": 2}\n]\n')
    assert read_json_rows(array) == ([(f"{array}:2", {"x": 1}), (f"{array}:3", {"x": 2})], [])
    one = tmp_path / "c.json"
    one.write_text('\n{\n  "x": 1\n}\n')
    assert read_json_rows(one) == ([(f"{one}:2", {"x": 1})], [])


def test_problems_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1}\n{"x": \n[1]\n')
    rows, errors = read_json_rows(bad)
    assert rows == [(f"{bad}:1", {"x": 1}), (f"{bad}:3", [1])]
    assert errors == [f"{bad}:2: malformed JSON: Expecting value (column 7)"]
    with pytest.raises(DataValidationError) as info:
        read_rows(bad)
    assert info.value.errors == [f"{bad}:2: malformed JSON: Expecting value (column 7)",
                                 f"{bad}:3: row is not a JSON object"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert read_json_rows(empty) == ([], [f"{empty}:1: file contains no rows (it is empty)"])
    cut = tmp_path / "cut.json"
    cut.write_text('[\n"a",\n"b')
    with pytest.raises(DataValidationError, match=re.escape(f"{cut}:3: malformed JSON")):
        read_json(cut)
    with pytest.raises(MissingFileError, match="data file not found"):
        read_rows(tmp_path / "missing.jsonl")


def test_iter_json_lines_is_lazy_and_reports_each_line():
    got = list(iter_json_lines(['{"a": 1}', "", "nope"], "f"))
    assert got[0] == ("f:1", {"a": 1}, None)
    assert got[1][0] == "f:3" and got[1][1] is None and got[1][2].msg == "Expecting value"


def test_read_rows_limit(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(f'{{"i": {i}}}\n' for i in range(5)))
    assert [row["i"] for _, row in read_rows(path, limit=2)] == [0, 1]


def test_nothing_imports_the_cli_and_kdistill_imports_sit_at_the_top():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "cli.py" and path.parent == SRC:
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"^[ \t]*(from kdistill\.cli import|from kdistill import cli\b|import kdistill\.cli)", text, re.M):
            offenders.append(str(path.relative_to(SRC)))
    assert offenders == []
    for package in ("jobs", "annotate", "generators"):
        for path in (SRC / package).glob("*.py"):
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"^[ \t]+(from kdistill\b|from \.|import kdistill\b)", text, re.M), path
