"""Config files, overrides, CLI, vocabulary checks and refusal of bad input before any training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_config
from kdistill.cli import main
from kdistill.config import ConfigError, config_from_dict, load_config, save_config, to_dict
from kdistill.data import DataValidationError
from kdistill.models import VocabularyMismatchError
from kdistill.pipeline import prepare, run_training

EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_example_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.student.name_or_path and cfg.objectives


def test_unknown_key_is_named_with_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student:\n  name_or_path: x\n  dtpye: bfloat16\ndata:\n  train: d.jsonl\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: student\.dtpye: unknown key"):
        load_config(path)


def test_unknown_training_argument_is_named_with_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student: {name_or_path: x}\nteacher: {name_or_path: y}\ndata: {train: d.jsonl}\n"
                    "training:\n  output_dir: o\n  learnig_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:6: training\.learnig_rate: not a transformers"):
        load_config(path)


@pytest.mark.parametrize("yaml_text, message", [
    ("student: {name_or_path: x}\ndata: {train: d}\nobjectives: {kd: {weight: 1}}\n", "needs a teacher"),
    ("student: {name_or_path: x}\ndata: {train: d}\nobjectives: {foo: {weight: 1}}\n", "unknown type 'foo'"),
    ("student: {name_or_path: x}\ndata: {train: d}\nobjectives: {ce: {weight: -1}}\n", "must be >= 0"),
    ("student: {name_or_path: x}\ndata: {train: d, max_length: many}\n", "expected an integer"),
    ("student: {name_or_path: x}\ndata: {train: d, format: csv}\n", "'csv' is not one of"),
    ("student: {name_or_path: x}\nteacher: {name_or_path: y}\ndata: {train: d}\n"
     "objectives: {kd: {divergence: kl}}\n", "'kl' is not one of"),
    ("data: {train: d}\n", "student.name_or_path is required"),
    ("student: {name_or_path: x}\n", "data.train is required"),
    ("student: [1, 2]\n", "expected a mapping"),
    ("student: {name_or_path: x\n", "invalid YAML"),
])
def test_config_errors(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_set_overrides_and_round_trip(tmp_path):
    path = REPO / "examples" / "qwen2.5_alpaca_kd.yaml"
    cfg = load_config(path, ["objectives.kd.divergence=jsd", "objectives.kd.beta=0.3",
                             "training.max_steps=7", "lora.enabled=true"])
    assert cfg.objectives["kd"].divergence == "jsd" and cfg.objectives["kd"].beta == 0.3
    assert cfg.training["max_steps"] == 7 and cfg.lora.enabled is True
    assert cfg.objectives["kd"].type == "kd"
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path, ["objectives.kd.divergense=jsd"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["training.max_steps"])
    saved = save_config(cfg, tmp_path)
    again = config_from_dict(yaml.safe_load(saved.read_text()))
    assert to_dict(again) == to_dict(cfg)


def test_train_help_lists_fields_with_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("student.name_or_path", "teacher.device_map", "data.max_length", "data.skip_invalid",
                "objectives.<name>.divergence", "objectives.<name>.temperature", "lora.merge", "training"):
        assert key in out, key
    assert "forward_kl | reverse_kl | jsd" in out


def test_same_tokenizer_with_padded_teacher_vocab_is_aligned(tiny_causal, alpaca_small, tmp_path):
    prepared = prepare(config_from_dict(run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small,
                                                   tmp_path)))
    t_rows = prepared.teacher.get_output_embeddings().weight.shape[0]
    s_rows = prepared.student.get_output_embeddings().weight.shape[0]
    assert t_rows == s_rows + 64 and prepared.trainer.kd_vocab == len(prepared.tokenizer) == s_rows


def test_different_tokenizers_are_refused_before_training(tiny_causal, alpaca_small, tmp_path):
    from kdistill.apps.tiny import build_model, decoder_config, iter_text, train_tokenizer

    other = tmp_path / "other-teacher"
    tok = train_tokenizer(iter_text(REPO.parent / "shared" / "data" / "stsb" / "sts-train.jsonl"), vocab_size=300)
    build_model(decoder_config(tok)).save_pretrained(other)
    tok.save_pretrained(other)
    raw = run_config(str(other), tiny_causal["student"], alpaca_small, tmp_path / "out")
    with pytest.raises(VocabularyMismatchError, match="different tokenizers.*sequence level"):
        prepare(config_from_dict(raw))
    assert not (tmp_path / "out").exists()


BAD_ROWS = {
    "malformed_json": ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', 2, "JSON"),
    "missing_field": ('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', 2, "output"),
    "non_string": ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n', 2, "must be a string"),
    "empty_output": ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": "  "}\n', 3, "empty"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_rows_stop_the_run_with_file_and_line(kind, tiny_causal, tmp_path, capsys):
    text, line, word = BAD_ROWS[kind]
    data = tmp_path / "bad.jsonl"
    data.write_text(text)
    out_dir = tmp_path / "out"
    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], data, out_dir)
    with pytest.raises(DataValidationError) as err:
        run_training(config_from_dict(raw))
    assert f"bad.jsonl:{line}:" in str(err.value) and word in str(err.value)
    assert not out_dir.exists(), "nothing may be trained or written"
    # the CLI reports the same place and exits 2
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg_path)]) == 2
    assert f"bad.jsonl:{line}:" in capsys.readouterr().err
    # asked to skip invalid rows, the run trains on the rest and reports the count
    raw["data"]["skip_invalid"] = True
    summary = run_training(config_from_dict(raw))
    assert summary["data"][0]["skipped_invalid"] == 1 and summary["global_step"] == 2


@pytest.mark.slow
def test_cli_runs_the_tiny_example_config(tiny_causal, alpaca_small, tmp_path):
    """`kdistill train examples/tiny/decoder_kd.yaml` end to end, in a subprocess, with paths redirected."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "kdistill.cli", "train", str(REPO / "examples" / "tiny" / "decoder_kd.yaml"),
           "--set", f"teacher.name_or_path={tiny_causal['teacher']}",
           "--set", f"student.name_or_path={tiny_causal['student']}",
           "--set", f"data.train={alpaca_small}", "--set", "data.eval_limit=8",
           "--set", f"training.output_dir={out}", "--set", "training.max_steps=4",
           "--set", "training.eval_steps=4", "--set", "training.save_steps=4", "--set", "training.logging_steps=2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "kdistill_summary.json").read_text())
    assert summary["global_step"] == 4
    evals = [h for h in summary["log_history"] if "eval_loss" in h]
    assert evals and "eval_loss/kd" in evals[-1] and "eval_loss/ce" in evals[-1]
    resolved = load_config(out / "kdistill_config.yaml")
    assert resolved.training["max_steps"] == 4
    # a second run with the same output_dir resumes from the checkpoint instead of starting over
    proc = subprocess.run(cmd[:-8] + ["--set", "training.max_steps=6", "--set", "training.eval_steps=100",
                                      "--set", "training.save_steps=100", "--set", "training.logging_steps=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "kdistill_summary.json").read_text())
    assert summary["global_step"] == 6 and summary["resumed_from"].endswith("checkpoint-4")
    # per-term logs after the resume cover only the steps since the last log, like the total does
    after = [h for h in summary["log_history"] if "loss" in h and h["step"] > 4]
    assert after
    for h in after:
        assert h["loss"] == pytest.approx(0.5 * h["loss/ce"] + 0.5 * h["loss/kd"], rel=1e-3)


def test_tiny_command_writes_a_loadable_pair(tmp_path, alpaca_small, capsys):
    assert main(["tiny", "--out", str(tmp_path / "t"), "--kind", "t5", "--data", str(alpaca_small),
                 "--vocab-size", "300"]) == 0
    info = json.loads(capsys.readouterr().out)  # the tiny.json it wrote
    assert Path(info["teacher"]["path"], "config.json").exists()
    assert Path(info["student"]["path"], "tokenizer.json").exists()


def test_an_objective_refuses_a_key_it_does_not_have_with_its_line(tmp_path):
    """Each objective has its own config: ce takes no divergence (it used to be silently accepted)."""
    path = tmp_path / "c.yaml"
    path.write_text("student: {name_or_path: x}\ndata: {train: d.jsonl}\nobjectives:\n  ce:\n    weight: 1\n"
                    "    divergence: jsd\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:6: objectives\.ce\.divergence: unknown key \(valid keys: type, "
                                          r"weight, view\)"):
        load_config(path)
    path.write_text("student: {name_or_path: x}\nteacher: {name_or_path: y}\ndata: {train: d.jsonl}\n"
                    "objectives:\n  mine:\n    type: kd\n    divergence: jsd\n    beta: 1.0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:8: objectives\.mine\.beta: 1\.0 makes jsd identically zero"):
        load_config(path)
    path.write_text("student: {name_or_path: x}\nteacher: {name_or_path: y}\ndata: {train: d.jsonl}\n"
                    "objectives:\n  x:\n    type: crosstok\n    method: alm\n    divergence: jsd\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:8: objectives\.x\.divergence: jsd is not a binary KL direction: "
                                          r"method alm takes forward_kl or reverse_kl"):
        load_config(path)  # it used to train as forward_kl without a word
    cfg = config_from_dict({"student": {"name_or_path": "x"}, "teacher": {"name_or_path": "y"},
                            "data": {"train": "d"}, "objectives": {"rationale": {"type": "ce", "view": "rationale"},
                                                                   "contrastive_kd": {"type": "kd"}}})
    assert [type(o).__name__ for o in cfg.objectives.values()] == ["CrossEntropyConfig", "LogitKDConfig"]
    assert cfg.objectives["contrastive_kd"].temperature == 1.0  # the objective's own default, saved with the run
