"""Issue #14: local generation stops at the chat template's end of turn; generation options reach
``model.generate`` and are recorded; degenerate SeqKD answers are measured and warned about.

The model under test is built by hand so that its behaviour is known exactly: a one-layer Qwen2 whose attention
and MLP write nothing, so the next token depends on the current token only, through a transition table set in
the embeddings and the output layer. After the prompt (which ends with the newline of
``<|im_start|>assistant\\n``) it writes ``hello``, `` world``, then ``<|im_end|>`` (the end of a ChatML turn; the
tokenizer's EOS is ``<|endoftext|>``), and after ``<|im_end|>`` it starts again: ``hello world<|im_end|>hello
world<|im_end|>...``. A generator that stops only at EOS runs to ``max_new_tokens``.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from chat_server import ChatServer
from conftest import run_config
from kdistill.annotate import annotate
from kdistill.apps.tiny import CHATML_TEMPLATE, build_model, decoder_config, train_tokenizer
from kdistill.cli import main
from kdistill.config import config_from_dict
from kdistill.data.answer_stats import (DISTINCT_RATIO_MIN, EMPTY_FRACTION_MAX, REPEATED_NGRAM_MAX, answer_stats,
                                        repeated_ngram_fraction)
from kdistill.errors import UserError
from kdistill.evaluation.generate import generate_file
from kdistill.generators import GenerationOptionError, LocalTeacher, generation_params, turn_end_tokens
from kdistill.recipes.lm import load_split

CORPUS = ["hello world, how are you today? the answer is yes. tell me a story about the sea."] * 30
QUESTIONS = ["Name a colour.", "What is two plus two?", "Say something nice.", "Where is the sea?",
             "Tell me a story.", "Is the answer yes?"]
MAX_NEW = 12


@pytest.fixture(scope="module")
def closing(tmp_path_factory):
    """{"path", "model", "tokenizer", "answer_ids"}: the hand-built model of the module docstring, also saved."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=400)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    hello, world = tokenizer.convert_tokens_to_ids(["hello", "Ġworld"])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(newline) == 1 and tokenizer.unk_token_id not in (hello, world) and im_end != tokenizer.eos_token_id
    config = decoder_config(tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed_tie=False)
    model = build_model(config, seed=0).eval()
    following = {newline[0]: hello, hello: world, world: im_end, im_end: hello}
    with torch.no_grad():
        for layer in model.model.layers:  # every block writes nothing to the residual stream
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for slot, (current, nxt) in enumerate(following.items()):
            model.model.embed_tokens.weight[current] = 0.0
            model.model.embed_tokens.weight[current, slot] = 1.0
            model.lm_head.weight[nxt, slot] = 10.0
    path = tmp_path_factory.mktemp("closing") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"path": str(path), "model": model, "tokenizer": tokenizer, "answer_ids": [hello, world]}


def _rows(path, n=len(QUESTIONS)):
    path.write_text("".join(json.dumps({"instruction": q, "input": "", "output": "ref"}) + "\n"
                            for q in QUESTIONS[:n]))
    return path


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _Spy:
    """Wraps ``model.generate``: records the keyword arguments and the number of new tokens of each call."""

    def __init__(self, model):
        self.model, self.original, self.calls = model, model.generate, []

    def __call__(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        self.calls.append({"kwargs": kwargs, "new_tokens": out.shape[1] - kwargs["input_ids"].shape[1]})
        return out


# ----------------------------------------------------------------------------------------------------
# the end-of-turn token, read from the chat template

LLAMA3_LIKE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}"
               "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
               "{% endif %}")
GEMMA_LIKE = ("{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
              "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
              "{% endif %}")
INST_LIKE = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
             "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
PLAIN_TEXT_TURNS = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
REFUSES = "{{ raise_exception('this template takes no assistant turn') }}"


@pytest.mark.parametrize("template, expected", [
    (CHATML_TEMPLATE, ["<|im_end|>"]),
    (LLAMA3_LIKE, ["<|eot_id|>"]),
    (GEMMA_LIKE, ["<end_of_turn>"]),
    (INST_LIKE, ["<|endoftext|>"]),  # the turn ends with EOS itself
    (PLAIN_TEXT_TURNS, []),  # no special token closes a turn: nothing to stop at
    (REFUSES, []),
    (None, []),
])
def test_turn_end_tokens_of_templates(closing, template, expected):
    tokenizer = copy.deepcopy(closing["tokenizer"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = template
    assert turn_end_tokens(tokenizer) == expected


# ----------------------------------------------------------------------------------------------------
# LocalTeacher


def test_local_teacher_stops_at_turn_end_and_records_it(closing, monkeypatch):
    model, tokenizer = closing["model"], closing["tokenizer"]
    spy = _Spy(model)
    monkeypatch.setattr(model, "generate", spy)

    teacher = LocalTeacher(model, tokenizer=tokenizer, batch_size=3, max_new_tokens=MAX_NEW)
    assert teacher.params == {"max_new_tokens": MAX_NEW, "do_sample": False, "stop_tokens": ["<|im_end|>"]}
    prompts = [teacher.render(q) for q in QUESTIONS]
    assert teacher.generate(prompts) == ["hello world"] * len(QUESTIONS)
    assert [c["new_tokens"] for c in spy.calls] == [3, 3]  # hello, world, <|im_end|>: then every row stopped

    spy.calls.clear()
    running = LocalTeacher(model, tokenizer=tokenizer, batch_size=3, max_new_tokens=MAX_NEW, template_stop=False)
    assert running.params == {"max_new_tokens": MAX_NEW, "do_sample": False}
    answers = running.generate(prompts)
    assert [c["new_tokens"] for c in spy.calls] == [MAX_NEW, MAX_NEW]  # never stopped
    # 12 new tokens, 4 of them <|im_end|> (hidden when decoding): 8 visible tokens
    assert answers == ["hello world" * 4] * len(QUESTIONS)
    assert len(tokenizer(answers[0], add_special_tokens=False)["input_ids"]) == MAX_NEW - 4

    for stop in (["Ġworld"], [" world"]):  # a vocabulary entry as written, or a string that is one token
        own = LocalTeacher(model, tokenizer=tokenizer, max_new_tokens=MAX_NEW, template_stop=False, stop_tokens=stop)
        assert own.generate(prompts[:2]) == ["hello", "hello"] and own.params["stop_tokens"] == stop
    both = LocalTeacher(model, tokenizer=tokenizer, max_new_tokens=MAX_NEW, stop_tokens=["Ġworld"])
    assert both.params["stop_tokens"] == ["<|im_end|>", "Ġworld"]

    with pytest.raises(GenerationOptionError, match=r"stop token 'hello world' \(--stop-token\): not one token"):
        LocalTeacher(model, tokenizer=tokenizer, stop_tokens=["hello world"])
    with pytest.raises(UserError):  # a user mistake: one line and exit 2 in the CLI
        LocalTeacher(model, tokenizer=tokenizer, stop_tokens=[""])


def test_a_turn_that_ends_with_eos_adds_no_stop_token(closing):
    tokenizer = copy.deepcopy(closing["tokenizer"])
    tokenizer.chat_template = INST_LIKE
    teacher = LocalTeacher(closing["model"], tokenizer=tokenizer, max_new_tokens=4)
    assert teacher.params == {"max_new_tokens": 4, "do_sample": False}  # nothing beyond EOS: keys unchanged
    assert tokenizer.eos_token_id in teacher.stop_ids


def test_generation_options_reach_generate_and_are_recorded(closing, monkeypatch):
    model, tokenizer = closing["model"], closing["tokenizer"]
    spy = _Spy(model)
    monkeypatch.setattr(model, "generate", spy)
    options = dict(temperature=0.7, top_p=0.9, top_k=5, seed=3, repetition_penalty=1.3, no_repeat_ngram_size=3)
    teacher = LocalTeacher(model, tokenizer=tokenizer, max_new_tokens=6, **options)
    assert teacher.params == {"max_new_tokens": 6, "do_sample": True, **options, "stop_tokens": ["<|im_end|>"]}
    teacher.generate([teacher.render("hi")])
    sent = spy.calls[-1]["kwargs"]
    assert {k: sent[k] for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                                 "no_repeat_ngram_size", "max_new_tokens")} == \
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "repetition_penalty": 1.3,
         "no_repeat_ngram_size": 3, "max_new_tokens": 6}
    assert "seed" not in sent and "stop_tokens" not in sent
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in sent["eos_token_id"]

    greedy = LocalTeacher(model, tokenizer=tokenizer, max_new_tokens=6, do_sample=False, top_k=5,
                          repetition_penalty=1.3, no_repeat_ngram_size=2)
    # top_k is a sampling parameter (left out when greedy); the penalties apply to greedy decoding too
    assert greedy.params == {"max_new_tokens": 6, "do_sample": False, "repetition_penalty": 1.3,
                             "no_repeat_ngram_size": 2, "stop_tokens": ["<|im_end|>"]}
    greedy.generate([greedy.render("hi")])
    sent = spy.calls[-1]["kwargs"]
    assert sent["do_sample"] is False and sent["top_k"] is None and sent["repetition_penalty"] == 1.3
    # --do-sample at temperature 0 samples at temperature 1
    assert generation_params(4, 0.0, do_sample=True)["temperature"] == 1.0
    # neutral values do not change the recorded parameters
    assert generation_params(4, repetition_penalty=1.0, no_repeat_ngram_size=0) == generation_params(4)


@pytest.mark.parametrize("bad, flag", [
    ({"top_k": -1}, "--top-k"), ({"top_k": 2.5}, "--top-k"), ({"repetition_penalty": 0}, "--repetition-penalty"),
    ({"repetition_penalty": -1.0}, "--repetition-penalty"), ({"no_repeat_ngram_size": -2}, "--no-repeat-ngram-size"),
    ({"top_p": 0}, "--top-p"), ({"temperature": -0.5}, "--temperature"), ({"max_new_tokens": 0}, "--max-new-tokens"),
])
def test_generation_params_refuse_out_of_range(bad, flag):
    with pytest.raises(GenerationOptionError, match=flag):
        generation_params(**{"max_new_tokens": 4, **bad})


# ----------------------------------------------------------------------------------------------------
# kdistill generate


def test_generate_cli_stops_keys_and_refuses(closing, tmp_path, capsys):
    data = _rows(tmp_path / "q.jsonl")
    out = tmp_path / "answers.jsonl"
    base = ["generate", "--model", closing["path"], "--data", str(data), "--max-new-tokens", str(MAX_NEW),
            "--batch-size", "4", "--no-progress"]
    assert main(base + ["--out", str(out)]) == 0
    records = _jsonl(out)
    assert [r["generate_output"] for r in records] == ["hello world"] * len(QUESTIONS)
    assert all(r["params"] == {"max_new_tokens": MAX_NEW, "do_sample": False, "stop_tokens": ["<|im_end|>"]}
               for r in records)

    # answers without the stop are another configuration: not appended to this file
    capsys.readouterr()
    assert main(base + ["--out", str(out), "--no-template-stop"]) == 2
    assert "already holds answers" in capsys.readouterr().err and len(_jsonl(out)) == len(QUESTIONS)
    running = tmp_path / "running.jsonl"
    assert main(base + ["--out", str(running), "--no-template-stop"]) == 0
    answers = [r["generate_output"] for r in _jsonl(running)]
    assert all(len(closing["tokenizer"](a, add_special_tokens=False)["input_ids"]) == MAX_NEW - 4 for a in answers)

    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "x.jsonl"), "--stop-token", "hello world"]) == 2
    err = capsys.readouterr().err
    assert "stop token 'hello world'" in err and "not one token" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.jsonl").exists()
    assert main(base + ["--out", str(tmp_path / "x.jsonl"), "--repetition-penalty", "0"]) == 2
    assert "repetition_penalty (--repetition-penalty) must be > 0" in capsys.readouterr().err

    opts = tmp_path / "opts.jsonl"
    assert main(base + ["--out", str(opts), "--do-sample", "--top-k", "3", "--seed", "1", "--repetition-penalty",
                        "1.2", "--no-repeat-ngram-size", "2", "--stop-token", "Ġworld", "--no-template-stop"]) == 0
    assert _jsonl(opts)[0]["params"] == {"max_new_tokens": MAX_NEW, "do_sample": True, "temperature": 1.0,
                                         "top_p": 1.0, "seed": 1, "top_k": 3, "repetition_penalty": 1.2,
                                         "no_repeat_ngram_size": 2, "stop_tokens": ["Ġworld"]}


def test_generate_file_with_a_teacher_keeps_its_stops(closing, tmp_path):
    teacher = LocalTeacher(closing["model"], tokenizer=closing["tokenizer"], stop_tokens=["Ġworld"],
                           template_stop=False, teacher_id="closing")
    summary = generate_file(teacher, _rows(tmp_path / "q.jsonl", 2), tmp_path / "a.jsonl", max_new_tokens=MAX_NEW,
                            progress=False)
    records = _jsonl(tmp_path / "a.jsonl")
    assert summary.generated == 2 and [r["generate_output"] for r in records] == ["hello", "hello"]
    assert records[0]["params"] == {"max_new_tokens": MAX_NEW, "do_sample": False, "stop_tokens": ["Ġworld"]}


# ----------------------------------------------------------------------------------------------------
# kdistill annotate: local model, API options, answer statistics


def test_annotate_local_model_stops_and_reports_answers(closing, tmp_path, capsys, caplog):
    data = _rows(tmp_path / "q.jsonl")
    out, export = tmp_path / "ann.jsonl", tmp_path / "seqkd.jsonl"
    caplog.set_level(logging.WARNING)
    args = ["annotate", "--task", "output", "--model", closing["path"], "--data", str(data), "--out", str(out),
            "--max-new-tokens", str(MAX_NEW), "--no-progress", "--export", str(export)]
    assert main(args) == 0
    records = _jsonl(out)
    assert [r["output"] for r in records] == ["hello world"] * len(QUESTIONS)
    params = {"max_new_tokens": MAX_NEW, "do_sample": False, "stop_tokens": ["<|im_end|>"]}
    assert all(r["params"] == params for r in records)

    stats = json.loads((tmp_path / "seqkd.jsonl.stats.json").read_text())
    assert set(stats) == {"teacher", "task", "params", "rows", "ok", "failed", "unparsable", "answers"}
    assert (stats["task"], stats["params"], stats["rows"], stats["ok"], stats["failed"], stats["unparsable"]) == \
        ("output", params, len(QUESTIONS), len(QUESTIONS), 0, 0)
    assert stats["teacher"] == records[0]["teacher"]
    answers = stats["answers"]
    assert answers["count"] == len(QUESTIONS) and answers["mean_words"] == 2.0
    assert answers["distinct_ratio"] == pytest.approx(1 / len(QUESTIONS)) and answers["degenerate"] is True
    printed = capsys.readouterr().out
    assert f"answers: {len(QUESTIONS)} answers, 17% distinct" in printed and "seqkd.jsonl.stats.json" in printed
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "degenerate" in r.getMessage()]
    assert len(warnings) == 1 and str(out) in warnings[0].getMessage() and "distinct" in warnings[0].getMessage()

    # without the stop, the answers run on and repeat themselves; a file of one configuration each
    caplog.clear()
    running = tmp_path / "running.jsonl"
    assert main(args[:-2] + ["--out", str(running), "--no-template-stop"]) == 0  # without --export
    assert all(r["output"] == "hello world" * 4 for r in _jsonl(running))
    assert not (tmp_path / "running.jsonl.stats.json").exists()  # no --export: printed only
    message = next(r.getMessage() for r in caplog.records if "degenerate" in r.getMessage())
    assert str(running) in message

    teacher = LocalTeacher(closing["model"], tokenizer=closing["tokenizer"], max_new_tokens=MAX_NEW,
                           template_stop=False, teacher_id=records[0]["teacher"])
    with pytest.raises(UserError, match="another teacher, task or generation parameters"):
        annotate([{"instruction": QUESTIONS[0], "input": ""}], teacher, "output", out, progress=False)


def test_annotate_api_passes_stop_and_refuses_local_only_options(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "input": ""}) + "\n")
    with ChatServer(lambda request, attempt: "hi there") as server:
        base = ["annotate", "--task", "output", "--base-url", server.url, "--api-model", "m", "--data", str(data),
                "--no-progress", "--api-key-env", "KDISTILL_TEST_NO_KEY", "--top-p", "0.5"]
        assert main(base + ["--out", str(tmp_path / "a.jsonl"), "--stop-token", "###", "--stop-token", "END"]) == 0
        body = server.requests[-1]["json"]
        assert body["stop"] == ["###", "END"] and body["top_p"] == 0.5
        assert _jsonl(tmp_path / "a.jsonl")[0]["params"]["stop"] == ["###", "END"]
        sent = len(server.requests)
        capsys.readouterr()
        for flags in (["--top-k", "4"], ["--repetition-penalty", "1.1"], ["--do-sample"], ["--no-template-stop"],
                      ["--no-repeat-ngram-size", "3"]):
            assert main(base + ["--out", str(tmp_path / "b.jsonl")] + flags) == 2
            err = capsys.readouterr().err
            assert flags[0] in err and "local --model option" in err
        assert len(server.requests) == sent and not (tmp_path / "b.jsonl").exists()


# ----------------------------------------------------------------------------------------------------
# answer statistics and the training-data warning

VARIED = ["Paris is the capital of France.", "Two plus two is four.", "The sea is blue because it reflects the sky.",
          "Once upon a time a fox found a grape vine.", "Yes.", "Red, green and blue are colours."]


def test_answer_stats_flags_degenerate_sets_and_passes_a_varied_one():
    good = answer_stats(VARIED)
    assert good["degenerate"] is False and good["reasons"] == [] and good["count"] == 6
    assert good["distinct_ratio"] == 1.0 and good["empty_fraction"] == 0.0 and good["repeated_ngram_fraction"] == 0.0
    assert good["mean_words"] == pytest.approx(sum(len(a.split()) for a in VARIED) / 6)

    same = answer_stats(["the same answer"] * 5 + ["another one"])
    assert same["degenerate"] and same["distinct_ratio"] == pytest.approx(2 / 6)
    assert same["distinct_ratio"] < DISTINCT_RATIO_MIN
    assert any("distinct" in r for r in same["reasons"])
    assert answer_stats([" a  b ", "a b", "c"])["distinct_ratio"] == pytest.approx(2 / 3)  # whitespace collapsed

    loops = [f"{w} is here. " + f"{w} is here and there " * 6 for w in ("cat", "dog", "fox", "owl")]
    looping = answer_stats(loops)
    assert looping["distinct_ratio"] == 1.0 and looping["repeated_ngram_fraction"] > REPEATED_NGRAM_MAX
    assert looping["degenerate"] and any("repeat" in r for r in looping["reasons"])

    empty = answer_stats(VARIED[:4] + ["", "   "])
    assert empty["empty_fraction"] == pytest.approx(2 / 6) and empty["empty_fraction"] > EMPTY_FRACTION_MAX
    assert empty["degenerate"]
    assert any("empty" in r for r in empty["reasons"])
    assert not answer_stats(VARIED[:5] + [""])["degenerate"]  # one empty answer of six: 17% <= 20%

    nothing = answer_stats([])
    assert nothing["degenerate"] and nothing["reasons"] == ["no answers"] and nothing["count"] == 0


def test_repeated_ngram_fraction():
    assert repeated_ngram_fraction("a b c".split()) is None
    assert repeated_ngram_fraction("a b c d".split()) == 0.0
    assert repeated_ngram_fraction("a b c d a b c d".split()) == pytest.approx(1 / 5)
    assert repeated_ngram_fraction(["x"] * 10) == pytest.approx(6 / 7)


def test_training_on_degenerate_answers_is_warned_about(closing, tmp_path, caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(closing["path"])
    degenerate = tmp_path / "degenerate.jsonl"
    degenerate.write_text("".join(json.dumps({"instruction": q, "input": "", "output": "hello world " * 20}) + "\n"
                                  for q in QUESTIONS))
    varied = tmp_path / "varied.jsonl"
    varied.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n"
                              for q, a in zip(QUESTIONS, VARIED)))
    caplog.set_level(logging.WARNING, logger="kdistill.recipes.lm")
    for source in (degenerate, varied):
        raw = run_config(None, closing["path"], source, tmp_path / "run")
        raw["objectives"] = {"ce": {"weight": 1.0}}  # SeqKD: cross-entropy on the answers
        cfg = config_from_dict(raw)
        dataset, report = load_split(cfg, tokenizer, str(source), "train", None, False)
        assert report.examples == len(QUESTIONS)  # a warning: the data is still used
    messages = [r.getMessage() for r in caplog.records if "degenerate" in r.getMessage()]
    assert len(messages) == 1 and messages[0].startswith(f"{degenerate}:")
    assert "distinct" in messages[0] and "repeat" in messages[0]
