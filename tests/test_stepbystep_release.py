"""The distilling step-by-step release converter, on release-shaped folders built from the bundled real rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdistill.annotate import parse_rationale
from kdistill.data.records import DataValidationError
from kdistill.data.stepbystep import load_stepbystep
from kdistill.data.stepbystep_release import convert, main, parse_output

REPO = Path(__file__).resolve().parents[1]
PALM = ("palm_output", "palm_rationale", "palm_label")
# (name, split, bundled file, rows used, batch per llm file, split file written as a JSON array?)
# SVAMP: 12 files of 25, so that k = 10, 11 must sort after 2; CQA: 3 files, the last one shorter, as in the release.
CASES = {
    "svamp": ("train", "dsbs_svamp/svamp_train.jsonl", 300, 25, True),
    "cqa": ("test", "dsbs_cqa/cqa_test.jsonl", 400, 150, False),
}


def _head(path: Path, n: int) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _make_release(root: Path, shared: Path, name: str) -> tuple[Path, list[dict]]:
    """datasets/<name>/<name>_<split>.json + llm/<split>_CoT_<k>.json from the first rows of the bundled file."""
    split, rel, n, batch, as_array = CASES[name]
    source = _head(shared / rel, n)
    folder = root / "datasets" / name
    (folder / "llm").mkdir(parents=True)
    originals = [{k: v for k, v in row.items() if k not in PALM} for row in source]
    if as_array:
        text = json.dumps(originals, indent=4)
    else:
        text = "".join(json.dumps(row) + "\n" for row in originals)
    (folder / f"{name}_{split}.json").write_text(text, encoding="utf-8")
    outputs = [row["palm_output"] for row in source]
    for k, start in enumerate(range(0, n, batch)):
        (folder / "llm" / f"{split}_CoT_{k}.json").write_text(json.dumps(outputs[start:start + batch]))
    return folder, source


@pytest.fixture(params=sorted(CASES))
def release(request, tmp_path, shared_data):
    folder, source = _make_release(tmp_path, shared_data, request.param)
    return request.param, folder, source


def test_convert_keeps_rows_and_parses_like_kdistill(release, tmp_path, capsys):
    name, folder, source = release
    split = CASES[name][0]
    summaries = convert(folder, tmp_path / "out")
    out = tmp_path / "out" / f"{name}_{split}.jsonl"
    assert [s.path for s in summaries] == [out] and not list((tmp_path / "out").glob("*.tmp"))
    rows = _jsonl(out)
    assert len(rows) == len(source)
    shipped_agree = 0
    for row, src in zip(rows, source):
        original = {k: v for k, v in src.items() if k not in PALM}
        assert {k: v for k, v in row.items() if k not in PALM} == original
        assert list(row)[:len(original)] == list(original)  # same fields, same order, palm fields appended
        assert row["palm_output"] == src["palm_output"]
        parsed = parse_rationale(row["palm_output"])
        assert (row["palm_rationale"], row["palm_label"]) == (parsed if parsed else ("", ""))
        shipped_agree += row["palm_label"] == src["palm_label"].strip()
    agreement = shipped_agree / len(rows)
    with capsys.disabled():  # the reported figure (run with -s to see it)
        print(f"\n{name}_{split}: {len(rows)} rows; palm_label equal to the shipped one: {agreement:.4f}")
    # not a spec (the shipped labels come from the original parser), but a misaligned batch would fall far below
    assert agreement > 0.9
    labelled = sum(bool(r["palm_label"]) for r in rows)
    assert (summaries[0].rows, summaries[0].with_label, summaries[0].unparsable) == \
        (len(rows), labelled, len(rows) - labelled)
    assert f"{split}: {len(rows)} rows, {labelled} with palm label" in capsys.readouterr().out
    examples = load_stepbystep(out, name)
    assert len(examples) == len(rows)
    assert sum(e.llm_label is None for e in examples) == len(rows) - labelled


def test_command_line(tmp_path, shared_data, capsys):
    folder, source = _make_release(tmp_path, shared_data, "svamp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "kdistill.data.stepbystep_release", str(folder),
                           str(tmp_path / "cli"), "--splits", "train"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "train: 300 rows" in done.stdout
    convert(folder, tmp_path / "fn", verbose=False)
    assert (tmp_path / "cli" / "svamp_train.jsonl").read_bytes() == (tmp_path / "fn" / "svamp_train.jsonl").read_bytes()
    assert main([str(folder), str(tmp_path / "cli"), "--splits", "test"]) == 1
    assert "error: split file not found" in capsys.readouterr().err


def test_count_mismatch_names_files_and_counts(release, tmp_path):
    name, folder, source = release
    split = CASES[name][0]
    last = sorted((folder / "llm").glob(f"{split}_CoT_*.json"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))[-1]
    last.write_text(json.dumps(json.loads(last.read_text())[:-1]))
    with pytest.raises(DataValidationError) as err:
        convert(folder, tmp_path / "out", verbose=False)
    message = str(err.value)
    assert f"{split}_CoT_0.json .. {last.name}" in message and f"{name}_{split}.json" in message
    assert f"{len(source) - 1} completions" in message and f"{len(source)} rows" in message
    assert not (tmp_path / "out").exists()  # nothing written


def test_gap_in_file_numbers(tmp_path, shared_data):
    folder, _ = _make_release(tmp_path, shared_data, "svamp")
    (folder / "llm" / "train_CoT_3.json").unlink()
    with pytest.raises(DataValidationError, match="missing k = 3"):
        convert(folder, tmp_path / "out", verbose=False)


def test_malformed_json_is_file_and_line(tmp_path, shared_data):
    folder, _ = _make_release(tmp_path, shared_data, "cqa")
    split_file = folder / "cqa_test.json"
    lines = split_file.read_text().splitlines(keepends=True)
    lines[4] = lines[4][:40] + "\n"
    split_file.write_text("".join(lines))
    with pytest.raises(DataValidationError) as err:
        convert(folder, tmp_path / "out", verbose=False)
    assert err.value.errors[0].startswith(f"{split_file}:5: malformed JSON")
    split_file.write_text("".join(lines[:4] + lines[5:]))
    llm_file = folder / "llm" / "test_CoT_1.json"
    llm_file.write_text("[\n" + ",\n".join(['"a"'] * 3) + ",\n\"cut")
    with pytest.raises(DataValidationError) as err:
        convert(folder, tmp_path / "out", verbose=False)
    assert err.value.errors[0].startswith(f"{llm_file}:5: malformed JSON")


def test_missing_llm_folder_writes_plain_rows(tmp_path, shared_data, capsys):
    folder, source = _make_release(tmp_path, shared_data, "cqa")
    for path in (folder / "llm").iterdir():
        path.unlink()
    (folder / "llm").rmdir()
    summaries = convert(folder, tmp_path / "out")
    assert "note:" in capsys.readouterr().out and not summaries[0].has_llm
    rows = _jsonl(tmp_path / "out" / "cqa_test.jsonl")
    assert rows == [{k: v for k, v in row.items() if k not in PALM} for row in source]
    examples = load_stepbystep(tmp_path / "out" / "cqa_test.jsonl", "cqa")
    assert len(examples) == len(source) and all(e.llm_label is None for e in examples)


def test_nli_outputs():
    # e-SNLI ends with an "Answer:" line, ANLI with "So the answer is"; both continue with a new "Premise:" block.
    esnli = ("A man is not a woman.\nAnswer: contradiction\n\nPremise: A dog runs.\nHypothesis: x\n"
             "Reasonings: y\nAnswer: neutral")
    assert parse_output(esnli, "esnli") == ("A man is not a woman.", "contradiction")
    cut_short = "A dog is an animal.\nAnswer: entailment\n\nPre"  # the original kept "entailment\n\nPre"
    assert parse_output(cut_short, "esnli") == ("A dog is an animal.", "entailment")
    anli = ("The store opened in London. So the answer is contradiction.\n\nPremise: p\nHypothesis: h\n"
            "Answer: It says so. So the answer is entailment.")
    assert parse_output(anli, "anli") == ("The store opened in London.", "contradiction")
    assert parse_output("So the answer is it is not possible to tell.", "anli") == ("", "")
    assert parse_output("no answer at all", "esnli") == ("", "")
