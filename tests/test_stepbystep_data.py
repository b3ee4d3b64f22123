"""Distilling step-by-step data (e-SNLI, ANLI, CQA, SVAMP, generic) and label accuracy (offline, CPU)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from kdistill.data.records import DataValidationError
from kdistill.data.stepbystep import (
    DATASETS,
    RationaleExample,
    build_views,
    format_cqa_input,
    load_stepbystep,
)
from kdistill.evaluation.accuracy import answers_match, eval_equation, label_accuracy, normalize_answer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ESNLI_VALID = DATA / "dsbs_esnli" / "esnli_valid.jsonl"
CQA_TRAIN = DATA / "dsbs_cqa" / "cqa_train.jsonl"
CQA_TEST = DATA / "dsbs_cqa" / "cqa_test.jsonl"
SVAMP_TRAIN = DATA / "dsbs_svamp" / "svamp_train.jsonl"
SVAMP_TEST = DATA / "dsbs_svamp" / "svamp_test.jsonl"
SVAMP_ORIGINAL = DATA / "dsbs_svamp" / "SVAMP_original.jsonl"

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder not found at {DATA}")


def write_rows(tmp_path: Path, name: str, rows: list) -> Path:
    """One JSON value per line; a str is written verbatim (for malformed lines)."""
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def raw_rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def esnli():
    return load_stepbystep(ESNLI_VALID, "esnli")


@pytest.fixture(scope="module")
def cqa_train():
    return load_stepbystep(CQA_TRAIN, "cqa")


@pytest.fixture(scope="module")
def cqa_test():
    return load_stepbystep(CQA_TEST, "cqa")


@pytest.fixture(scope="module")
def svamp_train():
    return load_stepbystep(SVAMP_TRAIN, "svamp")


@pytest.fixture(scope="module")
def svamp_test():
    return load_stepbystep(SVAMP_TEST, "svamp")


# ----------------------------------------------------------------------------------------------------
# Real files


@needs_data
def test_esnli_valid_loads(esnli):
    assert len(esnli) == 9842 and esnli.skipped == []
    first = esnli[0]
    assert first == RationaleExample(
        input="premise: Two women are embracing while holding to go packages.\n"
              "hypothesis: The sisters are hugging goodbye while holding to go packages after just eating lunch.",
        label="neutral", llm_label="neutral",
        llm_rationale="The to go packages are not necessarily from lunch.",
        source=f"{ESNLI_VALID}:1")
    assert [e.label for e in esnli[:3]] == ["neutral", "entailment", "contradiction"]
    counts = {name: sum(e.label == name for e in esnli) for name in ("entailment", "neutral", "contradiction")}
    assert counts == {"entailment": 3329, "neutral": 3235, "contradiction": 3278}
    assert sum(e.llm_label is None for e in esnli) == 4  # PaLM label " " (unparsable) -> missing
    assert all(e.llm_rationale is not None for e in esnli)


@needs_data
def test_esnli_original_separator():
    ex = load_stepbystep(ESNLI_VALID, "esnli", limit=2, nli_separator="</s>")
    assert len(ex) == 2
    assert ex[1].input == "Two women are embracing while holding to go packages.</s>Two woman are holding packages."
    assert ex[1].label == "entailment"
    with pytest.raises(ValueError, match="nli_separator"):
        load_stepbystep(CQA_TEST, "cqa", nli_separator="</s>")


@needs_data
def test_cqa_loads(cqa_train, cqa_test):
    assert len(cqa_train) == 9741 and len(cqa_test) == 1221
    assert cqa_train[0].input == (
        '"There are 10 apples on an apple tree.  Three fall off.  Now there are X apples."  '
        "What is this an example of?\nAnswer Choices:\n(a) park\n(b) coloring book\n(c) garden center\n"
        "(d) math problem\n(e) gravity")
    assert cqa_train[0].label == "math problem" and cqa_train[0].llm_label == "math problem"
    assert cqa_test[0].input == (
        "A beaver is know for building prowess, their supplies come from where?\nAnswer Choices:\n"
        "(a) british columbia\n(b) body of water\n(c) wooded area\n(d) pay debts\n(e) zoo")
    assert cqa_test[0].label == "wooded area"
    assert cqa_test[0].source == f"{CQA_TEST}:1" and cqa_test[-1].source == f"{CQA_TEST}:1221"
    # Every converted input is the original repo's format built from the raw row.
    for ex, raw in zip(cqa_test, raw_rows(CQA_TEST)):
        assert ex.input == format_cqa_input(raw["question"], raw["choices"])
        assert ex.label == raw["answer"]
    assert sum(e.llm_label is None for e in cqa_train) == 3
    assert sum(e.llm_label is None for e in cqa_test) == 0


@needs_data
def test_svamp_loads(svamp_train, svamp_test):
    assert len(svamp_train) == 800 and len(svamp_test) == 200
    first = svamp_train[0]
    assert first.input == ("Luke scored 84 points after playing 2 rounds of a trivia game. If he gained the same "
                           "number of points each round\nHow many points did he score per round?")
    assert first.label == "( 84.0 / 2.0 )" and first.llm_label == "(84 / 2)"
    assert svamp_test[1].label == "( 10.0 - ( 6.0 + 3.0 ) )"
    assert sum(e.llm_label is None for e in svamp_train) == 13
    assert sum(e.llm_rationale is None for e in svamp_train) == 11
    assert sum(e.llm_label is None for e in svamp_test) == 2


@needs_data
def test_svamp_gold_equations_evaluate(svamp_train, svamp_test):
    values = [eval_equation(e.label) for e in list(svamp_train) + list(svamp_test)]
    assert len(values) == 1000
    assert all(v is not None and math.isfinite(v) for v in values)
    assert eval_equation(svamp_train[0].label) == 42.0


@needs_data
def test_svamp_original_records(svamp_train, svamp_test):
    """SVAMP.json rows load with the original input format; the split files are exactly those inputs."""
    original = load_stepbystep(SVAMP_ORIGINAL, "svamp")
    assert len(original) == 1000
    assert all(e.llm_label is None and e.llm_rationale is None for e in original)
    by_input = {e.input: e.label for e in original}
    assert all(by_input.get(e.input) == e.label for e in list(svamp_train) + list(svamp_test))
    # The equations give SVAMP's answers, except one known inconsistent record of SVAMP itself.
    wrong = [r["ID"] for r in raw_rows(SVAMP_ORIGINAL)
             if not math.isclose(eval_equation(r["Equation"]), r["Answer"], rel_tol=1e-9, abs_tol=1e-9)]
    assert wrong == ["chal-680"]


# ----------------------------------------------------------------------------------------------------
# build_views


@needs_data
def test_views_gt_vs_llm_on_cqa_train(cqa_train, caplog):
    raw = raw_rows(CQA_TRAIN)
    differ = [i for i, r in enumerate(raw) if r["palm_label"] != r["answer"]]
    assert len(differ) == 2507  # includes the 3 rows whose PaLM label is missing

    gt = build_views(cqa_train, label_type="gt")
    assert len(gt) == 9741
    assert [v["completion"] for v in gt] == [r["answer"] for r in raw]

    with caplog.at_level(logging.WARNING, logger="kdistill.data.stepbystep"):
        llm = build_views(cqa_train, label_type="llm")
    assert len(llm) == 9741 - 3
    assert "dropped 3 of 9741" in caplog.text
    kept = [r for r in raw if r["palm_label"].strip()]
    assert [v["completion"] for v in llm] == [r["palm_label"] for r in kept]
    n_diff = sum(v["completion"] != r["answer"] for v, r in zip(llm, kept))
    assert n_diff == 2507 - 3
    # Same inputs, so the two views differ only in those completions.
    assert [v["prompt"] for v in llm] == [f"[label] {format_cqa_input(r['question'], r['choices'])}" for r in kept]

    i = differ[0]
    assert gt[i]["completion"] == raw[i]["answer"] != raw[i]["palm_label"]


@needs_data
def test_views_prefixes_and_standard(svamp_train):
    ex = svamp_train[0]
    (row,) = build_views([ex])
    assert row == {"prompt": "[label] " + ex.input, "completion": "( 84.0 / 2.0 )",
                   "rationale_prompt": "[rationale] " + ex.input,
                   "rationale_completion": ex.llm_rationale}
    (row,) = build_views([ex], label_type="llm", label_prefix="predict: ", rationale_prefix="explain: ",
                         prompt_suffix="\n")
    assert row["prompt"] == "predict: " + ex.input + "\n" and row["completion"] == "(84 / 2)"
    assert row["rationale_prompt"] == "explain: " + ex.input + "\n"
    (row,) = build_views([ex], model_type="standard")
    assert row == {"prompt": ex.input, "completion": "( 84.0 / 2.0 )"}
    (row,) = build_views([ex], label_type="llm", model_type="standard")
    assert row == {"prompt": ex.input, "completion": "(84 / 2)"}


@needs_data
def test_views_missing_rationale(svamp_train, caplog):
    with caplog.at_level(logging.WARNING, logger="kdistill.data.stepbystep"):
        views = build_views(svamp_train)
    assert len(views) == 800
    no_rationale = [v for v in views if "rationale_prompt" not in v]
    assert len(no_rationale) == 11
    assert all("rationale_completion" not in v and v["prompt"].startswith("[label] ") for v in no_rationale)
    assert "11 of 800" in caplog.text
    # standard: never a rationale view
    assert all(set(v) == {"prompt", "completion"} for v in build_views(svamp_train, model_type="standard"))


def test_views_drop_rules():
    a = RationaleExample("x", "gold-a", None, "why a", "f:1")
    b = RationaleExample("y", "gold-b", "llm-b", None, "f:2")
    assert build_views([a, b], label_type="llm") == [{"prompt": "[label] y", "completion": "llm-b"}]
    assert build_views([a, b]) == [
        {"prompt": "[label] x", "completion": "gold-a", "rationale_prompt": "[rationale] x",
         "rationale_completion": "why a"},
        {"prompt": "[label] y", "completion": "gold-b"}]
    with pytest.raises(ValueError, match=r"1 example\(s\) have no LLM label: f:1"):
        build_views([a, b], label_type="llm", on_missing_llm_label="raise")
    with pytest.raises(ValueError, match="none of the 1 examples"):
        build_views([a], label_type="llm")
    assert build_views([]) == []
    with pytest.raises(ValueError, match="label_type"):
        build_views([a], label_type="palm")
    with pytest.raises(ValueError, match="model_type"):
        build_views([a], model_type="multitask")
    with pytest.raises(TypeError):
        build_views([{"input": "x"}])


# ----------------------------------------------------------------------------------------------------
# Synthetic ANLI / generic files


def test_anli_synthetic(tmp_path):
    path = write_rows(tmp_path, "anli_r1.jsonl", [
        {"uid": "u1", "premise": "P one.", "hypothesis": "H one.", "label": 2, "reason": "human",
         "palm_rationale": "Because.", "palm_label": "contradiction"},
        {"uid": "u2", "premise": "P two.", "hypothesis": "H two.", "label": "neutral",
         "palm_rationale": "  ", "palm_label": ""},
        {"uid": "u3", "premise": "P three.", "hypothesis": "H three.", "label": 0},
    ])
    ex = load_stepbystep(path, "anli")
    assert ex == [
        RationaleExample("premise: P one.\nhypothesis: H one.", "contradiction", "contradiction", "Because.",
                         f"{path}:1"),
        RationaleExample("premise: P two.\nhypothesis: H two.", "neutral", None, None, f"{path}:2"),
        RationaleExample("premise: P three.\nhypothesis: H three.", "entailment", None, None, f"{path}:3"),
    ]
    assert [v["completion"] for v in build_views(ex, label_type="llm")] == ["contradiction"]


def test_generic_synthetic(tmp_path):
    path = write_rows(tmp_path, "generic.jsonl", [
        {"input": "2+2?", "label": "4", "rationale": "Two and two make four.", "llm_label": "4"},
        {"input": "Capital of France?", "label": "Paris", "rationale": None, "id": 7},
        {"input": "Colour of snow?", "label": "white", "llm_label": "grey", "palm_rationale": "ignored"},
    ])
    ex = load_stepbystep(path, "generic")
    assert [(e.input, e.label, e.llm_label, e.llm_rationale) for e in ex] == [
        ("2+2?", "4", "4", "Two and two make four."),
        ("Capital of France?", "Paris", None, None),
        ("Colour of snow?", "white", "grey", None)]
    views = build_views(ex, label_type="llm")
    assert views == [
        {"prompt": "[label] 2+2?", "completion": "4", "rationale_prompt": "[rationale] 2+2?",
         "rationale_completion": "Two and two make four."},
        {"prompt": "[label] Colour of snow?", "completion": "grey"}]
    # A JSON array file works too (the records.py reader), with array-element line numbers.
    array = tmp_path / "generic.json"
    array.write_text('[\n  {"input": "a", "label": "b"},\n  {"input": "c", "label": "d"}\n]\n')
    assert [e.source for e in load_stepbystep(array, "generic")] == [f"{array}:2", f"{array}:3"]


# ----------------------------------------------------------------------------------------------------
# Malformed rows: every problem as file:line, all rows checked first


NLI_OK = {"premise": "p", "hypothesis": "h", "label": 0}
CQA_OK = {"question": "q?", "choices": ["a", "b", "c", "d", "e"], "answer": "c"}

MALFORMED = [
    ("esnli", {"hypothesis": "h", "label": 0}, "missing required field 'premise' (format 'esnli')"),
    ("esnli", {**NLI_OK, "premise": 5}, "field 'premise' must be a string, found number"),
    ("esnli", {**NLI_OK, "hypothesis": "   "}, "field 'hypothesis' is empty or whitespace-only"),
    ("esnli", {**NLI_OK, "label": 3}, "field 'label' 3 is out of range (0 entailment, 1 neutral, 2 contradiction)"),
    ("esnli", {**NLI_OK, "label": -1}, "SNLI's -1 means no gold label"),
    ("anli", {**NLI_OK, "label": 1.0}, "field 'label' must be an integer (0 entailment, 1 neutral, 2 contradiction), found number"),
    ("anli", {**NLI_OK, "label": True}, "field 'label' must be an integer"),
    ("anli", {**NLI_OK, "label": "Neutral"}, "field 'label' 'Neutral' is not one of entailment, neutral, contradiction"),
    ("anli", {"premise": "p", "hypothesis": "h"}, "missing required field 'label' (format 'anli')"),
    ("esnli", {**NLI_OK, "palm_label": 1}, "field 'palm_label' must be a string, found number"),
    ("cqa", {**CQA_OK, "choices": ["a", "b", "c", "d"]}, "field 'choices' must hold exactly 5 choices, found 4"),
    ("cqa", {**CQA_OK, "choices": "a b c d e"}, "field 'choices' must be a list of 5 strings, found string"),
    ("cqa", {**CQA_OK, "choices": ["a", "b", 3, "d", "e"]}, "choices[2] must be a string, found number"),
    ("cqa", {**CQA_OK, "choices": ["a", "b", "c", " ", "e"], "answer": "a"}, "choices[3] is empty or whitespace-only"),
    ("cqa", {**CQA_OK, "answer": "z"}, "answer 'z' is not one of the choices"),
    ("cqa", {"choices": CQA_OK["choices"], "answer": "a"}, "missing required field 'question' (format 'cqa')"),
    ("cqa", {**CQA_OK, "palm_rationale": ["x"]}, "field 'palm_rationale' must be a string, found array"),
    ("svamp", {"input": "q", "label": "( 3 + x )"}, "field 'label' '( 3 + x )' is not an arithmetic expression"),
    ("svamp", {"input": "q", "label": 7}, "field 'label' must be a string, found number"),
    ("svamp", {"label": "( 1 + 2 )"}, "missing required field 'input' (format 'svamp')"),
    ("svamp", {"Body": "b", "Question": "q", "Equation": "__import__('os')"}, "field 'Equation'"),
    ("svamp", {"Body": "b", "Equation": "( 1 + 2 )"}, "missing required field 'Question' (format 'svamp')"),
    ("generic", {"input": "x"}, "missing required field 'label' (format 'generic')"),
    ("generic", {"input": "x", "label": ""}, "field 'label' is empty or whitespace-only"),
    ("generic", {"input": "x", "label": "y", "rationale": 3}, "field 'rationale' must be a string, found number"),
    ("generic", {"input": "x", "label": "y", "llm_label": {"a": 1}}, "field 'llm_label' must be a string, found object"),
    ("generic", ["input", "label"], "row is not a JSON object (found array)"),
]


@pytest.mark.parametrize("dataset,bad,reason", MALFORMED, ids=[f"{d}-{i}" for i, (d, _, _) in enumerate(MALFORMED)])
def test_malformed_row_reported_with_line(tmp_path, dataset, bad, reason):
    good = {"esnli": NLI_OK, "anli": NLI_OK, "cqa": CQA_OK, "svamp": {"input": "q", "label": "( 1 + 2 )"},
            "generic": {"input": "x", "label": "y"}}[dataset]
    path = write_rows(tmp_path, f"{dataset}.jsonl", [good, good, bad, good])
    with pytest.raises(DataValidationError) as info:
        load_stepbystep(path, dataset)
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith(f"{path}:3: ")
    assert reason in info.value.errors[0]
    loaded = load_stepbystep(path, dataset, skip_invalid=True)
    assert len(loaded) == 3 and [e.source for e in loaded] == [f"{path}:{n}" for n in (1, 2, 4)]
    assert loaded.skipped == info.value.errors


def test_all_problems_listed_before_raising(tmp_path, caplog):
    path = write_rows(tmp_path, "cqa.jsonl", [
        CQA_OK,
        {"question": 1, "choices": ["a"], "answer": None},  # three problems on one row
        "{not json",
        "",
        CQA_OK,
        {**CQA_OK, "answer": "q"},
    ])
    with pytest.raises(DataValidationError) as info:
        load_stepbystep(path, "cqa")
    errors = info.value.errors
    assert [e.split(": ", 1)[0] for e in errors] == [f"{path}:2", f"{path}:3", f"{path}:6"]
    assert errors[0] == (f"{path}:2: field 'question' must be a string, found number; field 'answer' must be a "
                         f"string, found null; field 'choices' must hold exactly 5 choices, found 1")
    assert "malformed JSON" in errors[1]
    with caplog.at_level(logging.WARNING, logger="kdistill.data.stepbystep"):
        ok = load_stepbystep(path, "cqa", skip_invalid=True)
    assert [e.source for e in ok] == [f"{path}:1", f"{path}:5"] and ok.skipped == errors
    assert "skipped 3 invalid row(s) of 5" in caplog.text


def test_limit_skip_and_arguments(tmp_path):
    path = write_rows(tmp_path, "g.jsonl", [{"input": str(i), "label": "y"} for i in range(5)] + [{"input": "z"}])
    with pytest.raises(DataValidationError):  # limit does not stop validation
        load_stepbystep(path, "generic", limit=2)
    got = load_stepbystep(path, "generic", skip_invalid=True, limit=2)
    assert [e.input for e in got] == ["0", "1"] and len(got.skipped) == 1
    assert load_stepbystep(path, "generic", skip_invalid=True, limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        load_stepbystep(path, "generic", limit=-1)
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_stepbystep(path, "gsm8k")
    assert DATASETS == ("esnli", "anli", "cqa", "svamp", "generic")
    with pytest.raises(FileNotFoundError):
        load_stepbystep(tmp_path / "missing.jsonl", "generic")
    bad_only = write_rows(tmp_path, "bad.jsonl", [{"input": "x"}])
    with pytest.raises(DataValidationError, match="no valid rows are left"):
        load_stepbystep(bad_only, "generic", skip_invalid=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataValidationError, match=r"empty\.jsonl:1: file contains no rows"):
        load_stepbystep(empty, "generic")


# ----------------------------------------------------------------------------------------------------
# Accuracy


@pytest.mark.parametrize("text,expected", [
    ("Entailment", "entailment"),
    ("  neutral. ", "neutral"),
    ('"Contradiction."', "contradiction"),
    ("(wooded area)", "wooded area"),
    ("[ 'Math  problem' ]!", "math problem"),
    ("Washington D.C.", "washington d.c"),
    ("go\n downtown", "go downtown"),
    ("(a) park (b)", "(a) park (b)"),  # brackets that do not enclose the whole answer stay
    ("it's", "it's"),
    ("", ""),
    ("...", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_text_matching():
    assert answers_match("Neutral.", "neutral")
    assert answers_match("  math problem", "Math Problem")
    assert not answers_match("neutral", "entailment")
    assert not answers_match("(c) wooded area", "wooded area")
    result = label_accuracy(["Neutral", "entailment", "", "x"], ["neutral", "contradiction", "neutral", "x."])
    assert result == {"accuracy": 0.5, "correct": 2, "total": 4, "invalid": 1}
    assert label_accuracy([], []) == {"accuracy": 0.0, "correct": 0, "total": 0, "invalid": 0}
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        label_accuracy(["a", "b"], ["a"])


@pytest.mark.parametrize("text,value", [
    ("( 84.0 / 2.0 )", 42.0),
    ("(84 / 2)", 42.0),
    ("42", 42.0),
    (" 42.0 ", 42.0),
    ("-3 * (2 + .5)", -7.5),
    ("( 10.0 - ( 6.0 + 3.0 ) )", 1.0),
    ("(45 - (-1))", 46.0),
    ("--5", 5.0),
    ("+2", 2.0),
    ("1 / 3", 1 / 3),
])
def test_eval_equation_values(text, value):
    assert eval_equation(text) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("text", [
    "", "  ", "abc", "(some - 8)", "(2 * x)", "(7x = 14)", "(175, 5)", "(95 * 118) + (11,210 / 84)",
    "(8 / 4) and (6 / 4)", "__import__('os').system('echo hi')", "2 ** 10", "7 // 2", "7 % 2", "1e3",
    "1_000", "0x10", "2j", "1 / 0", "(1 - 1) / (2 - 2)", "()", "(1)(2)", "1 2", "1.2.3", "(" * 300 + "1" + ")" * 300,
    "9" * 400 + " * " + "9" * 400, "1" + " * 1" * 2000, "True", "٣",
])
def test_eval_equation_rejects(text):
    assert eval_equation(text) is None


def test_eval_equation_never_calls_eval(monkeypatch):
    import builtins

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec must not be used")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert eval_equation("( 84.0 / 2.0 )") == 42.0
    assert eval_equation("__import__('os')") is None


def test_numeric_matching():
    gold = "( 84.0 / 2.0 )"
    assert answers_match("(84 / 2)", gold, numeric=True)
    assert answers_match("42", gold, numeric=True)
    assert answers_match("42.00001", gold, numeric=True)  # within 1e-4
    assert not answers_match("42.01", gold, numeric=True)
    assert answers_match("(1 / 3)", "0.33333", numeric=True)
    assert answers_match("1000000", "1000050", numeric=True)  # relative tolerance 1e-4
    assert not answers_match("1000000", "1000200", numeric=True)
    assert not answers_match("forty-two", gold, numeric=True)
    assert not answers_match("42", "not an equation", numeric=True)
    assert not answers_match("(84 / 2)", gold)  # text mode compares strings
    result = label_accuracy(["(84 / 2)", "42", "43", "(some - 8)", ""], [gold] * 5, numeric=True)
    assert result == {"accuracy": 0.4, "correct": 2, "total": 5, "invalid": 2}
    with pytest.raises(ValueError, match=r"1 gold label\(s\) are not arithmetic expressions: \[1\] 'x'"):
        label_accuracy(["1", "2"], ["1", "x"], numeric=True)


@needs_data
def test_palm_label_accuracy(svamp_train, svamp_test, cqa_test, esnli):
    """The teacher's (PaLM's) labels scored against gold: measured values, recorded as regression checks."""
    svamp = label_accuracy([e.llm_label or "" for e in svamp_test], [e.label for e in svamp_test], numeric=True)
    assert svamp == {"accuracy": 0.74, "correct": 148, "total": 200, "invalid": 7}
    svamp_tr = label_accuracy([e.llm_label or "" for e in svamp_train], [e.label for e in svamp_train],
                              numeric=True)
    assert (svamp_tr["correct"], svamp_tr["invalid"]) == (588, 34)  # 0.735

    raw = raw_rows(CQA_TEST)
    exact = sum(r["palm_label"] == r["answer"] for r in raw)
    assert exact == 943  # 0.7723, exact string match (the original metric)
    cqa = label_accuracy([r["palm_label"] for r in raw], [r["answer"] for r in raw])
    assert cqa == {"accuracy": pytest.approx(955 / 1221), "correct": 955, "total": 1221, "invalid": 0}  # 0.7821

    nli = label_accuracy([e.llm_label or "" for e in esnli], [e.label for e in esnli])
    assert (nli["correct"], nli["invalid"]) == (7201, 4)  # 0.7317
    print(f"\nPaLM label accuracy: SVAMP test {svamp['accuracy']:.4f}, train {svamp_tr['accuracy']:.4f}; "
          f"CQA test {exact / len(raw):.4f} exact / {cqa['accuracy']:.4f} normalised; "
          f"e-SNLI valid {nli['accuracy']:.4f}")
