"""`kdistill tiny` (issue #14): model sizes reach the saved configs, bad options are one line, tiny.json records
sizes, parameter counts and the teacher's pre-training, and pre-training reads every --teacher-data file."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from kdistill.apps.tiny import TINY_JSON, make_tiny_pair
from kdistill.cli import build_parser, main

WORDS = ("river stone cloud garden lantern copper violet harbor meadow pencil orbit candle thunder maple "
         "window silver basket rocket ember willow").split()


def _rows(n: int, shift: int) -> list[dict]:
    """Short prompt/completion rows (a few tokens each, so max_length never drops one)."""
    return [{"prompt": f"Name a word after {WORDS[(i + shift) % len(WORDS)]}.",
             "completion": " ".join(WORDS[(i + shift + k) % len(WORDS)] for k in range(1, 4))} for i in range(n)]


@pytest.fixture(scope="module")
def word_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("words")
    first, second = folder / "first.jsonl", folder / "second.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in _rows(12, 0)))
    second.write_text("".join(json.dumps(r) + "\n" for r in _rows(7, 5)))
    return first, second


def _params(path: str, kind: str) -> int:
    model = (AutoModelForCausalLM if kind == "causal" else AutoModelForSeq2SeqLM).from_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def test_defaults_are_the_sizes_the_suite_was_built_on(tmp_path, word_files):
    paths = make_tiny_pair(tmp_path, data=word_files[0], vocab_size=300, progress=False)
    teacher, student = (AutoConfig.from_pretrained(paths[r]) for r in ("teacher", "student"))
    assert (teacher.hidden_size, teacher.num_hidden_layers, teacher.num_attention_heads,
            teacher.num_key_value_heads, teacher.intermediate_size) == (96, 4, 4, 2, 192)
    assert (student.hidden_size, student.num_hidden_layers, student.num_attention_heads,
            student.num_key_value_heads, student.intermediate_size) == (48, 2, 4, 2, 96)
    info = json.loads((tmp_path / TINY_JSON).read_text())
    assert teacher.vocab_size == student.vocab_size + 64 == info["vocab_size"] + 64
    assert teacher.max_position_embeddings == student.max_position_embeddings == 512
    assert info["teacher"]["steps"] == 0 and info["teacher"]["train_seconds"] is None


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_sizes_reach_the_saved_configs_and_tiny_json(tmp_path, word_files, kind):
    extra = {"teacher_kv_heads": 3, "student_kv_heads": 1, "max_position_embeddings": 96} if kind == "causal" else {}
    paths = make_tiny_pair(tmp_path, kind=kind, data=word_files[0], vocab_size=300, progress=False,
                           teacher_hidden=72, teacher_layers=3, teacher_heads=6, teacher_intermediate=100,
                           student_hidden=40, student_layers=1, student_heads=2, **extra)
    teacher, student = (AutoConfig.from_pretrained(paths[r]) for r in ("teacher", "student"))
    info = json.loads((tmp_path / TINY_JSON).read_text())
    assert info["kind"] == kind
    if kind == "causal":
        assert (teacher.hidden_size, teacher.num_hidden_layers, teacher.num_attention_heads,
                teacher.num_key_value_heads, teacher.intermediate_size) == (72, 3, 6, 3, 100)
        assert (student.hidden_size, student.num_hidden_layers, student.num_attention_heads,
                student.num_key_value_heads, student.intermediate_size) == (40, 1, 2, 1, 80)
        assert teacher.max_position_embeddings == student.max_position_embeddings == 96
        assert info["teacher"]["kv_heads"] == 3 and info["student"]["max_position_embeddings"] == 96
    else:
        assert (teacher.d_model, teacher.num_layers, teacher.num_decoder_layers, teacher.num_heads, teacher.d_kv,
                teacher.d_ff) == (72, 3, 3, 6, 12, 100)
        assert (student.d_model, student.num_layers, student.num_heads, student.d_kv, student.d_ff) == (40, 1, 2, 20, 80)
        assert info["teacher"]["d_kv"] == 12 and "kv_heads" not in info["teacher"]
    assert (info["teacher"]["hidden"], info["teacher"]["layers"], info["student"]["hidden"]) == (72, 3, 40)
    for role in ("teacher", "student"):
        assert info[role]["path"] == paths[role]
        assert info[role]["params"] == _params(paths[role], kind)
    assert info["teacher"]["params"] > info["student"]["params"]


@pytest.mark.parametrize("args, flag", [
    (["--teacher-hidden", "100", "--teacher-heads", "3"], "--teacher-hidden 100 is not divisible by --teacher-heads 3"),
    (["--student-heads", "3", "--student-hidden", "48"], "--student-heads 3 is not divisible by --student-kv-heads 2"),
    (["--teacher-heads", "8", "--teacher-kv-heads", "3"], "--teacher-heads 8 is not divisible by --teacher-kv-heads 3"),
    (["--student-layers", "0"], "--student-layers: must be a whole number >= 1"),
    (["--kind", "t5", "--teacher-kv-heads", "2"], "--teacher-kv-heads: T5 has no grouped-query attention"),
    (["--kind", "t5", "--max-position-embeddings", "64"], "--max-position-embeddings: T5 uses relative positions"),
    (["--teacher-steps", "2", "--teacher-lr", "-1"], "--teacher-lr: must be a number > 0"),
    (["--teacher-steps", "2", "--teacher-batch-size", "0"], "--teacher-batch-size: must be a whole number >= 1"),
    (["--teacher-steps", "2", "--teacher-warmup", "3"], "--teacher-warmup 3 exceeds --teacher-steps 2"),
    (["--teacher-steps", "2", "--teacher-max-length", "600"], "--teacher-max-length 600 exceeds --max-position"),
    (["--teacher-steps", "2", "--teacher-data", "missing.jsonl"], "--teacher-data: file not found: 'missing.jsonl'"),
    (["--teacher-steps", "2", "--teacher-data", "README.md"], "--teacher-data README.md: teacher pre-training reads"),
])
def test_a_bad_option_is_one_line_and_exit_2_before_any_work(tmp_path, word_files, capsys, monkeypatch, args, flag):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out = tmp_path / "pair"
    assert main(["tiny", "--out", str(out), "--data", str(word_files[0]), "--vocab-size", "300", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdistill tiny: error: ") and flag in err and "\n" not in err
    assert not out.exists()


def test_cli_defaults_are_the_function_defaults():
    defaults = {k: v.default for k, v in inspect.signature(make_tiny_pair).parameters.items()}
    args = build_parser().parse_args(["tiny", "--out", "o", "--data", "d"])
    given = {k: v for k, v in vars(args).items() if k in defaults and k != "data"}
    assert set(given) == set(defaults) - {"out_dir", "data"}  # every keyword has its flag
    assert given == {k: defaults[k] for k in given}


def test_teacher_pretraining_reads_every_file_logs_and_writes_tiny_json(tmp_path, word_files, capsys):
    first, second = word_files
    out = tmp_path / "two"
    assert main(["tiny", "--out", str(out), "--data", str(first), "--vocab-size", "300", "--teacher-steps", "4",
                 "--teacher-batch-size", "4", "--teacher-max-length", "48", "--teacher-lr", "1e-2",
                 "--teacher-data", f"{first},{second}", "--teacher-hidden", "32", "--teacher-layers", "1"]) == 0
    captured = capsys.readouterr()
    info = json.loads((out / TINY_JSON).read_text())
    assert json.loads(captured.out[captured.out.index("{\n"):]) == info  # printed at the end, too
    teacher = info["teacher"]
    assert teacher["data"] == [{"path": str(first), "rows": 12}, {"path": str(second), "rows": 7}]
    assert teacher["examples"] == 19  # both files were trained on
    assert (teacher["steps"], teacher["batch_size"], teacher["max_length"], teacher["lr"], teacher["warmup"]) == \
        (4, 4, 48, 1e-2, 1)
    assert teacher["train_seconds"] > 0 and 0 < teacher["final_loss"] < 20
    assert len(re.findall(r"'loss': ", captured.out)) == 4  # logged every tenth of the steps (at least every step)
    assert re.search(r"4/4 \[", captured.err)  # the progress bar
    assert sorted(p.name for p in out.iterdir()) == ["student", "teacher", TINY_JSON]  # no work files left

    single = tmp_path / "one"
    make_tiny_pair(single, data=first, vocab_size=300, teacher_steps=2, teacher_batch_size=4,
                   teacher_max_length=48, teacher_hidden=32, teacher_layers=1, progress=False)
    one = json.loads((single / TINY_JSON).read_text())["teacher"]
    assert one["data"] == [{"path": str(first), "rows": 12}] and one["examples"] == 12
    assert not re.search(r"2/2 \[", capsys.readouterr().err)
