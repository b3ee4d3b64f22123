"""`kdistill eval lm` through the CLI: several data sets with the models loaded once, invalid rows skipped and
counted, rows that max_length leaves without a response counted, and max_length taken from the run's config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kdistill.cli import main
from kdistill.config import CONFIG_FILENAME, ModelConfig, config_from_dict, save_config
from kdistill.data import encode_examples, load_examples
from kdistill.errors import ConfigError
from kdistill.evaluation import lm
from kdistill.models import load_model, load_tokenizer

from conftest import run_config

STUDENT_KEYS = {"kl", "reverse_kl", "top1_agreement", "perplexity", "nll", "entropy", "entropy_gap"}
ENTRY_KEYS = {"data", "examples", "tokens", "skipped_invalid", "dropped_no_target", "truncated", "teacher",
              "students"}


def _rows(path: Path, start: int, n: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[start:start + n]]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _eval(models, tmp_path, *extra) -> tuple[int, dict | None]:
    out = tmp_path / "lm.json"
    code = main(["eval", "lm", "--teacher", models["teacher"], "--student", f"s={models['student']}",
                 "--batch-size", "4", "--out", str(out), *extra])
    return code, json.loads(out.read_text()) if out.exists() else None


@pytest.fixture(scope="module")
def loaded(tiny_causal):
    tok = load_tokenizer(ModelConfig(name_or_path=tiny_causal["teacher"]))
    return tok, load_model(ModelConfig(name_or_path=tiny_causal["teacher"])), \
        load_model(ModelConfig(name_or_path=tiny_causal["student"]))


def test_two_data_sets_one_load_each_same_numbers_as_alone(tiny_causal, alpaca_small, loaded, tmp_path,
                                                           monkeypatch, capsys):
    a = _jsonl(tmp_path / "heldout.jsonl", _rows(alpaca_small, 0, 6))
    (tmp_path / "other").mkdir()
    b = _jsonl(tmp_path / "other" / "heldout.jsonl", _rows(alpaca_small, 6, 5))
    calls = []
    real = lm.load_model
    monkeypatch.setattr(lm, "load_model", lambda cfg, **kw: calls.append(cfg.name_or_path) or real(cfg, **kw))
    code, result = _eval(tiny_causal, tmp_path, "--data", str(a), "--data", f"second={b}", "--data", str(a),
                         "--max-length", "64")
    printed = capsys.readouterr().out
    assert code == 0
    assert calls == [tiny_causal["teacher"], tiny_causal["student"]]  # once each, not once per data set
    assert set(result) == {"kind", "max_length", "max_length_from", "vocab_size", "teacher", "datasets"}
    assert result["kind"] == "lm" and result["max_length"] == 64 and result["max_length_from"] == "--max-length"
    assert result["teacher"] == {"path": tiny_causal["teacher"]}
    tok, teacher, student = loaded
    assert result["vocab_size"] == len(tok)
    assert list(result["datasets"]) == ["heldout", "second", "heldout-2"]
    for entry in result["datasets"].values():
        assert set(entry) == ENTRY_KEYS and set(entry["students"]["s"]) == STUDENT_KEYS
        assert set(entry["teacher"]) == {"perplexity", "nll", "entropy"}
    first, second, again = result["datasets"].values()
    assert (first["data"], second["data"]) == (str(a), str(b))
    assert first["examples"] + first["dropped_no_target"] == 6 and first["skipped_invalid"] == 0
    assert second["examples"] + second["dropped_no_target"] == 5 and second["tokens"] != first["tokens"]
    assert again == first
    alone = lm.lm_diagnostics(teacher, {"s": student}, tok, b, max_length=64, progress=False)
    assert alone["tokens"] == second["tokens"]
    for key, value in alone["students"]["s"].items():
        assert second["students"]["s"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert printed.count("| teacher |") == 3 and "second (" in printed


def test_invalid_rows_refused_with_the_place_or_skipped_and_counted(tiny_causal, alpaca_small, tmp_path, capsys):
    rows = _rows(alpaca_small, 0, 6)
    rows[1] = {**rows[1], "output": ""}
    rows[4] = {**rows[4], "output": ""}
    bad = _jsonl(tmp_path / "bad.jsonl", rows)

    code, result = _eval(tiny_causal, tmp_path, "--data", str(bad), "--limit", "3")
    err = capsys.readouterr().err
    assert code == 2 and result is None and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"{bad}:2:" in errors[0]
    assert f"{bad}:5:" in err  # every bad row is listed, below the error line

    code, result = _eval(tiny_causal, tmp_path, "--data", str(bad), "--limit", "3", "--skip-invalid",
                         "--max-length", "256")
    out = capsys.readouterr().out
    entry = result["datasets"]["bad"]
    assert code == 0 and entry["skipped_invalid"] == 2
    assert entry["examples"] == 3 and entry["dropped_no_target"] == 0  # --limit counts valid rows
    assert "2 skipped invalid" in out and f"skipped: {bad}:2:" in out


def test_rows_without_a_response_token_within_max_length_are_counted(tiny_causal, alpaca_small, loaded, tmp_path,
                                                                     capsys):
    rows = _rows(alpaca_small, 0, 5)
    rows[2] = {**rows[2], "instruction": "Describe the sea. " * 40}  # the prompt alone fills 48 tokens
    data = _jsonl(tmp_path / "long.jsonl", rows)
    code, result = _eval(tiny_causal, tmp_path, "--data", str(data), "--max-length", "48")
    out = capsys.readouterr().out
    entry = result["datasets"]["long"]
    tok = loaded[0]
    _, stats = encode_examples(load_examples(str(data)).examples, tok, max_length=48)
    assert code == 0 and stats.dropped_no_target >= 1
    assert entry["dropped_no_target"] == stats.dropped_no_target and entry["truncated"] == stats.truncated
    assert entry["examples"] == 5 - stats.dropped_no_target
    assert f"{stats.dropped_no_target} dropped (no response token left within max_length)" in out

    only = _jsonl(tmp_path / "only_long.jsonl", [rows[2]])
    code, result = _eval(tiny_causal, tmp_path, "--data", str(only), "--max-length", "48")
    err = capsys.readouterr().err
    assert code == 2 and f"{only}: no example to evaluate: all 1 dropped" in err and "--max-length" in err


def test_max_length_defaults_to_the_students_run_config(tiny_causal, alpaca_small, loaded, tmp_path, capsys):
    student = tmp_path / "run" / "student"
    shutil.copytree(tiny_causal["student"], student)
    raw = run_config(tiny_causal["teacher"], str(student), alpaca_small, tmp_path / "run")
    raw["data"]["max_length"] = 40
    config_path = save_config(config_from_dict(raw), student)
    data = _jsonl(tmp_path / "heldout.jsonl", _rows(alpaca_small, 0, 8))

    code, result = _eval({**tiny_causal, "student": str(student)}, tmp_path, "--data", str(data))
    out = capsys.readouterr().out
    assert code == 0
    assert result["max_length"] == 40 and result["max_length_from"] == f"student config {config_path}"
    assert "max_length 40 (the run's data.max_length, from the student config" in out
    tok = loaded[0]
    _, stats = encode_examples(load_examples(str(data)).examples, tok, max_length=40)
    assert stats.truncated > 0 and result["datasets"]["heldout"]["truncated"] == stats.truncated

    code, result = _eval({**tiny_causal, "student": str(student)}, tmp_path, "--data", str(data),
                         "--max-length", "96")
    assert result["max_length"] == 96 and result["max_length_from"] == "--max-length"


def test_resolve_max_length_order_and_bad_config(tmp_path):
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    student.mkdir()
    teacher.mkdir()
    assert lm.resolve_max_length(None, [str(student)], str(teacher)) == (lm.DEFAULT_MAX_LENGTH, "default")
    assert lm.resolve_max_length(None, [str(student)], "org/hub-model") == (lm.DEFAULT_MAX_LENGTH, "default")
    (teacher / CONFIG_FILENAME).write_text("data:\n  max_length: 300\n")
    assert lm.resolve_max_length(None, [str(student)], str(teacher)) == \
        (300, f"teacher config {teacher / CONFIG_FILENAME}")
    (student / CONFIG_FILENAME).write_text("data:\n  max_length: 128\n")
    assert lm.resolve_max_length(None, [str(student)], str(teacher)) == \
        (128, f"student config {student / CONFIG_FILENAME}")
    assert lm.resolve_max_length(77, [str(student)], str(teacher)) == (77, "--max-length")
    (student / CONFIG_FILENAME).write_text("data:\n  max_length: lots\n")
    with pytest.raises(ConfigError, match=r"kdistill_config.yaml: data.max_length: expected a positive integer"):
        lm.resolve_max_length(None, [str(student)], str(teacher))


def test_new_shape_is_readable_by_the_report(tiny_causal, alpaca_small, tmp_path):
    from kdistill.report import build_report

    run = tmp_path / "run"
    run.mkdir()
    data = _jsonl(tmp_path / "heldout.jsonl", _rows(alpaca_small, 0, 4))
    code = main(["eval", "lm", "--teacher", tiny_causal["teacher"], "--student", f"s={tiny_causal['student']}",
                 "--data", str(data), "--max-length", "64", "--out", str(run / "eval_lm.json")])
    assert code == 0
    kl = json.loads((run / "eval_lm.json").read_text())["datasets"]["heldout"]["students"]["s"]["kl"]
    md, _ = build_report([run], tmp_path / "report")
    from kdistill.report import format_number

    assert format_number(kl) in md.read_text()
