"""A teacher served over HTTP (issue #16): vLLM's response shape, the served top-k against the local teacher's,
training / caching / on-policy from `kdistill serve-teacher`, and a server killed mid-run."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, run_config
from kdistill.config import ConfigError, ModelConfig, config_from_dict, load_config
from kdistill.models import load_model, load_tokenizer
from kdistill.teachers.served import ServedTeacherError, parse_prompt_logprobs

# A response of vLLM 0.x's /v1/completions to {"prompt": [[9, 4, 7]], "max_tokens": 1, "prompt_logprobs": 2}, as
# it arrives: position 0 null; position 2's actual token (7) is outside the top 2, so it comes as a third entry
# with its true rank.
RECORDED = {
    "id": "cmpl-3c1c5b2a", "object": "text_completion", "created": 1733222400, "model": "teacher",
    "choices": [{"index": 0, "text": " the", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                 "prompt_logprobs": [
                     None,
                     {"4": {"logprob": -0.25, "rank": 1, "decoded_token": " cat"},
                      "11": {"logprob": -1.75, "rank": 2, "decoded_token": " dog"}},
                     {"7": {"logprob": -4.5, "rank": 9, "decoded_token": " sat"},
                      "3": {"logprob": -0.5, "rank": 1, "decoded_token": ","},
                      "5": {"logprob": -1.5, "rank": 2, "decoded_token": "."}}]}],
    "usage": {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1}}


def test_vllm_response_shape_is_read_with_the_null_first_position_and_the_k_plus_1_case():
    ids, lps, actual = parse_prompt_logprobs(RECORDED["choices"][0]["prompt_logprobs"], [9, 4, 7], 2, 16, "r")
    assert ids.tolist() == [[4, 11], [3, 5]]
    assert lps.tolist() == [[-0.25, -1.75], [-0.5, -1.5]]
    assert actual.tolist() == [-0.25, -4.5]


@pytest.mark.parametrize("mutate, message", [
    (lambda e: e.pop(), "2 positions for a prompt of 3 tokens"),
    (lambda e: e[1].pop("11"), "position 1: 1 log-probs, 2 were requested"),
    (lambda e: e[1].update({"99": {"logprob": -3.0}}), "token id 99 is outside the vocabulary"),
    (lambda e: e[2]["3"].update(logprob=float("nan")), "is not a log-probability"),
    (lambda e: e[2].pop("7"), "the actual token 7 has no log-prob"),
])
def test_malformed_responses_are_refused_with_the_request_named(mutate, message):
    entries = json.loads(json.dumps(RECORDED["choices"][0]["prompt_logprobs"]))
    mutate(entries)
    with pytest.raises(ServedTeacherError, match=message) as info:
        parse_prompt_logprobs(entries, [9, 4, 7], 2, 16, "request 3")
    assert str(info.value).startswith("request 3")


@pytest.mark.parametrize("server, extra, message", [
    ({"model": "m"}, {}, "teacher.server.url is required"),
    ({"url": "http://127.0.0.1:1/v1"}, {}, "teacher.server.model is required"),
    ({"url": "127.0.0.1:8000", "model": "m"}, {}, "expected http"),
    ({"url": "http://h/v1", "model": "m"}, {"objectives": {"hidden": {}}}, "teacher.server gives top-k"),
    ({"url": "http://h/v1", "model": "m"}, {"objectives": {"kd": {"temperature": 2.0}}}, "missing: renormalize"),
    ({"url": "http://h/v1", "model": "m"}, {"on_policy": {"seq_kd": True, "lmbda": 0.5},
                                             "objectives": {"kd": {}}}, "seq_kd"),
])
def test_config_errors(server, extra, message, tmp_path):
    raw = run_config(None, "student", tmp_path / "d.jsonl", tmp_path / "out")
    raw["teacher"] = {"server": server}
    raw["objectives"] = {"kd": {}}
    raw.update(extra)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


# ------------------------------------------------------------------------------------- against a real server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`kdistill serve-teacher MODEL` in a subprocess on a loopback port; restartable on the same port."""

    def __init__(self, model: str, *extra: str, port: int | None = None):
        self.model, self.extra, self.port = model, extra, port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = None

    def start(self) -> "Served":
        import httpx

        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "kdistill.cli", "serve-teacher", self.model,
                                      "--port", str(self.port), "--served-model-name", "teacher", *self.extra],
                                     cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve-teacher exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/models", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("serve-teacher did not start within 120 s")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _server_cfg(url, **extra):
    return {"url": url, "model": "teacher", "top_k": 8, "max_retries": 1, "timeout": 30, **extra}


def test_served_top_k_equals_the_local_teacher_and_so_does_the_kd_loss(tiny_causal, alpaca_small, tmp_path):
    from kdistill.losses.topk import topk_from_logits
    from kdistill.pipeline import prepare
    from kdistill.recipes.lm import build_cache

    with Served(tiny_causal["teacher"]) as server:
        raw = run_config(None, tiny_causal["student"], alpaca_small, tmp_path / "out")
        raw["teacher"] = {"server": _server_cfg(server.url)}
        raw["objectives"] = {"kd": {"divergence": "forward_kl", "missing": "bucket"}}
        served = prepare(config_from_dict(raw))
        trainer = served.trainer
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        from kdistill.batch import Batch
        from kdistill.teachers.base import TeacherQuery
        parsed = Batch.parse(batch)
        query = TeacherQuery("", parsed.views[""], parsed, False)
        rows = trainer.teacher.tokens(query)
        teacher = load_model(ModelConfig(name_or_path=tiny_causal["teacher"]))
        vocab = trainer.kd_vocab
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        local = topk_from_logits(logits[query.mask][:, :vocab], 8)
        assert torch.equal(rows.teacher.indices, local.indices)
        torch.testing.assert_close(rows.teacher.logprobs, local.logprobs, atol=1e-4, rtol=1e-4)
        served_loss = float(trainer.compute_loss(served.student, batch))

    # the same kd loss as training from a local top-8 cache of the same teacher
    raw_cached = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path / "cached")
    raw_cached["objectives"] = raw["objectives"]
    raw_cached["cache"] = {"dir": str(tmp_path / "cache"), "k": 8, "logprob_bits": 16}
    cfg = config_from_dict(raw_cached)
    build_cache(cfg, progress=False)
    cached = prepare(cfg)
    cbatch = cached.trainer.data_collator([cached.trainer.train_dataset[i] for i in range(4)])
    assert float(cached.trainer.compute_loss(cached.student, cbatch)) == pytest.approx(served_loss, rel=1e-3)


def _train_config(tmp_path, pair, data, url, out, **training):
    raw = run_config(None, pair["student"], data, out, **training)
    raw["teacher"] = {"server": _server_cfg(url)}
    raw["objectives"] = {"kd": {"divergence": "forward_kl"}}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(config, *extra, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kdistill.cli", *extra, str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_an_unreachable_server_is_an_error_before_training(tiny_causal, alpaca_small, tmp_path):
    config = _train_config(tmp_path, tiny_causal, alpaca_small, f"http://127.0.0.1:{_free_port()}/v1",
                           tmp_path / "out")
    proc = _run(config, "train")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "teacher.server: cannot use http://127.0.0.1" in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("checkpoint-*"))


def test_a_server_capping_log_probs_below_k_is_refused_with_the_fix(tiny_causal, alpaca_small, tmp_path):
    with Served(tiny_causal["teacher"], "--max-logprobs", "4") as server:
        config = _train_config(tmp_path, tiny_causal, alpaca_small, server.url, tmp_path / "out")
        proc = _run(config, "train")
    assert proc.returncode == 2
    assert "--max-logprobs 8" in proc.stderr and "returns at most 4" in proc.stderr


def test_a_teacher_with_another_tokenizer_is_refused(tiny_causal, tmp_path_factory, alpaca_small, tmp_path):
    from kdistill.apps.tiny import make_tiny_pair

    other = make_tiny_pair(tmp_path_factory.mktemp("other-vocab"), kind="causal", data=alpaca_small, vocab_size=300,
                           seed=1, progress=False)
    with Served(other["teacher"]) as server:
        config = _train_config(tmp_path, tiny_causal, alpaca_small, server.url, tmp_path / "out")
        proc = _run(config, "train")
    assert proc.returncode == 2
    assert "does not use the student's tokenizer" in proc.stderr or "outside the vocabulary" in proc.stderr


@pytest.mark.slow
def test_server_killed_mid_run_training_resumes_to_the_uninterrupted_result(tiny_causal, alpaca_small, tmp_path):
    from safetensors.torch import load_file

    with Served(tiny_causal["teacher"]) as server:
        straight = _train_config(tmp_path, tiny_causal, alpaca_small, server.url, tmp_path / "straight",
                                 max_steps=8, save_strategy="steps", save_steps=2, seed=0)
        assert _run(straight, "train").returncode == 0
        killed_cfg = _train_config(tmp_path, tiny_causal, alpaca_small, server.url, tmp_path / "killed",
                                   max_steps=8, save_strategy="steps", save_steps=2, seed=0)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.Popen([sys.executable, "-m", "kdistill.cli", "train", str(killed_cfg)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (tmp_path / "killed" / "checkpoint-4").exists():
            time.sleep(0.05)
        server.stop(signal.SIGKILL)  # the teacher dies mid-run
        _, err = run.communicate(timeout=300)
        assert run.returncode != 0, err[-2000:]
        assert not (tmp_path / "killed" / "kdistill_summary.json").exists()
        server.start()  # back on the same port
        rerun = _run(killed_cfg, "train")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads((tmp_path / "killed" / "kdistill_summary.json").read_text())
    assert summary["global_step"] == 8 and "checkpoint-" in summary["resumed_from"]
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_server_killed_mid_cache_resumes_with_nothing_lost_or_duplicated(tiny_causal, alpaca_small, tmp_path):
    from kdistill.teachers.topk_store import TopKStore

    def cache_config(name, url):
        raw = run_config(None, tiny_causal["student"], alpaca_small, tmp_path / "unused")
        raw["teacher"] = {"server": _server_cfg(url, batch_size=2)}
        raw["objectives"] = {"kd": {}}
        raw["cache"] = {"dir": str(tmp_path / name), "k": 8, "batch_size": 2}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    with Served(tiny_causal["teacher"], "--batch-wait-ms", "40") as server:  # slow enough to be killed mid-way
        assert _run(cache_config("whole", server.url), "cache").returncode == 0
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        config = cache_config("killed", server.url)
        run = subprocess.Popen([sys.executable, "-m", "kdistill.cli", "cache", str(config)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        index = tmp_path / "killed" / "train"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and sum(
                f.read_text().count("\n") for f in index.glob("*.index.jsonl")) < 10:
            time.sleep(0.02)
        server.stop(signal.SIGKILL)
        run.communicate(timeout=300)
        assert run.returncode != 0
        partial = TopKStore(index)
        assert 0 < len(partial) and not partial.complete
        server.start()
        rerun = _run(config, "cache")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    whole, resumed = TopKStore(tmp_path / "whole" / "train"), TopKStore(index)
    assert resumed.complete and len(resumed) == len(whole)
    for i in range(len(whole)):
        (a_ids, a_lp), (b_ids, b_lp) = whole.get(i), resumed.get(i)
        assert np.array_equal(a_ids, b_ids) and np.allclose(a_lp, b_lp)


@pytest.mark.parametrize("mode", ["divergence", "sampled_token"])
def test_on_policy_scored_by_the_served_teacher(mode, tiny_causal, alpaca_small, tmp_path):
    """sampled_token needs only the actual tokens' log-probs: served, they are exact, so the first step's loss
    equals the one with the teacher loaded locally."""
    from kdistill.pipeline import prepare

    def first_loss(teacher):
        raw = run_config(None, tiny_causal["student"], alpaca_small, tmp_path / mode)
        raw["teacher"] = teacher
        raw["on_policy"] = {"max_new_tokens": 8, "mode": mode}
        raw["objectives"] = {"kd": {"divergence": "reverse_kl", "missing": "renormalize"}}
        prepared = prepare(config_from_dict(raw))
        trainer = prepared.trainer
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        batches, _ = trainer.on_policy.prepare([batch], 0, trainer.model)
        prepared.student.eval()
        out = trainer.compute_loss(prepared.student, batches[0])
        return float(out), trainer._terms["eval"]

    with Served(tiny_causal["teacher"]) as server:
        served, _ = first_loss({"server": _server_cfg(server.url)})
    local, _ = first_loss({"name_or_path": tiny_causal["teacher"]})
    assert math.isfinite(served)
    if mode == "sampled_token":
        assert served == pytest.approx(local, rel=1e-4)
