"""`kdistill serve-teacher`: vLLM's /v1/completions with prompt_logprobs over a tiny causal LM, checked against a
local computation with the same weights; request checks; batching of concurrent requests; the CLI end to end."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from kdistill.cli import main  # noqa: E402
from kdistill.errors import UserError  # noqa: E402
from kdistill.serve import create_app, prompt_logprobs, require_serve_dependencies  # noqa: E402

from conftest import REPO  # noqa: E402

NAME = "tiny-teacher"


@pytest.fixture(scope="module")
def teacher(tiny_causal):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal["teacher"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_causal["teacher"])


def make_app(teacher, **kwargs):
    model, tokenizer = teacher
    kwargs = {"served_model_name": NAME, "max_model_len": 64, **kwargs}
    return create_app(model, tokenizer, **kwargs)


@pytest.fixture(scope="module")
def client(teacher):
    with TestClient(make_app(teacher)) as c:
        yield c


def reference(model, ids, temperature=1.0, vocab=None):
    """log_softmax(logits / T) of one unpadded prompt over the tokenizer's `vocab` entries (the tiny teacher's
    output layer is padded 64 rows past it; those rows are never tokens): (n, V), row i predicting token i + 1."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    vocab = vocab or model.config.vocab_size - 64  # make_tiny_pair pads the teacher 64 rows past its tokenizer
    return torch.log_softmax(logits[:, :vocab] / temperature, dim=-1)


def prompts_of(tokenizer, *texts):
    return [tokenizer(t)["input_ids"] for t in texts]


def complete(client, prompt, **fields):
    body = {"model": NAME, "prompt": prompt, "max_tokens": 1, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
            "repetition_penalty": 1.0, "logprobs": None, **fields}
    return client.post("/v1/completions", json=body)


def check_against(entries, ids, ref, k):
    """entries (the server's prompt_logprobs) equal the top-k of `ref` plus the actual token with its rank."""
    assert len(entries) == len(ids) and entries[0] is None
    for i in range(1, len(ids)):
        row = ref[i - 1]
        top = row.topk(k).indices.tolist()
        entry = entries[i]
        assert [int(t) for t in entry][:k] == top, f"position {i}"
        for token, info in entry.items():
            token = int(token)
            assert info["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
            assert info["rank"] == int((row > row[token]).sum()) + 1
        expected = k if ids[i] in top else k + 1
        assert len(entry) == expected and str(ids[i]) in entry


# --------------------------------------------------------------------------------------------- the pure function
def test_prompt_logprobs_by_hand():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    entries = prompt_logprobs(logits, [9, 3, 1], k=2, decode=lambda t: f"<{t}>")
    assert entries[0] is None and len(entries) == 3
    lp = torch.log_softmax(logits, dim=-1)
    # position 1 predicts token 3 from row 0: top-2 are 1, 2; token 3 is 4th of 4
    assert list(entries[1]) == ["1", "2", "3"]
    assert entries[1]["3"] == {"logprob": pytest.approx(float(lp[0, 3])), "rank": 4, "decoded_token": "<3>"}
    assert entries[1]["1"]["rank"] == 1 and entries[1]["2"]["rank"] == 2
    # position 2 predicts token 1 from row 1: ids 1 and 2 tie behind 3, so token 1's rank is 3 (two are larger)
    assert list(entries[2])[:2] == ["0", "3"] and entries[2]["1"]["rank"] == 3
    # temperature divides the logits; k = 0 lists the actual token only; -inf is floored for JSON
    hot = prompt_logprobs(logits, [9, 3], k=0, decode=str, temperature=2.0)
    assert list(hot[1]) == ["3"]
    assert hot[1]["3"]["logprob"] == pytest.approx(float(torch.log_softmax(logits[0] / 2, -1)[3]))
    masked = prompt_logprobs(torch.tensor([[0.0, -float("inf")]]).repeat(2, 1), [0, 1], k=1, decode=str)
    assert masked[1]["1"] == {"logprob": -9999.0, "rank": 2, "decoded_token": "1"}


# --------------------------------------------------------------------------------------------- the wire contract
def test_prompt_logprobs_equal_a_local_computation(client, teacher):
    model, tokenizer = teacher
    prompts = prompts_of(tokenizer, "Give three tips for staying healthy.", "What is the capital of France?")
    r = complete(client, prompts, prompt_logprobs=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == NAME and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice, ids in zip(body["choices"], prompts):
        ref = reference(model, ids)
        check_against(choice["prompt_logprobs"], ids, ref, 5)
        assert choice["text"] == tokenizer.decode([int(ref[-1].argmax())], skip_special_tokens=True)
        assert choice["finish_reason"] in ("length", "stop") and choice["logprobs"] is None
        some = next(iter(choice["prompt_logprobs"][1].items()))
        assert some[1]["decoded_token"] == tokenizer.decode([int(some[0])])
    n = sum(len(p) for p in prompts)
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 2, "total_tokens": n + 2}


def test_actual_token_outside_the_top_k_carries_its_true_rank(client, teacher):
    model, tokenizer = teacher
    ids = tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]
    for _ in range(4):  # greedy continuations: positions where the actual token IS the top-1
        ids.append(int(reference(model, ids)[-1].argmax()))
    r = complete(client, ids, prompt_logprobs=1, max_tokens=0)
    entries = r.json()["choices"][0]["prompt_logprobs"]
    ref = reference(model, ids)
    check_against(entries, ids, ref, 1)
    sizes = [len(e) for e in entries[1:]]
    assert 1 in sizes and 2 in sizes  # both cases happen in this prompt
    outside = [i for i in range(1, len(ids)) if len(entries[i]) == 2]
    assert all(entries[i][str(ids[i])]["rank"] > 1 for i in outside)
    assert r.json()["choices"][0]["text"] == "" and r.json()["usage"]["completion_tokens"] == 0


def test_null_and_zero_prompt_logprobs(client, teacher):
    model, tokenizer = teacher
    ids = tokenizer("Hello world, hello")["input_ids"]
    assert complete(client, ids).json()["choices"][0]["prompt_logprobs"] is None
    entries = complete(client, ids, prompt_logprobs=0).json()["choices"][0]["prompt_logprobs"]
    ref = reference(model, ids)
    assert entries[0] is None
    for i in range(1, len(ids)):
        assert list(entries[i]) == [str(ids[i])]
        assert entries[i][str(ids[i])]["logprob"] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)


def test_raw_and_processed_logprobs_and_the_temperature(client, teacher):
    model, tokenizer = teacher
    ids = tokenizer("Describe a sunny day at the beach.")["input_ids"]
    raw = complete(client, ids, prompt_logprobs=3, temperature=2.0).json()["choices"][0]["prompt_logprobs"]
    check_against(raw, ids, reference(model, ids), 3)  # raw: temperature 1 whatever the request says
    with TestClient(make_app(teacher, logprobs_mode="processed_logprobs")) as processed:
        hot = complete(processed, ids, prompt_logprobs=3, temperature=2.0).json()["choices"][0]["prompt_logprobs"]
        check_against(hot, ids, reference(model, ids, temperature=2.0), 3)
        greedy = complete(processed, ids, prompt_logprobs=3, temperature=0).json()["choices"][0]
        check_against(greedy["prompt_logprobs"], ids, reference(model, ids), 3)
        r = complete(processed, ids, prompt_logprobs=3, top_p=0.9)
        assert r.status_code == 400 and "top_p" in r.json()["error"]["message"]
    assert hot[1] != raw[1]


def test_more_logprobs_than_the_cap_is_vllms_400(client, teacher):
    r = complete(client, [1, 2, 3], prompt_logprobs=64)
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "Requested prompt logprobs of 64, which is greater than max allowed: 20",
                                  "type": "BadRequestError", "param": "prompt_logprobs", "code": 400},
                        "object": "error"}
    assert complete(client, [1, 2, 3], prompt_logprobs=20).status_code == 200
    with TestClient(make_app(teacher, max_logprobs=-1)) as uncapped:  # -1: no cap; K is cut to the vocabulary
        entries = complete(uncapped, [1, 2], prompt_logprobs=100000).json()["choices"][0]["prompt_logprobs"]
        assert len(entries[1]) == len(teacher[1])  # the tokenizer's entries, not the padded output layer's


@pytest.mark.parametrize("fields, status, words", [
    ({"prompt": [[5, 6], [7, -1]]}, 400, ["prompt 1", "token id -1"]),
    ({"prompt": [[5, 6], [7, 10**6]]}, 400, ["prompt 1", "token id 1000000", "out of vocabulary"]),
    ({"prompt": [[5, 6.5]]}, 400, ["prompt 0", "6.5"]),
    ({"prompt": [[5, True]]}, 400, ["prompt 0", "True"]),
    ({"prompt": [[1, 2], []]}, 400, ["prompt 1 is empty"]),
    ({"prompt": [3] * 65}, 400, ["prompt 0 has 65 tokens", "maximum context length of 64"]),
    ({"prompt": [3] * 60, "max_tokens": 5}, 400, ["plus max_tokens 5", "maximum context length of 64"]),
    ({"prompt": [1, 2], "max_tokens": -1}, 400, ["max_tokens"]),
    ({"prompt": [1, 2], "prompt_logprobs": -1}, 400, ["prompt_logprobs must be an integer >= 0"]),
    ({"prompt": [1, 2], "temperature": "hot"}, 400, ["temperature"]),
    ({"prompt": [1, 2], "stream": True}, 400, ["stream"]),
    ({"prompt": [1, 2], "logprobs": 2}, 400, ["prompt_logprobs"]),
    ({"prompt": 7}, 400, ["prompt must be"]),
    ({"prompt": [1, 2], "model": "gpt-4"}, 404, ["The model `gpt-4` does not exist."]),
])
def test_bad_requests_answer_an_openai_error(client, fields, status, words):
    r = complete(client, **fields)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    for word in words:
        assert word in error["message"]


def test_invalid_json_and_missing_prompt(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": NAME})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_models_and_health(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == NAME and card["object"] == "model" and card["owned_by"] == "kdistill"
    assert card["max_model_len"] == 64 and isinstance(card["created"], int)
    assert client.get("/health").status_code == 200


def test_text_prompts_and_greedy_text(client, teacher):
    model, tokenizer = teacher
    text = "Name two primary colors."
    ids = tokenizer(text)["input_ids"]
    by_text = complete(client, text, prompt_logprobs=2, max_tokens=4).json()
    by_ids = complete(client, [ids], prompt_logprobs=2, max_tokens=4).json()
    assert by_text["choices"][0]["prompt_logprobs"] == by_ids["choices"][0]["prompt_logprobs"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
    assert by_text["choices"][0]["text"] == expected == by_ids["choices"][0]["text"]
    assert by_text["usage"]["prompt_tokens"] == len(ids)
    two = complete(client, [text, "Hi"], max_tokens=0).json()
    assert len(two["choices"]) == 2 and two["usage"]["prompt_tokens"] == len(ids) + len(tokenizer("Hi")["input_ids"])


# --------------------------------------------------------------------------------------------- batching
def count_forwards(model, monkeypatch, fail_once=False):
    """Record the batch size of every forward of `model` (the first raises if `fail_once`)."""
    sizes, forward = [], model.forward

    def counted(*args, **kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if fail_once and len(sizes) == 1:
            raise RuntimeError("simulated out of memory")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    return sizes


async def _concurrently(app, bodies):
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            return await asyncio.gather(*(ac.post("/v1/completions", json=b) for b in bodies))
    finally:
        await app.state.batcher.close()


def test_concurrent_requests_are_batched_and_answered_each_their_own(teacher, monkeypatch):
    model, tokenizer = teacher
    texts = ["Hello there.", "Write a poem about the sea and the sky.", "Why?", "List three fruits.",
             "Translate cat into French.", "Summarize the plot of a long story in a few words.", "Add 2 and 3.",
             "Good morning"]
    prompts = prompts_of(tokenizer, *texts)
    app = make_app(teacher, batch_wait_ms=200)
    sizes = count_forwards(model, monkeypatch)
    replies = asyncio.run(_concurrently(app, [{"model": NAME, "prompt": p, "max_tokens": 1, "prompt_logprobs": 3}
                                              for p in prompts]))
    assert len(sizes) < len(prompts) and max(sizes) > 1, sizes
    assert app.state.batcher.batches == len(sizes) and app.state.batcher.items == len(prompts)
    for reply, ids in zip(replies, prompts):
        assert reply.status_code == 200
        check_against(reply.json()["choices"][0]["prompt_logprobs"], ids, reference(model, ids), 3)


def test_batch_size_and_token_limits_split_batches(teacher, monkeypatch):
    model, _ = teacher
    sizes = count_forwards(model, monkeypatch)
    app = make_app(teacher, batch_wait_ms=200, max_batch_size=3)
    bodies = [{"prompt": [5 + i, 6, 7, 8], "max_tokens": 1, "prompt_logprobs": 1} for i in range(7)]
    assert all(r.status_code == 200 for r in asyncio.run(_concurrently(app, bodies)))
    assert max(sizes) <= 3 and len(sizes) >= 3 and sum(sizes) == 7
    sizes.clear()
    app = make_app(teacher, batch_wait_ms=200, max_batch_tokens=8)  # two prompts of 4 tokens per forward
    assert all(r.status_code == 200 for r in asyncio.run(_concurrently(app, bodies)))
    assert max(sizes) == 2 and sum(sizes) == 7


def test_a_failed_forward_answers_500_and_the_server_keeps_serving(teacher, monkeypatch):
    model, _ = teacher
    count_forwards(model, monkeypatch, fail_once=True)
    app = make_app(teacher, batch_wait_ms=0)
    first = asyncio.run(_concurrently(app, [{"prompt": [1, 2, 3], "max_tokens": 1}]))[0]
    assert first.status_code == 500
    assert first.json()["error"]["type"] == "InternalServerError" and "simulated" in first.json()["error"]["message"]
    second = asyncio.run(_concurrently(app, [{"prompt": [1, 2, 3], "max_tokens": 1}]))[0]
    assert second.status_code == 200


# --------------------------------------------------------------------------------------------- the command
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_starts_and_serves(tiny_causal, teacher):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kdistill.cli", "serve-teacher", tiny_causal["teacher"],
                             "--port", str(port), "--device", "cpu", "--served-model-name", "t"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
        ids = [5, 17, 42, 9]
        r = httpx.post(f"{base}/v1/completions", json={"model": "t", "prompt": [ids], "max_tokens": 1,
                                                        "prompt_logprobs": 2}, timeout=30)
        assert r.status_code == 200, r.text
        check_against(r.json()["choices"][0]["prompt_logprobs"], ids, reference(teacher[0], ids), 2)
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["max_model_len"] == 512
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_cli_refuses_encoder_decoders_and_bad_options(tmp_path, tiny_causal, capsys):
    from kdistill.apps.tiny import t5_config, train_tokenizer

    t5 = tmp_path / "t5"
    t5_config(train_tokenizer(["a b c d e f"] * 20, vocab_size=300, kind="t5")).save_pretrained(t5)
    assert main(["serve-teacher", str(t5)]) == 2
    assert "encoder-decoder" in capsys.readouterr().err
    assert main(["serve-teacher", tiny_causal["teacher"], "--max-model-len", "100000", "--device", "cpu"]) == 2
    assert "--max-model-len: 100000 is more than the model's maximum length of 512" in capsys.readouterr().err
    assert main(["serve-teacher", tiny_causal["teacher"], "--max-batch-size", "0"]) == 2
    assert "--max-batch-size" in capsys.readouterr().err
    with socket.socket() as busy:  # a port in use: refused before the model loads
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert main(["serve-teacher", tiny_causal["teacher"], "--port", port, "--device", "cpu"]) == 2
    assert f"--host/--port: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(tiny_causal, capsys):
    assert main(["serve-teacher", tiny_causal["teacher"], "--device", "cuda", "--port", str(_free_port())]) == 2
    assert "--device: cuda: CUDA is not available" in capsys.readouterr().err


def test_missing_fastapi_is_one_line_naming_the_extra(tiny_causal, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(UserError, match=r"pip install 'kdistill\[serve\]'"):
        require_serve_dependencies()
    assert main(["serve-teacher", tiny_causal["teacher"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "kdistill serve-teacher: error: kdistill serve-teacher needs fastapi: pip install 'kdistill[serve]'"
    assert json.dumps(err)  # one line
