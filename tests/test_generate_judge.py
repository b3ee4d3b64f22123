"""kdistill.evaluation.generate / judge: test-set generation and an LLM judge against a loopback server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chat_server import ChatServer, Reply
from kdistill.evaluation.generate import generate_file
from kdistill.evaluation.judge import (DIMENSIONS, judge_file, judge_pairwise, parse_judgement, parse_verdict)
from kdistill.generators import ChatClient

GOOD = {"Correctness": 4, "Completeness": 3, "Relevance": 5, "Fluency": 2}


def _j(scores=None, **extra) -> str:
    return json.dumps({**(scores or GOOD), **extra})


def _lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _answers_file(path: Path, rows: list[tuple[str, str]]) -> Path:
    """A generate-format file: rows of (instruction, answer)."""
    with path.open("w") as fh:
        for i, (instruction, answer) in enumerate(rows):
            fh.write(json.dumps({"key": f"k{i}", "status": "ok", "instruction": instruction, "input": "",
                                 "reference_output": "ref", "generate_output": answer}) + "\n")
    return path


def _instruction(request) -> str:
    text = request["messages"][-1]["content"]
    return re.search(r"\[Instruction\]\n(.*?)\n", text).group(1)


# ----------------------------------------------------------------------------------------------------
# parse_judgement


@pytest.mark.parametrize("text, expected", [
    (_j(), GOOD),
    ("```json\n" + _j() + "\n```", GOOD),
    ("Here is my rating:\n" + _j(reason="ok {fine}") + "\nHope that helps.", GOOD),
    ('{"correctness": 4, "COMPLETENESS": 3, " Relevance ": 5, "fluency": 2}', GOOD),
    ('{"Correctness": 4.0, "Completeness": "3", "Relevance": 5, "Fluency": 2}', GOOD),
    ('{"scores": ' + _j() + ', "explanation": "x"}', GOOD),
    ('{"Correctness": 4, "Completeness": 3, "Relevance": 5}', None),  # missing key
    ('{"Correctness": "good", "Completeness": 3, "Relevance": 5, "Fluency": 2}', None),  # non-number
    ('{"Correctness": true, "Completeness": 3, "Relevance": 5, "Fluency": 2}', None),  # bool
    ('{"Correctness": null, "Completeness": 3, "Relevance": 5, "Fluency": 2}', None),  # null
    ('{"Correctness": 4.5, "Completeness": 3, "Relevance": 5, "Fluency": 2}', None),  # fraction
    ('{"Correctness": 6, "Completeness": 3, "Relevance": 5, "Fluency": 2}', None),  # out of range
    ('{"Correctness": -1, "Completeness": 3, "Relevance": 5, "Fluency": 2}', None),  # out of range
    ("The answer is correct and fluent, I would give it 4/5.", None),  # prose only
    ('{"Correctness": 4, "Completeness": 3, "Relevance": 5, "Fluency": ', None),  # broken JSON
    ("", None),
])
def test_parse_judgement(text, expected):
    assert parse_judgement(text, DIMENSIONS) == expected


def test_parse_judgement_custom_dimensions_and_verdicts():
    assert parse_judgement('{"helpfulness": 1}', ["Helpfulness"]) == {"Helpfulness": 1}
    assert parse_judgement(_j(), ["Helpfulness"]) is None
    assert parse_verdict('```json\n{"winner": "1"}\n```') == "1"
    assert parse_verdict('I think {"Winner": 2}') == "2"
    assert parse_verdict('{"winner": "TIE"}') == "tie"
    assert parse_verdict('{"winner": "3"}') is None
    assert parse_verdict("answer 1 is better") is None


# ----------------------------------------------------------------------------------------------------
# judge_file against the loopback server


def test_judge_file_scripted(tmp_path):
    other = {"Correctness": 2, "Completeness": 1, "Relevance": 3, "Fluency": 4}

    def script(request, attempt):
        name = _instruction(request)
        if name == "good":
            return _j()
        if name == "fenced":
            return "Sure.\n```json\n" + _j(other) + "\n```"
        if name == "prose-then-good":
            return "It is a fine answer." if attempt < 3 else _j()
        if name == "prose-always":
            return "It is a fine answer, 4 out of 5."
        if name == "out-of-range":
            return _j({**GOOD, "Fluency": 7})
        if name == "rate-limited":
            return Reply.http_status(429, retry_after=0) if attempt == 1 else _j(other)
        if name == "hang":
            return Reply.hang(3) if attempt == 1 else _j()
        raise AssertionError(name)

    names = ["good", "fenced", "prose-then-good", "prose-always", "out-of-range", "rate-limited", "hang"]
    answers = _answers_file(tmp_path / "a.jsonl", [(n, f"answer {n}") for n in names])
    out = tmp_path / "judge.jsonl"
    with ChatServer(script) as server:
        client = ChatClient(server.url, "judge", timeout=0.5, max_retries=3, backoff=0.0)
        summary = judge_file(answers, out, client, "judge", max_invalid_retries=2, concurrency=4, progress=False)
        asked = len(server.requests)
        # valid: good, fenced(other), prose-then-good, rate-limited(other), hang -> 3x GOOD + 2x other
        assert (summary.valid, summary.invalid, summary.total) == (5, 2, 7)
        for d in DIMENSIONS:
            assert summary.means[d] == pytest.approx((3 * GOOD[d] + 2 * other[d]) / 5)
        by_name = {r["instruction"]: r for r in _lines(out)}
        assert by_name["prose-always"]["status"] == "unparsable" and by_name["prose-always"]["attempts"] == 3
        assert by_name["out-of-range"]["attempts"] == 3 and by_name["out-of-range"]["scores"] is None
        assert by_name["prose-then-good"]["attempts"] == 3 and by_name["prose-then-good"]["scores"] == GOOD
        assert server.attempts_for(next(r["json"]["messages"] for r in server.requests
                                        if _instruction(r["json"]) == "hang")) == 2

        again = judge_file(answers, out, client, "judge", progress=False)  # all cached: no request
        assert len(server.requests) == asked
        assert (again.valid, again.invalid, again.cached, again.judged) == (5, 2, 7, 0)
        assert again.means == summary.means
        # another dimension list is another cache key
        custom = judge_file(answers, out, client, "judge", dimensions=["Correctness"], max_invalid_retries=0,
                            progress=False)
        # prose-then-good gets one try only (invalid); out-of-range's bad Fluency is no longer asked for (valid)
        assert (custom.judged, custom.valid, custom.invalid) == (7, 5, 2)
        assert custom.means == {"Correctness": pytest.approx((3 * 4 + 2 * 2) / 5)}


# ----------------------------------------------------------------------------------------------------
# Pairwise


def test_pairwise_position_swap(tmp_path):
    rows = [f"q{i}" for i in range(6)]
    a = _answers_file(tmp_path / "a.jsonl", [(q, "a long detailed answer" if i < 4 else "short") for i, q in
                                             enumerate(rows)])
    b = _answers_file(tmp_path / "b.jsonl", [(q, "short" if i < 4 else "a much longer and better answer") for i, q
                                             in enumerate(rows)] + [("only-in-b", "x")])

    with ChatServer(lambda request, attempt: '{"winner": "1"}') as server:
        client = ChatClient(server.url, "judge", backoff=0.0)
        s = judge_pairwise(a, b, tmp_path / "p1.jsonl", client, progress=False)
        assert (s.wins_a, s.ties, s.wins_b, s.valid, s.invalid, s.total) == (0, 6, 0, 6, 0, 6)
        assert s.win_rate == 0.5 and s.only_b == 1
        assert len(server.requests) == 12

    def longer(request, attempt):
        text = request["messages"][-1]["content"]
        if _instruction(request) == "q5":
            return "Both are fine."  # never valid
        one = re.search(r"\[Answer 1\]\n(.*?)\n\[End of answer 1\]", text, re.S).group(1)
        two = re.search(r"\[Answer 2\]\n(.*?)\n\[End of answer 2\]", text, re.S).group(1)
        return json.dumps({"winner": "1" if len(one) > len(two) else "2"})

    with ChatServer(longer) as server:
        client = ChatClient(server.url, "judge", backoff=0.0)
        out = tmp_path / "p2.jsonl"
        s = judge_pairwise(a, b, out, client, max_invalid_retries=1, progress=False)
        assert (s.wins_a, s.ties, s.wins_b, s.valid, s.invalid) == (4, 0, 1, 5, 1)
        assert s.win_rate == pytest.approx(4 / 5)
        records = {r["instruction"]: r for r in _lines(out)}
        assert records["q0"]["verdicts"] == ["A", "A"] and records["q4"]["verdicts"] == ["B", "B"]
        assert records["q5"]["status"] == "unparsable" and records["q5"]["attempts"] == 2


# ----------------------------------------------------------------------------------------------------
# generate


def _alpaca_rows(alpaca_small: Path, n: int, path: Path) -> Path:
    lines = alpaca_small.read_text().splitlines()[:n]
    path.write_text("\n".join(lines) + "\n")
    return path


def _kill_when(proc, path: Path, min_lines: int, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= min_lines:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def test_generate_format_and_resume_after_kill(tmp_path, tiny_causal, alpaca_small):
    data = _alpaca_rows(alpaca_small, 24, tmp_path / "test.jsonl")
    out = tmp_path / "gen.jsonl"
    cmd = [sys.executable, "-m", "kdistill.evaluation.generate", "--model", tiny_causal["teacher"], "--data",
           str(data), "--out", str(out), "--batch-size", "2", "--max-new-tokens", "8", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when(proc, out, 4)
    first = len(_lines(out)) if out.exists() else 0
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 0 < first < 24

    summary = generate_file(tiny_causal["teacher"], data, out, max_new_tokens=8, batch_size=2, progress=False)
    assert summary.skipped == first and summary.generated == 24 - first and summary.total == 24
    records = _lines(out)
    assert len(records) == 24 and len({r["key"] for r in records}) == 24
    source = [json.loads(line) for line in data.read_text().splitlines()]
    assert sorted((r["instruction"], r["input"], r["reference_output"]) for r in records) == \
        sorted((s["instruction"], s["input"], s["output"]) for s in source)
    for r in records:
        assert set(r) == {"instruction", "input", "reference_output", "generate_output", "key", "status", "model",
                          "params", "chat_template", "source", "time"}
        assert isinstance(r["generate_output"], str)
        # the tiny models' ChatML template ends a turn with <|im_end|>, which is not their EOS: a stop (#14)
        assert r["params"] == {"max_new_tokens": 8, "do_sample": False, "stop_tokens": ["<|im_end|>"]}

    again = generate_file(tiny_causal["teacher"], data, out, max_new_tokens=8, batch_size=2, progress=False)
    assert (again.generated, again.skipped) == (0, 24)


def test_generate_prompt_completion_and_limit(tmp_path, tiny_causal):
    data = tmp_path / "pc.jsonl"
    rows = [{"prompt": "Say hi", "completion": "hi"}, {"prompt": "Say hi", "completion": "hi"},
            {"messages": [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "red"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "g.jsonl"
    s = generate_file(tiny_causal["teacher"], data, out, max_new_tokens=4, temperature=0.8, seed=1,
                      chat_template=False, progress=False)
    records = _lines(out)
    assert s.generated == 3 and len(records) == 3  # the duplicate row still gets its own output row
    assert [(r["instruction"], r["reference_output"]) for r in records] == \
        [("Say hi", "hi"), ("Say hi", "hi"), ("Name a colour", "red")]
    assert records[0]["params"]["do_sample"] is True and records[0]["params"]["seed"] == 1
    assert generate_file(tiny_causal["teacher"], data, tmp_path / "h.jsonl", max_new_tokens=4, limit=1,
                         progress=False).total == 1


# ----------------------------------------------------------------------------------------------------
# judge resume after kill


def test_judge_resume_after_kill(tmp_path):
    answers = _answers_file(tmp_path / "a.jsonl", [(f"q{i}", f"answer {i}") for i in range(20)])
    out = tmp_path / "judge.jsonl"
    with ChatServer(lambda request, attempt: Reply.answer(_j(), delay=0.15)) as server:
        cmd = [sys.executable, "-m", "kdistill.evaluation.judge", "--answers", str(answers), "--base-url",
               server.url, "--api-model", "judge", "--out", str(out), "--concurrency", "2", "--no-progress",
               "--api-key-env", "KDISTILL_TEST_NO_KEY"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _kill_when(proc, out, 4)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        first = len(_lines(out))
        assert 0 < first < 20
        client = ChatClient(server.url, "judge", backoff=0.0, params={"temperature": 0.0, "max_tokens": 512})
        summary = judge_file(answers, out, client, "judge", progress=False)
        assert summary.cached == first and summary.judged == 20 - first
        assert (summary.valid, summary.invalid, summary.total) == (20, 0, 20)
        assert summary.means == {d: float(v) for d, v in GOOD.items()}
        records = _lines(out)
        assert len(records) == 20 and len({r["key"] for r in records}) == 20
        assert len(server.requests) <= 20 + 2  # at most the requests in flight at the kill are asked again
