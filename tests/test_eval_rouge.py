"""`kdistill eval rouge`: ROUGE of `kdistill generate` answers, checked against the rouge-score package's own scorer
and by hand, with the rows it leaves out counted and a bad file refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kdistill.cli import main
from kdistill.errors import UserError
from kdistill.evaluation.rouge import answers_dataset, rouge_report, rouge_scores

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")


def _record(i: int, reference, answer, status: str = "ok", source: str = "data/heldout.jsonl") -> dict:
    record = {"key": f"k{i}", "status": status, "instruction": f"Question {i}?", "input": "",
              "reference_output": reference, "model": "m", "params": {}, "source": f"{source}:{i + 1}"}
    if status == "ok":
        record["generate_output"] = answer
    return record


def _answers(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


PAIRS = [("The cat sat on the mat.", "A cat was sitting on a mat."),
         ("Paris is the capital of France.", "The capital of France is Paris."),
         ("Water boils at 100 degrees Celsius at sea level.", "At sea level, water boils at one hundred degrees."),
         ("Running improves cardiovascular health.", "Runners have healthier hearts."),
         ("Photosynthesis converts light into chemical energy.", "")]


def test_matches_the_rouge_score_scorer_and_counts_what_is_left_out(tmp_path):
    records = [_record(i, ref, ans) for i, (ref, ans) in enumerate(PAIRS)]
    records.insert(1, {**_record(2, PAIRS[2][0], None, status="failed")})  # retried later: the last record counts
    records += [_record(7, "", "an answer to nothing"), _record(8, None, "no reference key"),
                _record(9, "Some reference.", None, status="failed"), '{"key": "k10", "status": "ok", "gener']
    path = _answers(tmp_path / "answers.jsonl", records)
    result = rouge_scores(path)

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = {m: 100 * sum(scorer.score(ref, ans)[m].fmeasure for ref, ans in PAIRS) / len(PAIRS)
                for m in ("rouge1", "rouge2", "rougeL")}
    for metric, value in expected.items():
        assert result[metric] == pytest.approx(value, rel=1e-12), metric
    assert 0 < result["rouge2"] < result["rougeL"] <= result["rouge1"] < 100
    assert (result["answers"], result["empty_answers"], result["no_reference"], result["not_ok"]) == (5, 1, 2, 1)


def test_hand_checked_values(tmp_path):
    same = _answers(tmp_path / "same.jsonl", [_record(0, "The quick brown fox.", "The quick brown fox."),
                                              _record(1, "Jumps over the lazy dog", "jumps over the lazy dog!")])
    assert {m: rouge_scores(same)[m] for m in ("rouge1", "rouge2", "rougeL")} == \
        {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    # reference 6 tokens, answer its first 3: unigrams P 1, R 1/2 -> F 2/3; bigrams 2 of 5 -> P 1, R 2/5 -> F 4/7;
    # longest common subsequence 3 -> as unigrams
    part = _answers(tmp_path / "part.jsonl", [_record(0, "the cat sat on the mat", "the cat sat")])
    result = rouge_scores(part)
    assert result["rouge1"] == pytest.approx(200 / 3) and result["rougeL"] == pytest.approx(200 / 3)
    assert result["rouge2"] == pytest.approx(400 / 7)
    empty = _answers(tmp_path / "empty.jsonl", [_record(0, "the cat sat", "")])
    assert rouge_scores(empty)["rouge1"] == 0.0 and rouge_scores(empty)["empty_answers"] == 1


def test_cli_groups_files_by_data_set(tmp_path, capsys):
    teacher = _answers(tmp_path / "teacher.jsonl", [_record(i, ref, ref) for i, (ref, _) in enumerate(PAIRS)])
    student = _answers(tmp_path / "student.jsonl", [_record(i, ref, ans) for i, (ref, ans) in enumerate(PAIRS)])
    other = _answers(tmp_path / "other.jsonl", [_record(0, "One two three.", "one two", source="sets/facts.json")])
    out = tmp_path / "out" / "rouge.json"
    assert main(["eval", "rouge", "--answers", f"teacher={teacher}", "--answers", f"small={student}",
                 "--answers", str(other), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "rouge" and list(report["datasets"]) == ["heldout", "facts"]
    models = report["datasets"]["heldout"]["models"]
    assert list(models) == ["teacher", "small"] and models["teacher"]["rouge1"] == 100.0
    assert models["small"] == rouge_scores(student)
    assert set(models["small"]) == {"rouge1", "rouge2", "rougeL", "answers", "empty_answers", "no_reference",
                                    "not_ok"}
    assert list(report["datasets"]["facts"]["models"]) == ["other"]
    printed = capsys.readouterr().out
    assert "| small |" in printed and "facts:" in printed

    assert main(["eval", "rouge", "--answers", str(teacher), "--answers", str(other), "--dataset", "mix",
                 "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())["datasets"]["mix"]["models"]) == ["teacher", "other"]
    assert answers_dataset(other) == "facts"
    assert rouge_report({"a": str(other)}, "x") == {"kind": "rouge", "datasets": {"x": {"models": {
        "a": rouge_scores(other)}}}}


@pytest.mark.parametrize("lines,expected", [
    (['{"instruction": "Name a colour.", "input": "", "output": "Blue."}'], "bad.jsonl:1: not a kdistill generate"),
    ([json.dumps(_record(0, "a", "b")), json.dumps({**_record(1, "a", "b"), "generate_output": 5})],
     "bad.jsonl:2: generate_output is int, not text"),
    (["not json at all"], "bad.jsonl: no kdistill generate records"),
    ([json.dumps(_record(0, "", "b"))], "bad.jsonl: no answer to score: 1 row(s) without a reference_output"),
])
def test_a_bad_file_is_one_line_with_the_place(tmp_path, capsys, lines, expected):
    bad = _answers(tmp_path / "bad.jsonl", lines)
    out = tmp_path / "rouge.json"
    code = main(["eval", "rouge", "--answers", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert expected in errors[0]
    assert not out.exists()


def test_missing_file_and_missing_package(tmp_path, monkeypatch, capsys):
    assert main(["eval", "rouge", "--answers", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r.json")]) == 2
    assert "answers file not found" in capsys.readouterr().err
    path = _answers(tmp_path / "a.jsonl", [_record(0, "a b", "a b")])
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # what an environment without the package sees
    with pytest.raises(UserError, match=r"pip install 'kdistill\[eval\]'"):
        rouge_scores(path)
