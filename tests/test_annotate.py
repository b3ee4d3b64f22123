"""Teacher annotation: ChatClient against a scripted loopback server, LocalTeacher on tiny models, the
resumable runner (including a real SIGKILL), the answer parsers on the released PaLM outputs, export."""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdistill.errors import UserError

from chat_server import ChatServer, Reply
from kdistill.annotate import (
    AnnotationAborted,
    add_parser,
    annotate,
    export,
    load_annotations,
    parse_label,
    parse_rationale,
    render_few_shot,
)
from kdistill.generators import ChatClient, ChatError, LocalTeacher

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = DATA / "alpaca" / "alpaca_small_2000.jsonl"
SECRET = "sk-test-DO-NOT-LEAK-5f3a9c"


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"shared data file not found: {path}")
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _first_rows(path: Path, n: int) -> list[dict]:
    with _need(path).open() as fh:
        return [json.loads(line) for line in itertools.islice(fh, n)]


def _readable(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a line cut short by a kill
    return records


def _ok_per_key(out: Path) -> collections.Counter:
    return collections.Counter(r["key"] for r in _readable(out) if r["status"] == "ok")


# ----------------------------------------------------------------------------------------------------
# Parsers


PALM_FILES = ["dsbs_cqa/cqa_train.jsonl", "dsbs_cqa/cqa_test.jsonl", "dsbs_svamp/svamp_train.jsonl",
              "dsbs_svamp/svamp_test.jsonl"]


def _final_answer_sentence(palm_output: str) -> str:
    """The raw answer sentence as the original repo saw it (text before the first 'Q:', last 'answer is')."""
    body = palm_output.split("Q:")[0]
    found = list(re.finditer(r"answer is", body))
    return body[found[-1].end():].split("\n")[0].strip().rstrip(".").strip() if found else ""


@pytest.mark.parametrize("name", PALM_FILES)
def test_parse_rationale_reproduces_palm_labels(name):
    """>= 99% agreement with the stored palm_label on every row whose stored label is not an artefact of the
    original repo's parser. The artefacts (checked here, not just excluded):
    * CQA, answers naming two choices ("So the answer is either (a) aquarium or (e) pond."): the repo's
      re.split(r'\\(.\\)') kept the text between the markers, "aquarium or"; we return None (no single answer).
    * SVAMP, equations going on after a parenthesis ("The answer is (16 * 17) * 4."): the repo's greedy
      r'\\(.*\\)' kept only up to the last ')', "(16 * 17)"; we return the whole equation (or None when the
      output was cut mid-equation, "((415 - 309) - (41")."""
    rows = _jsonl(_need(DATA / name))
    agree = agree_clean = clean = rationale_agree = artefacts = 0
    for row in rows:
        parsed = parse_rationale(row["palm_output"])
        label, rationale = (parsed[1], parsed[0]) if parsed else ("", "")
        stored = row["palm_label"].strip()
        agree += label == stored
        rationale_agree += rationale == row["palm_rationale"].strip()
        sentence = _final_answer_sentence(row["palm_output"])
        if "cqa" in name and len(re.findall(r"\([a-e]\)", sentence)) > 1:
            artefacts += 1
            assert parsed is None, (stored, sentence)
        elif "svamp" in name and stored and sentence != stored and sentence.startswith(stored):
            artefacts += 1
            assert parsed is None or (label.startswith(stored) and label == sentence), (stored, label, sentence)
        else:
            clean += 1
            agree_clean += label == stored
    n = len(rows)
    print(f"\n{name}: palm_label agreement {agree}/{n} = {agree / n:.4f} (all rows); "
          f"{agree_clean}/{clean} = {agree_clean / clean:.4f} without the {artefacts} artefact rows; "
          f"palm_rationale agreement {rationale_agree}/{n} = {rationale_agree / n:.4f}")
    assert agree_clean / clean >= 0.99
    assert artefacts / n < 0.06


def test_parse_rationale_forms():
    assert parse_rationale("Birds fly. So the answer is (b) sky.\n\nQ: next question\nA: So the answer is (a) x.") \
        == ("Birds fly.", "sky")
    assert parse_rationale("2 + 2 = 4. The answer is 4.") == ("2 + 2 = 4.", "4")
    assert parse_rationale("Half of 7 is 3.5. Therefore, the answer is 3.5") == ("Half of 7 is 3.5.", "3.5")
    assert parse_rationale("It is in D.C. So the answer is (e) Washington D.C.") == ("It is in D.C.", "Washington D.C")
    assert parse_rationale("No answer sentence here.") is None
    assert parse_rationale("So the answer is either (a) pond or (b) lake.") is None
    assert parse_rationale("The answer is ((415 - 309) - (41") is None  # cut short
    # with a label set: matched and returned as spelled in the set
    assert parse_rationale("Mean words. So the answer is HATE.", ["hate", "noHate"]) == ("Mean words.", "hate")
    assert parse_rationale("So the answer is maybe.", ["hate", "noHate"]) is None


def test_parse_label_forms():
    labels = ["positive", "negative", "neutral"]
    assert parse_label("Positive.", labels) == "positive"
    assert parse_label("  NEGATIVE  ", labels) == "negative"
    assert parse_label("I'd say the answer is: neutral, because ...", labels) == "neutral"
    assert parse_label("Label: negative", labels) == "negative"
    assert parse_label("The review is clearly positive in tone.", labels) == "positive"
    assert parse_label("positive or negative, hard to say", labels) is None  # two labels
    assert parse_label("banana", labels) is None
    # a label inside a longer one does not count; spacing/case variants of a label do
    assert parse_label("noHate", ["hate", "noHate"]) == "noHate"
    assert parse_label("No hate.", ["hate", "noHate"]) == "noHate"
    assert parse_label("This is hate speech.", ["hate", "noHate"]) == "hate"
    with pytest.raises(ValueError):
        parse_label("x", ["Yes", "yes."])  # indistinguishable labels


def test_render_few_shot():
    shots = [{"question": "2+2?", "rationale": "2 plus 2 is 4.", "answer": "4"}]
    assert render_few_shot(shots, "rationale") == "Q: 2+2?\nA: 2 plus 2 is 4. So the answer is 4.\n\n"
    assert render_few_shot([{"text": "great", "label": "positive"}], "label") == "Text: great\nLabel: positive\n\n"
    assert render_few_shot(None) == ""


# ----------------------------------------------------------------------------------------------------
# ChatClient + runner against the scripted server


def _label_of(text: str) -> str:
    return "hate" if "hate" in text.split() else "noHate"


def test_scripted_failures_retries_rerun_and_no_key_leak(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("KD_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    rows = [{"id": i, "text": f"row {i} {'hate' if i % 2 else 'fine'} words"} for i in range(10)]
    phase = {"n": 1}
    gaps = {}

    def script(request, attempt):
        prompt = request["messages"][-1]["content"]
        row = int(re.search(r"row (\d+)", prompt.split("Text:")[-1]).group(1))
        good = "The answer is " + _label_of(prompt.split("Text:")[-1])
        if phase["n"] == 2:
            return "I am unsure" if row == 9 else good  # row 9 stays unparsable
        if row == 0:  # rate limited once, with a (tiny) Retry-After
            gaps.setdefault(0, []).append(time.monotonic())
            return Reply.http_status(429, retry_after=0.3) if attempt == 1 else good
        if row == 1:
            return Reply.http_status(500, error="overloaded")
        if row == 2:
            return Reply.answer("Well, it depends.")  # no label -> unparsable
        if row == 3:
            return Reply.hang(4) if attempt == 1 else good  # timeout, then ok on retry
        if row == 4:
            return Reply.hang(4)  # always times out -> failed
        if row == 5:  # a non-retryable 4xx whose message echoes the key
            return Reply.http_status(400, error=f"bad request (key {SECRET} rejected)")
        if row == 6 and attempt == 1:
            return Reply.garbage()
        if row == 9:
            return "I am unsure"
        return good

    with ChatServer(script) as server:
        client = ChatClient(server.url, "scripted-model", api_key_env="KD_TEST_KEY", timeout=1.0, max_retries=2,
                            backoff=0.01, max_backoff=0.05, params={"temperature": 0, "max_tokens": 8})
        assert SECRET not in repr(client) and SECRET not in json.dumps(vars(client), default=str)
        out = tmp_path / "labels.jsonl"
        summary = annotate(rows, client, "label", out, labels=["hate", "noHate"], concurrency=4)
        assert (summary.done, summary.failed, summary.unparsable, summary.skipped_done, summary.total) == (5, 3, 2, 0, 10)
        last = load_annotations(out)
        by_row = {r["row"]["id"]: r for r in last.values()}
        assert by_row[0]["status"] == "ok" and by_row[0]["label"] == "noHate"
        assert gaps[0][1] - gaps[0][0] >= 0.3  # Retry-After honoured
        assert by_row[1]["status"] == "failed" and "HTTP 500" in by_row[1]["error"] and "overloaded" in by_row[1]["error"]
        assert "3 attempt" in by_row[1]["error"]
        assert by_row[2]["status"] == "unparsable" and by_row[2]["output"] == "Well, it depends."
        assert by_row[3]["status"] == "ok"
        assert by_row[4]["status"] == "failed" and "timed out" in by_row[4]["error"]
        assert by_row[5]["status"] == "failed" and "HTTP 400" in by_row[5]["error"] and "***" in by_row[5]["error"]
        assert by_row[6]["status"] == "ok"
        assert by_row[9]["status"] == "unparsable"
        attempts = collections.Counter(int(re.search(r"row (\d+)", r["json"]["messages"][-1]["content"]
                                                     .split("Text:")[-1]).group(1)) for r in server.requests)
        assert attempts[1] == 3 and attempts[4] == 3 and attempts[5] == 1 and attempts[3] == 2
        for r in server.requests:
            assert r["headers"]["authorization"] == f"Bearer {SECRET}"
            assert SECRET not in r["body"]
            assert r["json"]["model"] == "scripted-model" and r["json"]["temperature"] == 0

        # a direct ChatError names the status but not the key
        with pytest.raises(ChatError) as info:
            client.complete([{"role": "user", "content": "Text: row 5 x"}])
        assert info.value.status == 400 and "HTTP 400" in str(info.value) and SECRET not in str(info.value)

        # rerun: only failed/unparsable rows are sent again; they become ok (row 9 stays unparsable)
        phase["n"] = 2
        before = len(server.requests)
        summary = annotate(rows, client, "label", out, labels=["hate", "noHate"], concurrency=4)
        assert (summary.done, summary.failed, summary.unparsable, summary.skipped_done) == (4, 0, 1, 5)
        assert len(server.requests) - before == 5
        assert all(n == 1 for n in _ok_per_key(out).values()) and len(_ok_per_key(out)) == 9
        last = load_annotations(out)
        assert {r["row"]["id"]: r["label"] for r in last.values() if r["status"] == "ok"} == {
            i: ("hate" if i % 2 else "noHate") for i in range(9)}

        # a third run with retry_failed=False leaves row 9 alone
        summary = annotate(rows, client, "label", out, labels=["hate", "noHate"], retry_failed=False, progress=False)
        assert (summary.done, summary.skipped_done, summary.skipped_failed) == (0, 9, 1)


    dest = tmp_path / "clean.jsonl"
    assert export(out, dest) == 9
    exported = _jsonl(dest)
    assert all(r["llm_label"] == ("hate" if r["id"] % 2 else "noHate") for r in exported)
    captured = capsys.readouterr()
    assert "annotate:" in captured.err  # the summary
    for text in (out.read_text(), dest.read_text(), caplog.text, captured.out, captured.err):
        assert SECRET not in text


def test_no_key_no_authorization_and_fatal_status_stops(tmp_path, monkeypatch):
    monkeypatch.delenv("KD_TEST_KEY", raising=False)
    with ChatServer(lambda request, attempt: Reply.http_status(401, error="invalid api key")) as server:
        client = ChatClient(server.url, "m", api_key_env="KD_TEST_KEY", max_retries=3, backoff=0.01)
        rows = [{"prompt": f"p{i}", "completion": "c"} for i in range(20)]
        with pytest.raises(AnnotationAborted, match="HTTP 401"):
            annotate(rows, client, "output", tmp_path / "out.jsonl", concurrency=2, progress=False)
        assert len(server.requests) <= 3  # stopped at once, not 20 rows x 4 attempts
        assert all("authorization" not in r["headers"] for r in server.requests)
    assert all(r["status"] == "failed" for r in _jsonl(tmp_path / "out.jsonl"))


def test_rationale_task_with_palm_answers(tmp_path):
    """CoT annotation of CommonsenseQA rows, the scripted teacher answering with the released PaLM outputs."""
    rows = _first_rows(DATA / "dsbs_cqa" / "cqa_test.jsonl", 6)
    palm = {row["question"]: row["palm_output"] for row in rows}
    few_shot = [{"question": "What do people use to absorb extra ink from a fountain pen?",
                 "choices": ["shirt pocket", "calligrapher's hand", "inkwell", "desk drawer", "blotter"],
                 "rationale": "The answer must be used to absorb extra ink. Blotters absorb ink.",
                 "answer": "(e) blotter"}]
    seen = []

    def script(request, attempt):
        prompt = request["messages"][-1]["content"]
        seen.append(prompt)
        question = prompt.rsplit("Q: ", 1)[1].split("\nAnswer Choices:")[0]
        return palm[question]

    with ChatServer(script) as server:
        client = ChatClient(server.url, "palm", max_retries=0)
        summary = annotate(rows, client, "rationale", tmp_path / "cot.jsonl", few_shot=few_shot, progress=False)
    assert "So the answer is (e) blotter.\n\nQ: " in seen[0] and "\nAnswer Choices:\n(a) " in seen[0]
    assert seen[0].rstrip().endswith("A:")
    records = load_annotations(tmp_path / "cot.jsonl")
    for record in records.values():
        expected = parse_rationale(record["row"]["palm_output"])
        if expected is None:
            assert record["status"] == "unparsable"
        else:
            assert record["status"] == "ok" and (record["rationale"], record["label"]) == expected
            assert record["label"] == record["row"]["palm_label"].strip()
    assert summary.done + summary.unparsable == 6 and summary.done >= 5
    n = export(tmp_path / "cot.jsonl", tmp_path / "cot_clean.jsonl")
    clean = _jsonl(tmp_path / "cot_clean.jsonl")
    assert n == summary.done and all(r["llm_label"] and r["llm_rationale"] and r["question"] for r in clean)


def test_bad_rows_are_reported_before_anything_is_sent(tmp_path):
    with ChatServer() as server:
        client = ChatClient(server.url, "m", max_retries=0)
        from kdistill.data.records import DataValidationError

        with pytest.raises(DataValidationError) as info:
            annotate([{"text": "ok"}, {"other": 1}, {"text": "fine"}], client, "output", tmp_path / "o.jsonl",
                     template="{text} / {missing}", progress=False)
        assert "rows[0]: the template needs field {missing}" in str(info.value)
        assert len(info.value.errors) == 3 and not server.requests
        with pytest.raises(ValueError, match="label set"):
            annotate([{"text": "x"}], client, "label", tmp_path / "o.jsonl", progress=False)


def test_truncated_last_line_is_ignored_and_resumed_after(tmp_path, caplog):
    with ChatServer(lambda request, attempt: "answer " + request["messages"][-1]["content"]) as server:
        client = ChatClient(server.url, "m", max_retries=0)
        rows = [{"instruction": f"say {i}"} for i in range(5)]
        out = tmp_path / "o.jsonl"
        annotate(rows[:3], client, "output", out, progress=False)
        with out.open("a") as fh:  # a record cut short, as by a kill mid-write
            fh.write('{"key": "abc", "status": "ok", "row": {"instr')
        summary = annotate(rows, client, "output", out, progress=False)
        assert (summary.done, summary.skipped_done) == (2, 3)
        assert "o.jsonl:4: ignoring an unreadable annotation record" in caplog.text
        records = load_annotations(out)
        assert len(records) == 5 and all(r["status"] == "ok" for r in records.values())
        lines = out.read_text().split("\n")
        assert lines[3].startswith('{"key": "abc"') and json.loads(lines[4])["status"] == "ok"


def test_resume_after_sigkill(tmp_path):
    """A real `python -m kdistill.annotate` is SIGKILLed mid-run and rerun: every row ends with exactly one ok
    record, the records written before the kill are kept, a half-written line is skipped with a warning."""
    rows = _first_rows(ALPACA, 40)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, dest = tmp_path / "ann.jsonl", tmp_path / "seqkd.jsonl"

    def script(request, attempt):
        return Reply.answer("Teacher says: " + request["messages"][-1]["content"][:30], delay=0.15)

    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    with ChatServer(script) as server:
        cmd = [sys.executable, "-m", "kdistill.annotate", "--data", str(data), "--out", str(out),
               "--base-url", server.url, "--api-model", "tiny-teacher", "--concurrency", "2", "--no-progress",
               "--max-new-tokens", "64"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if out.exists() and out.read_text().count("\n") >= 6:
                break
            if proc.poll() is not None:
                pytest.fail(f"annotate ended before it was killed: {proc.communicate()}")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        first_run = _readable(out)
        assert 6 <= len(first_run) < 40
        if out.read_text().endswith("\n"):
            with out.open("a") as fh:  # as if the kill had landed in the middle of a write
                fh.write(json.dumps(first_run[0])[:50])

        done = subprocess.run(cmd + ["--export", str(dest)], env=env, capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert "unreadable annotation record" in done.stderr
    assert f"{40 - len(first_run)} done" in done.stdout and f"{len(first_run)} skipped" in done.stdout

    records = [json.loads(line) for line in out.read_text().splitlines()[:len(first_run)]]
    assert records == first_run  # nothing written before the kill was touched
    ok = _ok_per_key(out)
    assert len(ok) == 40 and set(ok.values()) == {1}
    last = load_annotations(out)
    ok_rows = [r["row"] for r in last.values() if r["status"] == "ok"]
    assert sorted(json.dumps(r, sort_keys=True) for r in ok_rows) == sorted(json.dumps(r, sort_keys=True) for r in rows)
    assert all(r["teacher"] == "tiny-teacher" and r["params"] == {"max_tokens": 64, "temperature": 0.0}
               for r in last.values())

    exported = _jsonl(dest)
    assert len(exported) == 40
    by_instruction = {(r["instruction"], r["input"]): r for r in rows}
    for row in exported:
        original = by_instruction[(row["instruction"], row["input"])]
        user = original["instruction"] + ("\n\n" + original["input"] if original["input"] else "")
        assert row["output"] == ("Teacher says: " + user[:30]).strip()
    from kdistill.data.records import load_examples

    assert len(load_examples(str(dest)).examples) == 40  # trainable SeqKD data


def test_cli_parser_registers_annotate():
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["annotate", "--data", "d.jsonl", "--out", "o.jsonl", "--task", "label",
                              "--labels", "a,b", "--base-url", "http://127.0.0.1:1/v1", "--api-model", "m"])
    assert args.command == "annotate" and args.task == "label" and args.labels == "a,b" and args.concurrency == 4
    with pytest.raises(SystemExit):  # --model and --base-url are exclusive
        parser.parse_args(["annotate", "--data", "d", "--out", "o", "--model", "x", "--base-url", "y"])


# ----------------------------------------------------------------------------------------------------
# LocalTeacher on tiny config-built models


@pytest.fixture(scope="module")
def tiny_models():
    from kdistill.apps.tiny import build_model, decoder_config, t5_config, train_tokenizer

    rows = _first_rows(ALPACA, 300)
    texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in rows]
    models = {}
    for kind in ("causal", "t5"):
        tokenizer = train_tokenizer(texts, vocab_size=300, kind="decoder" if kind == "causal" else "t5")
        if kind == "causal":
            config = decoder_config(tokenizer, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1)
            config.initializer_range = 0.5  # peaked logits: no near-ties for greedy decoding to flip on
        else:
            config = t5_config(tokenizer, d_model=32, num_layers=2, num_heads=2, d_kv=16)
            config.initializer_factor = 5.0
        models[kind] = (build_model(config, seed=0), tokenizer)
    return models, rows


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_local_teacher_batched_equals_one_by_one(tiny_models, kind):
    from kdistill.data.records import Example

    models, rows = tiny_models
    model, tokenizer = models[kind]
    teacher = LocalTeacher(model, tokenizer=tokenizer, batch_size=4, max_new_tokens=10)
    # the causal model's ChatML template ends turns with <|im_end|> (not its EOS); the T5 tokenizer has no template
    stops = {"stop_tokens": ["<|im_end|>"]} if kind == "causal" else {}
    assert teacher.params == {"max_new_tokens": 10, "do_sample": False, **stops}
    prompts = [teacher.render(Example("alpaca", {"instruction": r["instruction"], "input": r["input"]}, "t"))
               for r in rows[:9]]
    if kind == "causal":
        assert prompts[0].startswith("<|im_start|>user\n") and prompts[0].endswith("<|im_start|>assistant\n")
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1  # padding is really exercised
    batched = teacher.generate(prompts)
    single = [teacher.generate([p])[0] for p in prompts]
    assert batched == single
    assert any(batched)

    sampler = LocalTeacher(model, tokenizer=tokenizer, batch_size=4, max_new_tokens=10, temperature=0.9, top_p=0.95,
                           seed=7)
    assert sampler.params == {"max_new_tokens": 10, "do_sample": True, "temperature": 0.9, "top_p": 0.95, "seed": 7,
                              **stops}
    assert sampler.generate(prompts[:5]) == sampler.generate(prompts[:5])  # seeded


def test_local_teacher_annotate_output_and_export(tiny_models, tmp_path):
    from kdistill.data.records import load_examples

    models, rows = tiny_models
    model, tokenizer = models["causal"]
    rows = rows[:12]
    teacher = LocalTeacher(model, tokenizer=tokenizer, batch_size=5, max_new_tokens=8, min_new_tokens=4,
                           teacher_id="tiny-causal")
    out = tmp_path / "seqkd.jsonl"
    summary = annotate(rows, teacher, "output", out, progress=False)
    assert (summary.done, summary.failed, summary.unparsable, summary.total) == (12, 0, 0, 12)
    records = _jsonl(out)
    assert len(records) == 12 and len(_ok_per_key(out)) == 12
    assert all(r["teacher"] == "tiny-causal" and r["params"] == teacher.params for r in records)
    assert teacher.params == {"max_new_tokens": 8, "do_sample": False, "min_new_tokens": 4,
                              "stop_tokens": ["<|im_end|>"]}
    assert records[0]["prompt"].startswith("<|im_start|>user\n")

    again = annotate(rows, teacher, "output", out, progress=False)  # resume: nothing to do
    assert (again.done, again.skipped_done) == (0, 12) and len(_jsonl(out)) == 12

    dest = tmp_path / "clean.jsonl"
    assert export(out, dest) == 12
    exported = _jsonl(dest)
    answers = {r["row"]["instruction"]: r["output"].strip() for r in records}
    for row in exported:
        assert set(row) >= {"instruction", "input", "output"} and row["output"] == answers[row["instruction"]]
    assert len(load_examples(str(dest)).examples) == 12
    assert export(out, tmp_path / "msgs.jsonl", format="messages") == 12
    assert _jsonl(tmp_path / "msgs.jsonl")[0]["messages"][-1]["role"] == "assistant"

    # other generation parameters: one file holds one configuration, so appending to it is refused (#12)
    changed = LocalTeacher(model, tokenizer=tokenizer, batch_size=5, max_new_tokens=6, teacher_id="tiny-causal")
    with pytest.raises(UserError, match="another teacher, task or generation parameters"):
        annotate(rows[:3], changed, "output", out, progress=False)
    assert len(_jsonl(out)) == 12
    assert annotate(rows[:3], changed, "output", tmp_path / "other.jsonl", progress=False).done == 3


def test_local_t5_teacher_annotates(tiny_models, tmp_path):
    models, rows = tiny_models
    model, tokenizer = models["t5"]
    teacher = LocalTeacher(model, tokenizer=tokenizer, batch_size=4, max_new_tokens=6, min_new_tokens=3)
    summary = annotate(rows[:6], teacher, "output", tmp_path / "t5.jsonl", progress=False)
    assert summary.done + summary.unparsable == 6 and summary.failed == 0
    assert load_annotations(tmp_path / "t5.jsonl")
